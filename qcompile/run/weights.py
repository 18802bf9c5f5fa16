"""HF safetensors checkpoints <-> the library's parameters. No pickle anywhere.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor -> file). The family's `weight_map` says which HF
tensors fill each library parameter (fused ones are concatenated along axis 0).

A quantized library (quant/choice.py) holds each weight `quant.policy` names as its stored tensors
(`<prefix>.qweight` + `<prefix>.scales`, or a 16-bit `<prefix>.weight`). They come from a quantized
checkpoint (QCKPT: a `quantization.json` beside config.json, the stored tensors under those names) as
they are, or from a float checkpoint quantized tensor by tensor while loading (`schemes.quantize`).
Packing is along K only, so fusing (concatenation along axis 0, experts stacked on a new axis 0) applies
unchanged to qweight and scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 checkpoints read)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..atomic import atomic_dir, write_json
from ..errors import UserError
from ..quant import policy, schemes
from ..quant.choice import Quantization, resolve
from ..spec.model import ModelSpec
from ..spec.schema import read_json_object
from . import layouts

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Marks a checkpoint of random weights, which init-weights may overwrite (and nothing else).
RANDOM_MARKER = ".qcompile-random-weights"
QUANTIZATION_FILE = "quantization.json"  # a quantized checkpoint's record of its scheme
# Buffers some older checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def tensor_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index = directory / INDEX_FILE
    if index.exists():
        mapping = read_json_object(index, missing=f"{index}: missing").get("weight_map")
        if not isinstance(mapping, dict):
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
        files = {name: directory / file for name, file in mapping.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise UserError(f"{file}: shard listed in {INDEX_FILE} is missing")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise UserError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (not a checkpoint)")
    try:
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{single}: unreadable safetensors file ({e})") from None


def checkpoint_quantization(directory: Path) -> Quantization | None:
    """The scheme a quantized checkpoint records in quantization.json (None: a float checkpoint)."""
    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    record = read_json_object(path, missing=f"{path}: missing")
    try:
        return resolve(record["scheme"], record.get("group_size"))
    except (KeyError, TypeError):
        raise UserError(f"{path}: needs 'scheme' (and 'group_size' for q8/q4)") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _check_schemes(directory: Path, theirs: Quantization | None, ours: Quantization | None) -> None:
    """A quantized checkpoint must hold the library's own scheme; a float one fits any library."""
    if theirs is None or theirs == ours:
        return
    library = f"a {ours.describe()} library" if ours else "a float library"
    raise UserError(f"{directory}: checkpoint is quantized {theirs.describe()}, given to {library} "
                    f"(compile with --quantization {theirs.scheme.name}, or load a float checkpoint)")


def parameter_specs(manifest: dict[str, Any]) -> list[tuple[str, list[int], str, str | None]]:
    """(name, shape, dtype, layout) of each of a library's parameters, in order (what `load_parameters`
    takes)."""
    return [(p["name"], p["shape"], p["dtype"], p.get("layout")) for p in manifest["parameters"]]


