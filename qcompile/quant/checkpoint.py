"""Quantized checkpoints (QCKPT): writing one from a float HF checkpoint, reading it, and writing the
float32 HF checkpoint its packed weights stand for.

A QCKPT directory is an HF checkpoint directory whose safetensors hold *stored* tensors:

  config.json             the float model's (unchanged: config readers keep working)
  tokenizer files         copied (tokenizer.json, tokenizer_config.json, generation_config.json, ...)
  quantization.json       {"scheme": "q4", "group_size": 32, "format": 1}; also, as JSON text, under
                          "quantization" in every safetensors file's metadata
  model.safetensors       (or shards + model.safetensors.index.json)

An HF tensor `<prefix>.weight` [..., N, K] that `policy.is_quantized` selects is stored as
`<prefix>.qweight` + `<prefix>.scales` (q8, q4: `schemes.quantize`) or as `<prefix>.weight` in 16 bits
(bf16, f16); every other tensor is stored float32 under its own name. A float checkpoint has no
quantization.json. Everything is read and written one tensor at a time (memory: one tensor plus one
output shard), and published atomically.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy)
import numpy as np
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_dir, write_json
from ..errors import UserError
from ..run.weights import INDEX_FILE, tensor_files, write_tensors
from ..spec.model import load_checkpoint_config
from ..spec.schema import read_json_object
from . import schemes
from .policy import is_quantized
from .schemes import QWEIGHT, SCALES, Scheme

QUANTIZATION_FILE = "quantization.json"
FORMAT = 1
# Marks a float checkpoint `qcompile dequantize` wrote, which a later dequantize may overwrite.
DEQUANTIZED_MARKER = ".qcompile-dequantized"
# Files beside the weights copied to the output: config, tokenizer, generation config (no weights, no
# pickles: a .bin/.pt next to the safetensors is not copied).
COPIED_SUFFIXES = (".json", ".txt", ".jinja", ".model")
DEFAULT_SHARD_BYTES = 2 << 30

Log = Callable[[str], None]


def read_quantization(directory: str | Path) -> tuple[Scheme, int] | None:
    """(scheme, group size) of a quantized checkpoint; None for a float one. The record must agree with
    the safetensors files' metadata (a hand-assembled mix is an error)."""
    directory = Path(directory)
    path = directory / QUANTIZATION_FILE
    if not path.is_file():
        return None
    record = read_json_object(path, missing=f"{path}: missing")
    if record.get("format") != FORMAT:
        raise UserError(f"{path}: unknown quantized-checkpoint format {record.get('format')!r} (this "
                        f"qcompile reads format {FORMAT})")
    if record.get("scheme") not in schemes.SCHEMES:
        raise UserError(f"{path}: 'scheme' must be one of {', '.join(schemes.SCHEMES)}, "
                        f"got {record.get('scheme')!r}")
    scheme = schemes.SCHEMES[record["scheme"]]
    group_size = record.get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise UserError(f"{path}: 'group_size' must be an integer, got {group_size!r}")
    for file in sorted(set(tensor_files(directory).values())):
        if _file_metadata(file).get("quantization") != _metadata_text(scheme, group_size):
            raise UserError(f"{file}: its metadata does not record {scheme.name} at group size "
                            f"{group_size}, as {QUANTIZATION_FILE} does")
    return scheme, group_size


def check_loadable(directory: str | Path, scheme: str | None, group_size: int) -> tuple[Scheme, int] | None:
    """A checkpoint's quantization, checked against a library's (`scheme` None: a float library). A
    float checkpoint suits any library (a quantized one quantizes it while loading); a quantized one
    only a library of the same scheme and group size. The error names both."""
    found = read_quantization(directory)
    if found is None:
        return None
    held = f"{found[0].name}" + (f" (group size {found[1]})" if found[0].grouped else "")
    if scheme is None:
        raise UserError(f"{directory}: holds {held} weights but the library is not quantized; give the "
                        "float checkpoint (or `qcompile dequantize` this one)")
    wanted = schemes.get(scheme)
    if found[0] != wanted or (wanted.grouped and found[1] != group_size):
        library = wanted.name + (f" (group size {group_size})" if wanted.grouped else "")
        raise UserError(f"{directory}: holds {held} weights but the library is {library}; give the float "
                        f"checkpoint or a {library} one")
    return found


