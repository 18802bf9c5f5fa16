"""The Hugging Face `transformers` reference, for the demo, the tests and benchmarks.

Needs the test extra (`pip install -e '.[test]'`): torch (CPU build) and transformers. Runs offline on
float32 checkpoints as `qcompile init-weights` (or `save_pretrained`) writes them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from ..errors import UserError


def _import_torch_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415
    except ImportError:
        raise UserError("the transformers reference needs the test extra: pip install -e '.[test]'") from None
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def load_causal_lm(checkpoint: Path):
    """The HF model for a checkpoint directory, float32, eval mode."""
    torch, transformers = _import_torch_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    return model.eval()


def load_vision_model(checkpoint: Path):
    """The HF vision model for a checkpoint directory (ViTModel or CLIPVisionModel, as its config.json
    says), float32, eval mode."""
    torch, transformers = _import_torch_transformers()
    return transformers.AutoModel.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def vision_features(checkpoint: Path, pixels: np.ndarray, device: str = "cpu") -> np.ndarray:
    """last_hidden_state [batch, tokens, width] of the checkpoint's HF vision model, float32, computed on
    the torch `device`."""
    torch, _ = _import_torch_transformers()
    model = load_vision_model(checkpoint).to(device)
    with torch.no_grad():
        return model(pixel_values=torch.tensor(pixels, device=device)).last_hidden_state.float().cpu().numpy()


def logits(model, ids) -> np.ndarray:
    """Float32 logits [len(ids), vocab] of one sequence (on the device the model is on)."""
    torch, _ = _import_torch_transformers()
    with torch.no_grad():
        ids = torch.tensor(np.asarray(ids, np.int64)[None], device=model.device)
        return model(ids).logits[0].float().cpu().numpy()


@dataclasses.dataclass
class Generation:
    new_ids: np.ndarray
    prefill_seconds: float  # one forward over the prompt
    generate_seconds: float  # the whole greedy generate() call

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps, seconds = len(self.new_ids) - 1, self.generate_seconds - self.prefill_seconds
        return steps / seconds if steps > 0 and seconds > 0 else None


def greedy_generate(model, ids, max_new_tokens: int) -> Generation:
    """`generate(do_sample=False)` for exactly max_new_tokens tokens (eos does not stop it), on the device
    the model is on (a GPU's queue is drained before each clock reading)."""
    torch, _ = _import_torch_transformers()
    prompt = torch.tensor(np.asarray(ids, np.int64)[None], device=model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        model(prompt)
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        # An explicit all-ones mask: otherwise HF infers one from pad_token_id and masks real tokens.
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        sync()
        total = time.perf_counter() - start
    return Generation(out[0, len(ids):].cpu().numpy(), prefill, total)