def load_parameters(spec: ModelSpec, directory: Path,
                    params: Iterable[tuple[str, list[int], str, str | None]],
                    quantization: Quantization | None = None,
                    shard: Callable[[str, tuple[int, ...]], Any] | None = None) -> Iterator[np.ndarray]:
    """The library's parameters (name, shape, dtype, layout), in order, filled from an HF checkpoint, one
    at a time: the caller moves each to the device before the next is read, so loading holds the device
    copy and one parameter, not a second copy of the model. A parameter with a layout is packed into it
    (`run.layouts`) as it is read.

    Every checkpoint tensor must be used and have its HF shape; errors name the tensor. A fused tensor
    the family declares (`checkpoint_views`) stands for the HF tensors it contains.

    `quantization`: the library's (see the module docstring); `shard(hf_name, hf_shape)` -> a
    `parallel.shards.TensorSlice`: read only that part of each HF tensor (`safe_open(...).get_slice`,
    before any fusing), as one tensor-parallel shard does (float weights only).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: checkpoint directory not found")
    stored_scheme = checkpoint_quantization(directory)
    _check_schemes(directory, stored_scheme, quantization)
    files = tensor_files(directory)
    # Our name -> the name in the file: older spellings carry a prefix today's names lack.
    on_disk = {}
    for name in files:
        prefix = next((p for p in spec.family.checkpoint_prefixes if name.startswith(p)), "")
        on_disk[name[len(prefix):]] = name
    files = {ours: files[theirs] for ours, theirs in on_disk.items()}
    expected = spec.family.hf_tensors(spec.config)
    views = spec.family.checkpoint_views(spec.config)
    packed = {name for name, shape in expected.items() if quantization and policy.is_quantized(name, shape)}
    # The tensors a quantized checkpoint stores for an HF weight: "<prefix>.qweight" + "<prefix>.scales"
    # (q8, q4) or the weight itself (bf16, f16).
    grouped_on_disk = stored_scheme is not None and stored_scheme.scheme.grouped
    known = {stored for name in expected for stored in (
        (_stored_name(name, schemes.QWEIGHT), _stored_name(name, schemes.SCALES))
        if grouped_on_disk and name in packed else (name,))}
    unexpected = [n for n in files if n not in known and n not in views
                  and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise UserError(f"{directory}: unexpected tensor '{unexpected[0]}' for model {spec.name}")
    # HF tensor -> (stored tensor, index into it or None)
    sources = {name: (name, None) for name in files}
    for fused in (v for v in views if v in files):
        sources |= {name: (fused, index) for name, index in views[fused].items()}
    last_read: dict[str, np.ndarray] = {}  # one stored tensor: a fused one is sliced many times

    def stored(name: str) -> np.ndarray:
        # The file is opened per tensor: safetensors maps it, and a mapping kept open for the whole load
        # would hold every tensor's pages resident beside the device copy (a second copy of the model).
        if name not in last_read:
            path = files[name]
            try:
                last_read.clear()
                with safe_open(path, framework="numpy") as f:
                    last_read[name] = f.get_tensor(on_disk[name])
            except (SafetensorError, OSError) as e:
                raise UserError(f"{path}: cannot read tensor '{name}' ({e})") from None
        return last_read[name]

    def region(name: str) -> np.ndarray:
        """Only `part.region` of a stored tensor: its shape checked, then that slice read."""
        path, part = files[name], shard(name, expected[name])
        try:
            with safe_open(path, framework="numpy") as f:
                view = f.get_slice(on_disk[name])
                if tuple(view.get_shape()) != tuple(expected[name]):
                    raise UserError(f"{path}: tensor '{name}' has shape {list(view.get_shape())}, "
                                    f"expected {list(expected[name])}")
                array = view[part.region]
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: cannot read tensor '{name}' ({e})") from None
        return np.zeros_like(array) if part.zero else array

    def read(name: str) -> np.ndarray:
        if name not in sources:
            raise UserError(f"{directory}: missing tensor '{name}'")
        stored_name, index = sources[name]
        if shard is not None and index is None:
            return region(name)
        array = stored(stored_name) if index is None else stored(stored_name)[index]
        if tuple(array.shape) != tuple(expected[name]):
            within = "" if index is None else f" (from '{stored_name}')"
            raise UserError(f"{files[stored_name]}: tensor '{name}'{within} has shape {list(array.shape)}, "
                            f"expected {list(expected[name])}")
        if shard is not None:  # inside a fused stored tensor (a checkpoint view): sliced once read
            part = shard(name, expected[name])
            array = np.zeros_like(array[part.region]) if part.zero else array[part.region]
        return array

    quantized_now: dict[str, dict[str, np.ndarray]] = {}  # the HF weights of the parameter being assembled

    def stored_tensors(name: str) -> dict[str, np.ndarray]:
        """An HF weight the policy quantizes, as the library's scheme stores it ({suffix: array})."""
        if stored_scheme is None:  # a float checkpoint, quantized while loading
            if name not in quantized_now:
                quantized_now[name] = schemes.quantize(name, read(name), quantization.scheme,
                                                       quantization.group_size or 0)
            return quantized_now[name]
        out = {}
        for suffix, (shape, dtype) in quantization.stored_shapes(expected[name]).items():
            tensor = _stored_name(name, suffix) if grouped_on_disk else name
            if tensor not in files:
                raise UserError(f"{directory}: missing tensor '{tensor}'")
            array = stored(tensor)
            if tuple(array.shape) != tuple(shape) or array.dtype != schemes._dtype(dtype):
                raise UserError(f"{files[tensor]}: tensor '{tensor}' is {array.dtype} {list(array.shape)}, "
                                f"expected {dtype} {list(shape)} ({quantization.describe()})")
            out[suffix] = array
        return out

    def assemble(recipe: list, part: str | None = None) -> np.ndarray:
        """A list of names: concatenated along axis 0; a list of lists: stacked along a new axis 0.
        `part`: the stored tensor of packed weights to take (qweight, scales, weight)."""
        if isinstance(recipe[0], list):
            return np.stack([assemble(r, part) for r in recipe])
        parts = [read(n) if part is None else stored_tensors(n)[part] for n in recipe]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    mapping = spec.family.weight_map(spec.config)
    last_recipe = None
    for name, shape, dtype, layout in params:
        recipe, part = _recipe(mapping, name)
        if part is not None and not all(n in packed for n in _leaves(recipe)):
            recipe, part = mapping[name], None  # a float "<prefix>.weight" (norms, the router)
        if recipe is not last_recipe:  # qweight and scales of one weight share its quantization
            quantized_now.clear()
            last_recipe = recipe
        array = assemble(recipe, part)
        want = layouts.unpacked_shape(shape, layout)
        if array.shape != want and (array.squeeze().shape == tuple(d for d in want if d != 1)  # unit axes:
                                    or array.reshape(array.shape[0], -1).shape == want):  # [1, 1, w] cls
            array = array.reshape(want)  # token; trailing axes merged: a patch convolution's weight
        array = layouts.pack(array.astype(dtype, copy=False), layout, name)
        assert list(array.shape) == list(shape), (name, array.shape, shape)  # a family bug, not input
        yield array


