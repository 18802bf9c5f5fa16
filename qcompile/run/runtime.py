"""Load a built library with HF weights and run it: prefill, decode, greedy generate.

The library is verified before its shared object is opened: sha256 against the manifest, the TVM
version it was built with, and that this machine has the device it was built for (CPU: every
instruction-set feature the build assumed; GPU: a device of that kind and arch, and a TVM runtime that
can load its code).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

from ..build.library import read_manifest
from ..errors import UserError
from ..spec.model import ModelSpec, load_checkpoint_config
from . import cpu_features, tvm_runtime
from ..quant.choice import from_manifest
from .weights import load_parameters, parameter_specs


def verify_library(directory: Path, manifest: dict[str, Any], private_dir: Path) -> Path:
    """Refuse a library that was altered, or built for another TVM or CPU. Returns a private copy of the
    .so, hashed as it was copied, so the bytes checked are the bytes loaded (no swap in between)."""
    rt = tvm_runtime.runtime()  # TVM's runtime libraries (full TVM or runtime-only): the version is theirs
    library = Path(directory) / manifest["library"]["file"]
    built_with = manifest["versions"]["tvm"]
    if built_with != rt.version:
        raise UserError(f"{directory}: built with TVM {built_with}, this runtime is TVM {rt.version}")
    target = manifest["target"]
    if target["device"] == "cpu":
        missing = cpu_features.missing(target.get("cpu_features", ()), rt.cpu_features())
        if missing:
            raise UserError(f"{directory}: built for CPU {target['target'].get('mcpu')}; this CPU lacks "
                            f"{', '.join(missing[:5])}")
    else:
        present, why = rt.gpu_present(target["device"], target["arch"])
        if not present:
            raise UserError(f"{directory}: built for {target['device']} {target['arch']}; {why}")
    copy, digest = private_dir / "model.so", hashlib.sha256()
    try:
        with open(library, "rb") as src, open(copy, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    except FileNotFoundError:
        raise UserError(f"{library}: library file missing") from None
    if digest.hexdigest() != manifest["library"]["sha256"]:
        raise UserError(f"{library}: sha256 {digest.hexdigest()[:12]}… does not match the manifest's "
                        f"{manifest['library']['sha256'][:12]}…; refusing to load")
    return copy


def _check_checkpoint_matches(spec: ModelSpec, weights: Path) -> None:
    """A checkpoint's config.json must describe the library's model (else numbers would be wrong)."""
    if not (Path(weights) / "config.json").is_file():
        return  # bare safetensors: tensor names and shapes are still checked on load
    theirs = load_checkpoint_config(weights).config.canonical()
    runtime_only = getattr(spec.config, "PREPROCESSING_FIELDS", ())  # the library's settings win
    for key, value in spec.config.canonical().items():
        if key not in runtime_only and theirs.get(key) != value:
            raise UserError(f"{weights}: checkpoint's {key} is {theirs.get(key)!r}, "
                            f"the library was built with {value!r}")


@dataclasses.dataclass
class GenerateStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = self.new_tokens - 1  # the first new token comes from the prefill's logits
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


class Library:
    """A verified library loaded with an HF checkpoint's weights (what Decoder and Encoder share)."""

    _lock_fd: int | None = None  # a registry entry's shared lock, once loaded (also if __init__ failed early)

    def __init__(self, directory: Path, manifest: dict[str, Any], weights: Path, lock_fd: int | None = None):
        self._lock_fd = None  # set last: a failed __init__ leaves the caller owning lock_fd
        self.manifest = manifest
        self.spec = ModelSpec.from_manifest(manifest)
        self._open(Path(directory), Path(weights))
        buckets = manifest["buckets"]
        self._bucketed, self._bucket_sizes = buckets["function"], set(buckets["sizes"])
        self._lock_fd = lock_fd  # a registry entry's shared lock: held while this library is loaded

    def _open(self, directory: Path, weights: Path) -> None:
        """Verify the library, load its weights onto the device and open its VM, in this process."""
        params = parameter_specs(self.manifest)
        rt = tvm_runtime.runtime()
        self.device = rt.device(self.manifest["target"]["device"])
        with tempfile.TemporaryDirectory(prefix="qcompile-load-") as private:
            library = verify_library(directory, self.manifest, Path(private))  # before reading any weight
            _check_checkpoint_matches(self.spec, weights)
            # One parameter at a time: read, copied to the device, dropped (peak: the weights once + one).
            arrays = load_parameters(self.spec, weights, params, from_manifest(self.manifest))
            self._params = [rt.tensor(a, self.device) for a in arrays]
            module = rt.load_module(library)  # mapped: the copy may go once loaded
        self._vm = rt.virtual_machine(module, self.device)
        self._tensor, self._numpy = rt.tensor, rt.numpy

    def _function_name(self, name: str, size: int) -> str:
        """The entry point for a call of `name` whose dynamic dimension is `size`: its static copy
        (tuned kernels) when one was built for that size, else the symbolic-shape function."""
        return f"{name}_{size}" if name == self._bucketed and size in self._bucket_sizes else name

    def _function(self, name: str, size: int) -> Any:
        return self._vm[self._function_name(name, size)]

    def close(self) -> None:
        """Release the registry entry (if loaded from one) so gc may evict it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self):
        self.close()


class Decoder(Library):
    """A decoder library loaded with weights. One sequence at a time (batch 1).

    prefill(ids) starts a new sequence and returns float32 logits [len(ids), vocab];
    decode(token) appends one token and returns logits [vocab];
    generate(ids, max_new_tokens) runs greedy decoding and returns the new token ids;
    generate_text(prompt) / chat(messages) take text, sample (`run.generation.SamplingParams` fields as
    keyword arguments) and return text, or an iterator of text pieces with stream=True; the tokenizer
    is the checkpoint's own (`tokenizer`, loaded on first use).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], weights: Path, lock_fd: int | None = None):
        if "kv_cache" not in manifest:  # before reading any weight
            raise UserError(f"{directory}: built by an older qcompile (a copied KV cache, no 'kv_cache' in "
                            f"its manifest); compile it again")
        super().__init__(directory, manifest, weights, lock_fd)
        cfg = self.spec.config
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = manifest["max_seq_len"]
        self.prefill_chunk = manifest["prefill_chunk"]
        self.position = 0  # tokens in the current sequence (0: none started)
        self.last_stats: GenerateStats | None = None  # of the last generate()
        self.last_prompt_logits: np.ndarray | None = None  # [prompt_len, vocab] of the last generate()
        self.last_step_logits: np.ndarray | None = None  # [new_tokens, vocab]: what chose each new token
        self.weights = Path(weights)
        self._tokenizer = None

    def _check_ids(self, ids: Any, what: str) -> np.ndarray:
        array = np.asarray(ids)
        if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
            raise UserError(f"{what}: expected a non-empty 1-D sequence of integer token ids")
        bad = array[(array < 0) | (array >= self.vocab_size)]
        if bad.size:
            raise UserError(f"{what}: token id {int(bad[0])} is out of range 0..{self.vocab_size - 1}")
        if self.position + array.size > self.max_seq_len:
            raise UserError(f"{what}: sequence would reach {self.position + array.size} tokens, "
                            f"the library's max_seq_len is {self.max_seq_len}")
        return array.astype(np.int32)

    def _run(self, function: str, ids: np.ndarray) -> np.ndarray:
        """Run `ids` at the current position; the call writes their keys and values into the buffers
        (it also returns the buffers: the same memory)."""
        logits, _ = self._function(function, ids.size)(self._tensor(ids, self.device),
                                                       tvm_ffi.Shape([self.position]), self._cache, self._params)
        self.position += ids.size
        return self._numpy(logits)

    @functools.cached_property
    def _cache(self) -> Any:
        """The KV cache: per layer, K and V buffers of `slots` rows, allocated at the first call (a server
        batching through `run.batch` never makes one) and written in place by every call (position q in
        slot q % slots; a sliding layer keeps only its window). Never cleared: attention reads only the
        slots written since position 0."""
        return self._new_cache()

    def _new_cache(self) -> Any:
        """The KV cache buffers on the device, uninitialised (what the entry points take and write)."""
        cache = self.manifest["kv_cache"]
        return [tvm_runtime.runtime().empty((layer["slots"], *cache["row"]), cache["dtype"], self.device)
                for layer in cache["layers"] for _ in ("k", "v")]

    def prefill(self, ids: Any) -> np.ndarray:
        """Start a new sequence with `ids`; float32 logits [len(ids), vocab]."""
        self.position = 0  # the buffers' old contents are dead: nothing reads a slot before writing it
        ids = self._check_ids(ids, "prompt")
        chunks = [ids[i:i + self.prefill_chunk] for i in range(0, ids.size, self.prefill_chunk)]
        return np.concatenate([self._run("prefill", chunk) for chunk in chunks])

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the current sequence; float32 logits [vocab] for the next position."""
        if self.position == 0:
            raise UserError("decode: no sequence started; call prefill first")
        return self._run("decode", self._check_ids([token], "decode token"))[0]

    def generate(self, ids: Any, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding: the new token ids (at most `max_new_tokens`, stopping after eos)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        prompt = self._check_ids(ids, "prompt")
        if prompt.size + max_new_tokens > self.max_seq_len:
            raise UserError(f"prompt ({prompt.size}) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"library's max_seq_len {self.max_seq_len}")
        start = time.perf_counter()
        self.last_prompt_logits = self.prefill(prompt)
        prefill_seconds = time.perf_counter() - start
        logits = self.last_prompt_logits[-1]
        new: list[int] = []
        steps: list[np.ndarray] = []
        start = time.perf_counter()
        while len(new) < max_new_tokens:
            if new:
                logits = self.decode(new[-1])
            steps.append(logits)
            new.append(int(np.argmax(logits)))
            if new[-1] == eos_token_id:
                break
        self.last_stats = GenerateStats(prompt.size, len(new), prefill_seconds,
                                        time.perf_counter() - start)
        self.last_step_logits = np.stack(steps) if steps else np.zeros((0, self.vocab_size), np.float32)
        return np.array(new, dtype=np.int64)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (`run.tokenizer.Tokenizer`); a UserError naming the checkpoint
        directory when it has no tokenizer files."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer  # noqa: PLC0415

            self._tokenizer = Tokenizer.from_directory(self.weights)
        return self._tokenizer

    def generate_text(self, prompt: str, stream: bool = False, **sampling):
        """Continue `prompt` (text, no template): the new text, or its pieces as they come with stream."""
        from .generation import reply  # noqa: PLC0415

        return reply(self, self.tokenizer, self.tokenizer.encode(prompt), stream, sampling)

    def chat(self, messages: list[dict], stream: bool = False, **sampling):
        """The assistant's reply to `messages` ([{"role", "content"}], the checkpoint's chat template)."""
        from .generation import reply  # noqa: PLC0415

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return reply(self, self.tokenizer, self.tokenizer.encode(prompt), stream, sampling)


class Encoder(Library):
    """An image encoder library loaded with weights.

    encode(images) -> float32 last_hidden_state [batch, tokens, width]; `images` is a float32 array
    [batch, channels, size, size] already preprocessed, or image paths / PIL images (preprocessed here
    as the model's HF image processor would).
    """

    def encode(self, images: Any) -> np.ndarray:
        from .vision import as_pixel_values  # noqa: PLC0415 (Pillow is needed only here)

        pixels = as_pixel_values(images, self.spec.config)
        return self._numpy(self._function("encode", len(pixels))(self._tensor(pixels, self.device), self._params))


def load(directory: str | Path, *, weights: str | Path, lock_fd: int | None = None) -> Decoder | Encoder:
    """Open a library directory (verified) with an HF checkpoint's weights. `lock_fd`, if given, is a
    registry lock the model holds until `close()`."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    runtime = ModelSpec.from_manifest(manifest).kind.runtime_class()
    if (manifest.get("parallel") or {}).get("tensor_parallel", 1) > 1 or manifest.get("pipeline"):
        from ..parallel.session import ShardedDecoder  # noqa: PLC0415 (Disco: only for split libraries)

        runtime = ShardedDecoder
    return runtime(directory, manifest, Path(weights), lock_fd)