def stored_layout(hf_name: str, shape: tuple[int, ...], quantization: tuple[Scheme, int] | None
                  ) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """How the HF tensor `hf_name` of float `shape` is stored: {part: (stored name, shape, dtype)} with
    part "qweight"/"scales" (grouped schemes) or "weight" (everything else)."""
    shape = tuple(shape)
    if quantization is None or not is_quantized(hf_name, shape):
        return {"weight": (hf_name, shape, "float32" if quantization else "")}  # "": as the file has it
    scheme, group_size = quantization
    if not scheme.grouped:
        return {"weight": (hf_name, shape, scheme.storage)}
    prefix, k = hf_name.removesuffix(".weight"), shape[-1]
    return {QWEIGHT: (f"{prefix}.{QWEIGHT}", (*shape[:-1], scheme.packed_k(k)), scheme.storage),
            SCALES: (f"{prefix}.{SCALES}", (*shape[:-1], k // group_size), "float16")}


class CheckpointTensors:
    """An HF checkpoint's tensors by their float (HF) names, read one at a time, from a float checkpoint
    or a QCKPT. `shapes` gives each HF tensor's float shape; `stored(name)` its stored parts (checked
    against `stored_layout`), `float32(name)` the float32 tensor they stand for (`schemes.dequantize`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserError(f"{self.directory}: checkpoint directory not found")
        self.quantization = read_quantization(self.directory)
        self._files = tensor_files(self.directory)  # stored name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}  # HF name -> float shape
        headers = {}
        for file in sorted(set(self._files.values())):
            headers |= _file_shapes(file)
        for name, shape in headers.items():
            if name.endswith(f".{SCALES}"):
                continue
            if name.endswith(f".{QWEIGHT}"):
                hf_name = f"{name.removesuffix(QWEIGHT)}weight"
                scales = headers.get(f"{name.removesuffix(QWEIGHT)}{SCALES}")
                if self.quantization is None or not self.quantization[0].grouped or scales is None:
                    raise UserError(f"{self._files[name]}: packed tensor '{name}' without its scales or "
                                    f"a grouped scheme in {QUANTIZATION_FILE}")
                shape = (*scales[:-1], scales[-1] * self.quantization[1])
            else:
                hf_name = name
            self.shapes[hf_name] = tuple(shape)

    def stored(self, hf_name: str) -> dict[str, np.ndarray]:
        """The stored parts of HF tensor `hf_name`: {"qweight", "scales"} or {"weight"}."""
        layout = stored_layout(hf_name, self.shapes[hf_name], self.quantization)
        parts = {}
        for part, (name, shape, dtype) in layout.items():
            array = self._read(name)
            if tuple(array.shape) != shape or (dtype and array.dtype != np.dtype(dtype)):
                raise UserError(f"{self._files[name]}: tensor '{name}' is {array.dtype} {list(array.shape)}, "
                                f"expected {dtype} {list(shape)} for '{hf_name}' "
                                f"({self._scheme_words()}; truncated or corrupt?)")
            parts[part] = array
        return parts

    def float32(self, hf_name: str) -> np.ndarray:
        """The float32 tensor HF tensor `hf_name` stands for."""
        parts = self.stored(hf_name)
        if self.quantization is None or "weight" in parts:
            return parts["weight"].astype(np.float32)
        scheme, group_size = self.quantization
        return schemes.dequantize(hf_name, parts, scheme, group_size)

    def _read(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise UserError(f"{self.directory}: missing tensor '{name}' ({self._scheme_words()})")
        path = self._files[name]
        try:
            with safe_open(path, framework="numpy") as f:  # opened per tensor: see run.weights
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot read tensor '{name}' ({e})") from None

    def _scheme_words(self) -> str:
        if self.quantization is None:
            return "a float checkpoint"
        scheme, group_size = self.quantization
        return f"{scheme.name}, group size {group_size}"


def quantize_checkpoint(src: str | Path, *, scheme: str, group_size: int = schemes.DEFAULT_GROUP_SIZE,
                        out: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        log: Log = lambda _msg: None) -> dict:
    """Write the QCKPT of float HF checkpoint SRC under SCHEME to OUT (atomic). Returns a summary."""
    chosen = schemes.get(scheme)
    src = Path(src)
    load_checkpoint_config(src)  # a supported model's config.json, or a one-line error
    already = read_quantization(src) if src.is_dir() else None
    if already is not None:
        raise UserError(f"{src}: already quantized ({already[0].name}, group size {already[1]}); "
                        f"quantize a float checkpoint to {chosen.name}, not this one")
    tensors = CheckpointTensors(src)
    quantized = [n for n, s in tensors.shapes.items() if is_quantized(n, s)]
    for name in quantized:  # every group size checked before anything is written
        schemes.check_group_size(chosen, group_size, name, tensors.shapes[name][-1])

    report = _progress(log, "quantizing", len(tensors.shapes))

    def stored() -> Iterator[tuple[str, np.ndarray]]:
        for i, (name, shape) in enumerate(tensors.shapes.items()):
            report(i, name)
            w = tensors.float32(name)
            if not is_quantized(name, shape):
                yield name, w
                continue
            parts = schemes.quantize(name, w, chosen, group_size)
            layout = stored_layout(name, shape, (chosen, group_size))
            yield from ((layout[part][0], array) for part, array in parts.items())

    record = {"scheme": chosen.name, "group_size": group_size, "format": FORMAT}
    with atomic_dir(Path(out), replaceable=lambda d: (d / QUANTIZATION_FILE).is_file()) as tmp:
        _copy_side_files(src, tmp)
        write_tensors(tmp, stored(), max_shard_bytes=max_shard_bytes,
                      metadata={"quantization": _metadata_text(chosen, group_size)})
        write_json(tmp / QUANTIZATION_FILE, record)
    return record | {"source": str(src), "output": str(out), "tensors": len(tensors.shapes),
                     "quantized": len(quantized), "bytes": _weight_bytes(Path(out))}


def dequantize_checkpoint(qsrc: str | Path, *, out: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                          log: Log = lambda _msg: None) -> dict:
    """Write the float32 HF checkpoint QCKPT QSRC's stored weights stand for to OUT (atomic): what
    transformers loads to compute exactly what a quantized library computes. Returns a summary."""
    qsrc = Path(qsrc)
    load_checkpoint_config(qsrc)
    tensors = CheckpointTensors(qsrc)
    if tensors.quantization is None:
        raise UserError(f"{qsrc}: not a quantized checkpoint (no {QUANTIZATION_FILE}); nothing to dequantize")
    scheme, group_size = tensors.quantization

    report = _progress(log, "dequantizing", len(tensors.shapes))

    def floats() -> Iterator[tuple[str, np.ndarray]]:
        for i, name in enumerate(tensors.shapes):
            report(i, name)
            yield name, tensors.float32(name)

    with atomic_dir(Path(out), replaceable=lambda d: (d / DEQUANTIZED_MARKER).is_file()) as tmp:
        (tmp / DEQUANTIZED_MARKER).write_text(f"float32 weights of a {scheme.name} checkpoint, written by "
                                              "`qcompile dequantize`\n")
        _copy_side_files(qsrc, tmp)
        config = read_json_object(tmp / "config.json", missing=f"{qsrc}: no config.json")
        for key in ("torch_dtype", "dtype"):  # transformers 5 loads in the recorded dtype by default
            if key in config:
                config[key] = "float32"
        write_json(tmp / "config.json", config)
        write_tensors(tmp, floats(), max_shard_bytes=max_shard_bytes)
    return {"source": str(qsrc), "output": str(out), "scheme": scheme.name, "group_size": group_size,
            "tensors": len(tensors.shapes), "bytes": _weight_bytes(Path(out))}


def _progress(log: Log, verb: str, total: int, every_s: float = 2.0) -> Callable[[int, str], None]:
    """A progress line "verb tensor i/N: name" for the first and last tensor and at most every `every_s`."""
    last = [-every_s]

    def report(i: int, name: str) -> None:
        now = time.monotonic()
        if i in (0, total - 1) or now - last[0] >= every_s:
            last[0] = now
            log(f"{verb} tensor {i + 1}/{total}: {name}")
    return report


def _metadata_text(scheme: Scheme, group_size: int) -> str:
    return json.dumps({"scheme": scheme.name, "group_size": group_size, "format": FORMAT}, sort_keys=True)


def _file_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(path, framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable safetensors file ({e})") from None


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Stored name -> shape from a safetensors header (no tensor data read)."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable safetensors file ({e})") from None


def _copy_side_files(src: Path, dest: Path) -> None:
    """config.json, tokenizer and generation files (not the weights, their index or our records)."""
    skip = {INDEX_FILE, QUANTIZATION_FILE}
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix in COPIED_SUFFIXES and path.name not in skip:
            shutil.copy2(path, dest / path.name)


def _weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))