def _stored_name(hf_name: str, suffix: str) -> str:
    """'<prefix>.weight' -> '<prefix>.<suffix>'."""
    return hf_name.removesuffix(".weight") + "." + suffix


def _recipe(mapping: dict[str, list], name: str) -> tuple[list, str | None]:
    """A library parameter -> (its weight-map recipe, the stored part it takes: qweight / scales /
    weight of a packed weight, or None). Packed weights are named '<base>.qweight' etc. where the float
    library has '<base>.weight' (linear, embedding) or '<base>' (stacked experts)."""
    base, _, suffix = name.rpartition(".")
    if suffix in (schemes.QWEIGHT, schemes.SCALES, "weight"):
        for float_name in (base + ".weight", base):
            if float_name in mapping:
                return mapping[float_name], suffix
    return mapping[name], None


def _leaves(recipe: list) -> list[str]:
    return [n for r in recipe for n in (_leaves(r) if isinstance(r, list) else [r])]


def random_tensors(spec: ModelSpec, *, seed: int, std: float) -> Iterable[tuple[str, np.ndarray]]:
    """Random float32 weights in HF layout: N(0, std) matrices and biases; norm weights 1 + N(0, std).

    A std above HF's 0.02 keeps greedy decoding of tiny random models from repeating one token.
    """
    rng = np.random.default_rng(seed)
    for name, shape in spec.family.hf_tensors(spec.config).items():
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        yield name, (noise + 1.0 if "norm" in name else noise)


def write_tensors(directory: Path, tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int,
                  metadata: dict[str, str] | None = None) -> None:
    """Write (name, array) pairs as `model.safetensors`, or as shards of at most `max_shard_bytes` (one
    tensor may exceed it) with an index file: memory holds one shard, never the whole model. Every
    file's safetensors metadata is `metadata` plus {"format": "pt"} (what transformers expects)."""
    metadata = {"format": "pt", **(metadata or {})}
    shard: dict[str, np.ndarray] = {}
    files: list[tuple[str, list[str]]] = []  # written shards: (temporary file name, its tensors)
    size = total = 0

    def flush(last: bool) -> None:
        if last and not files:  # everything fitted one file
            save_file(shard, str(directory / SINGLE_FILE), metadata=metadata)
            return
        file = f"model-{len(files) + 1:05d}.safetensors"  # renamed "-of-N" once N is known
        save_file(shard, str(directory / file), metadata=metadata)
        files.append((file, list(shard)))
        shard.clear()

    for name, array in tensors:
        if shard and size + array.nbytes > max_shard_bytes:
            flush(last=False)
            size = 0
        shard[name] = array
        size += array.nbytes
        total += array.nbytes
    flush(last=True)
    if files:
        weight_map = {}
        for i, (file, names) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            (directory / file).rename(directory / final)
            weight_map |= {name: final for name in names}
        write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_random_checkpoint(spec: ModelSpec, out: Path, *, seed: int = 0, std: float = 0.15,
                            max_shard_bytes: int = 2 << 30) -> Path:
    """Write config.json + random safetensors (sharded above `max_shard_bytes`) to `out`, atomically."""
    with atomic_dir(Path(out), replaceable=lambda d: (d / RANDOM_MARKER).is_file()) as tmp:
        (tmp / RANDOM_MARKER).write_text("random weights written by `qcompile init-weights`\n")
        write_json(tmp / "config.json", spec.family.config_to_hf(spec.config))
        for name, content in spec.family.checkpoint_files(spec.config).items():
            write_json(tmp / name, content)
        write_tensors(tmp, random_tensors(spec, seed=seed, std=std), max_shard_bytes=max_shard_bytes)
    return Path(out)
