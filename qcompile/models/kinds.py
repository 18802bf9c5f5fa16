"""The two kinds of model: a decoder (prefill / decode / generate over a KV cache) and an encoder (images
in, features out). Everything that differs by kind is a method here, so no other module branches on it.

Per kind: the entry point with a dynamic dimension and its static-shape copies ("buckets", the kernels
`tune` can tune), whether sequence bounds apply, the runtime class, a random test input, the transformers
reference run, our run, and the work one call does (for the bench's physical limits).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    bucketed: str  # the entry point with a dynamic dimension ...
    dynamic_dim: str  # ... and that dimension's name
    has_sequence: bool  # prefill/decode over a KV cache: max_seq_len and prefill_chunk apply
    outputs_logits: bool  # outputs are logits [positions, vocab] (else features)
    run_flags: tuple[str, ...]  # `qcompile run` flags for this kind
    run_inputs: tuple[str, ...]  # of those, the inputs: exactly one is required

    def bucket_sizes(self, device: str, prefill_chunk: int | None) -> list[int]:
        raise NotImplementedError

    def runtime_class(self) -> type:
        raise NotImplementedError

    def random_inputs(self, spec: Any, rng: np.random.Generator, length: int) -> np.ndarray:
        raise NotImplementedError

    def reference_outputs(self, checkpoint: Path, inputs: np.ndarray) -> np.ndarray:
        """transformers' outputs for `inputs` from the HF checkpoint (float32)."""
        raise NotImplementedError

    def outputs(self, model: Any, inputs: np.ndarray) -> np.ndarray:
        """A loaded library's outputs for `inputs` (comparable with `reference_outputs`)."""
        raise NotImplementedError


class DecoderKind(Kind):
    def bucket_sizes(self, device: str, prefill_chunk: int | None) -> list[int]:
        # GPU: dlight (TVM 0.27) fails on the bucket's GQA kernels over [p + chunk] ("padding factor ...
        # not divisible"), so GPU prefill runs the symbolic-length kernels only.
        return [prefill_chunk] if device == "cpu" else []

    def runtime_class(self) -> type:
        from ..run.runtime import Decoder  # noqa: PLC0415

        return Decoder

    def random_inputs(self, spec: Any, rng: np.random.Generator, length: int) -> np.ndarray:
        """`length` random token ids."""
        return rng.integers(0, spec.config.vocab_size, length)

    def reference_outputs(self, checkpoint: Path, inputs: np.ndarray) -> np.ndarray:
        from ..measure import reference  # noqa: PLC0415

        return reference.logits(reference.load_causal_lm(checkpoint), inputs)

    def outputs(self, model: Any, inputs: np.ndarray) -> np.ndarray:
        return model.prefill(inputs)

    @staticmethod
    def costs(spec: Any, prompt_len: int, dtype_bytes: int = 4) -> dict[str, float]:
        """Weight bytes one decode step reads, and the FLOPs of a prefill of `prompt_len` tokens."""
        c = spec.config
        active = spec.family.active_parameter_count(c)
        embedding = c.vocab_size * c.hidden_size
        # The embedding table is gathered (one row a token) unless it is also the LM head (tied).
        matmul_params = active - (0 if c.tie_word_embeddings else embedding)
        attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.resolved_head_dim * prompt_len ** 2 / 2
        return {"decode_weight_bytes": matmul_params * dtype_bytes,
                "prefill_flops": 2 * matmul_params * prompt_len + attention}


class EncoderKind(Kind):
    BATCH_BUCKETS = (1,)

    def bucket_sizes(self, device: str, prefill_chunk: int | None) -> list[int]:
        return list(self.BATCH_BUCKETS)

    def runtime_class(self) -> type:
        from ..run.runtime import Encoder  # noqa: PLC0415

        return Encoder

    def random_inputs(self, spec: Any, rng: np.random.Generator, length: int) -> np.ndarray:
        """`length` random images, float32 [length, channels, size, size] (already preprocessed)."""
        c = spec.config
        return rng.standard_normal((length, c.num_channels, c.image_size, c.image_size)).astype(np.float32)

    def reference_outputs(self, checkpoint: Path, inputs: np.ndarray) -> np.ndarray:
        from ..measure import reference  # noqa: PLC0415

        return reference.vision_features(checkpoint, inputs)

    def outputs(self, model: Any, inputs: np.ndarray) -> np.ndarray:
        return model.encode(inputs)

    @staticmethod
    def costs(spec: Any, prompt_len: int = 0, dtype_bytes: int = 4) -> dict[str, float]:
        """FLOPs of encoding one image."""
        c = spec.config
        tokens = c.num_positions
        attention = 4 * c.num_hidden_layers * c.hidden_size * tokens ** 2
        return {"encode_flops": 2 * spec.family.active_parameter_count(c) * tokens + attention}


DECODER = DecoderKind("decoder", bucketed="prefill", dynamic_dim="n", has_sequence=True, outputs_logits=True,
                      run_flags=("--prompt-ids", "--prompt", "--logits-out", "--eos-id"),
                      run_inputs=("--prompt", "--prompt-ids"))
ENCODER = EncoderKind("encoder", bucketed="encode", dynamic_dim="batch", has_sequence=False,
                      outputs_logits=False, run_flags=("--image", "--features-out"), run_inputs=("--image",))
