"""The Python entry points, typed and keyword-only; the CLI calls nothing else.

MODEL is a zoo name or an HF checkpoint directory; LIBRARY a directory `compile` wrote. Heavy modules (the
compiler, torch) are imported inside the functions that need them, so `load` of a built library does not
pay for the build side.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError
from .spec.model import ModelSpec, load_zoo, model_summary, resolve_model, resolve_runnable
from .spec.target import DEFAULT_TARGET, TargetSpec, availability, list_targets, load_target

Log = Callable[[str], None]


def _plan(model, target: str, dtype: str | None, max_seq_len: int | None,
          schedules: str | os.PathLike | None = None, use_schedules: bool = True, tensor_parallel: int = 1,
          pipeline_stages: int = 1, quantization: str | None = None, group_size: int | None = None):
    try:
        from .build.plan import plan_build  # noqa: PLC0415
    except ModuleNotFoundError as e:  # a deploy bundle ships the runtime part alone
        if e.name != "qcompile.build.plan":
            raise
        raise UserError(f"{getattr(model, 'name', model)}: this qcompile is runtime-only (a deploy bundle): "
                        "give a library directory, not a MODEL") from None
    return plan_build(resolve_model(model), load_target(target), dtype=dtype, max_seq_len=max_seq_len,
                      use_schedules=use_schedules, schedules=Path(schedules) if schedules is not None else None,
                      tensor_parallel=tensor_parallel, pipeline_stages=pipeline_stages,
                      quantization=quantization, group_size=group_size)


# --- building ----------------------------------------------------------------------------------------

def compile_model(model: str | os.PathLike, *, target: str = DEFAULT_TARGET, out: str | os.PathLike,
                  dtype: str | None = None, max_seq_len: int | None = None,
                  schedules: str | os.PathLike | None = None, use_schedules: bool = True,
                  tensor_parallel: int = 1, pipeline_stages: int = 1, quantization: str | None = None,
                  group_size: int | None = None, log: Log = print) -> dict[str, Any]:
    """Build MODEL for TARGET into library directory OUT (atomic); returns the manifest. Kernels come
    from the tuning database SCHEDULES (default: the target's committed ones) unless use_schedules is
    False; kernels without a record get default schedules. TENSOR_PARALLEL > 1: the library is one
    shard of that many, split by the family's plan; PIPELINE_STAGES > 1: the layers cut into that many
    stages (balanced by bytes), each its own shared object. `load` runs shards x stages as Disco workers.
    QUANTIZATION (q8, q4, bf16, f16; GROUP_SIZE for q8/q4, default 32): the library's parameters are the
    packed weights."""
    from .atomic import atomic_dir  # noqa: PLC0415
    from .build.builder import write_library  # noqa: PLC0415
    from .build.library import is_library_dir  # noqa: PLC0415

    plan = _plan(model, target, dtype, max_seq_len, schedules, use_schedules, tensor_parallel, pipeline_stages,
                 quantization, group_size)
    with atomic_dir(Path(out), replaceable=is_library_dir) as tmp:
        return write_library(plan, tmp, log=log)


def register_model(model: str | os.PathLike, *, target: str = DEFAULT_TARGET, dtype: str | None = None,
                   max_seq_len: int | None = None, copy_to: str | os.PathLike | None = None,
                   schedules: str | os.PathLike | None = None, use_schedules: bool = True,
                   tensor_parallel: int = 1, pipeline_stages: int = 1, quantization: str | None = None,
                   group_size: int | None = None, log: Log = print):
    """Build MODEL for TARGET into the registry unless an identical build is there; optionally copy the
    entry to a library directory COPY_TO (atomic). Returns (the registry.Entry, whether it was built now)."""
    from . import registry  # noqa: PLC0415
    from .atomic import atomic_dir  # noqa: PLC0415
    from .build.library import LIBRARY, MANIFEST, is_library_dir  # noqa: PLC0415

    plan = _plan(model, target, dtype, max_seq_len, schedules, use_schedules, tensor_parallel, pipeline_stages,
                 quantization, group_size)
    if plan.stages:
        raise UserError("--register: a pipelined library (several shared objects) is not kept in the registry "
                        "yet; use -o DIR")
    store = registry.Registry()
    key, built, lock_fd = store.publish(plan, log=log)
    try:  # the shared lock keeps gc away while we read and copy
        entry = store.entry(key)
        if copy_to is not None:
            with atomic_dir(Path(copy_to), replaceable=is_library_dir) as tmp:
                for name in (LIBRARY, MANIFEST):
                    shutil.copy2(entry.path / name, tmp / name)
    finally:
        os.close(lock_fd)
    return entry, built


def tune(model: str | os.PathLike, *, target: str = DEFAULT_TARGET, trials: int = 64,
         schedules: str | os.PathLike | None = None, rpc: str | None = None, dtype: str | None = None,
         kernels: str | None = None, functions: list[str] | None = None,
         log: Log = print, show_progress: bool = True) -> dict[str, Any]:
    """MetaSchedule-tune MODEL's static-shape kernels for TARGET to TRIALS records each (resuming what
    SCHEDULES, default the target's schedules directory for MODEL, holds). Returns the per-kernel report."""
    from .tune.search import tune as run_tuning  # noqa: PLC0415

    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    plan = _plan(model, target, dtype, None, use_schedules=False)
    return run_tuning(plan, trials=trials, directory=Path(schedules) if schedules else None, rpc=rpc,
                      kernels=kernels, functions=functions, log=log, show_progress=show_progress)


def format_tuning_report(report: dict[str, Any]) -> list[list[str]]:
    """The per-kernel table rows of a tuning report."""
    from .tune.report import format_report  # noqa: PLC0415

    return format_report(report)


def init_weights(model: str | os.PathLike, *, out: str | os.PathLike, seed: int = 0, std: float = 0.15,
                 max_shard_bytes: int = 2 << 30) -> Path:
    """Write a random-weight HF checkpoint (config.json + safetensors) for MODEL to OUT (atomic)."""
    from .run.weights import write_random_checkpoint  # noqa: PLC0415

    return write_random_checkpoint(resolve_model(model), Path(out), seed=seed, std=std,
                                   max_shard_bytes=max_shard_bytes)


def quantize_checkpoint(checkpoint: str | os.PathLike, *, scheme: str, group_size: int = 32,
                        out: str | os.PathLike, log: Log = print) -> dict[str, Any]:
    """Write the quantized checkpoint (packed weights + scales, or 16-bit weights; config, tokenizer and
    a record of the scheme) of float HF CHECKPOINT to OUT (atomic, tensor by tensor). Returns a summary."""
    from .quant.checkpoint import quantize_checkpoint as quantize  # noqa: PLC0415

    return quantize(checkpoint, scheme=scheme, group_size=group_size, out=out, log=log)


def dequantize_checkpoint(checkpoint: str | os.PathLike, *, out: str | os.PathLike,
                          log: Log = print) -> dict[str, Any]:
    """Write the float32 HF checkpoint a quantized CHECKPOINT's weights stand for to OUT (atomic): what
    transformers loads to see exactly what quantization did. Returns a summary."""
    from .quant.checkpoint import dequantize_checkpoint as dequantize  # noqa: PLC0415

    return dequantize(checkpoint, out=out, log=log)


# --- running -----------------------------------------------------------------------------------------

def describe_runnable(what: str | os.PathLike) -> tuple[ModelSpec, Path | None]:
    """What `run` was given: (the model, the library directory) for a LIBRARY, (the model, None) for a
    MODEL whose registry entry is meant. One rule for every command: `spec.model.resolve_runnable`."""
    return resolve_runnable(what)


def load(directory: str | os.PathLike | None = None, *, weights: str | os.PathLike,
         model: str | os.PathLike | ModelSpec | None = None, target: str = DEFAULT_TARGET, dtype: str | None = None,
         max_seq_len: int | None = None, quantization: str | None = None, group_size: int | None = None):
    """Open a verified library with an HF checkpoint's weights: a library DIRECTORY, or the registry's
    entry for MODEL built for TARGET with the same options (held in use until `.close()`). Returns a
    `run.runtime.Decoder` or `Encoder`."""
    from .run import runtime  # noqa: PLC0415

    if (directory is None) == (model is None):
        raise UserError("load: give either a library directory or model=")
    if directory is not None:
        return runtime.load(directory, weights=weights)
    plan = _plan(model, target, dtype, max_seq_len, quantization=quantization, group_size=group_size)
    from . import registry  # noqa: PLC0415 (the build side's store: a deploy bundle has none)

    path, fd = registry.Registry().open_for_load(registry.key_of(plan.identity()),
                                                 what=f"{plan.spec.name} for {target}")
    try:
        return runtime.load(path, weights=weights, lock_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def pixel_values(images: Any, spec: ModelSpec):
    """Images (paths, PIL images or an array) -> float32 [batch, channels, size, size] for an encoder,
    preprocessed as its HF image processor does (every image read and checked)."""
    from .run.vision import as_pixel_values  # noqa: PLC0415

    return as_pixel_values(images, spec.config)


# --- text --------------------------------------------------------------------------------------------

def sampling_params(**fields: Any):
    """`run.generation.SamplingParams` from its fields as keywords, checked (a UserError names the field)."""
    from .run.generation import SamplingParams  # noqa: PLC0415

    return SamplingParams.from_fields(**fields)


def require_tokenizer(weights: str | os.PathLike) -> None:
    """A UserError naming the checkpoint directory unless it holds HF tokenizer files; text commands
    check this before loading any weights."""
    from .run.tokenizer import Tokenizer  # noqa: PLC0415

    Tokenizer.require(Path(weights))


def prompt_ids(model, *, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids with a loaded decoder's tokenizer (its checkpoint's): of TEXT as it is, or of MESSAGES
    ([{"role", "content"}]) rendered with the chat template up to the start of the assistant's turn."""
    if (text is None) == (messages is None):
        raise UserError("prompt_ids: give either text= or messages=")
    if messages is not None:
        text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return model.tokenizer.encode(text)


def generate_chunks(model, prompt_ids: list[int], params, *, cancelled: Callable[[], bool] = lambda: False):
    """Generate after PROMPT_IDS with PARAMS (from `sampling_params`): checked now, then an iterator of
    `run.generation.Chunk` (text as it completes, token ids, finish_reason on the last)."""
    from .run.generation import generate  # noqa: PLC0415

    return generate(model, model.tokenizer, prompt_ids, params, cancelled=cancelled)


def serve(library: str | os.PathLike, *, weights: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          queue_size: int = 16, max_batch: int = 8, kv_budget: int | str | None = None,
          model_name: str | None = None, log: Log = print) -> None:
    """Serve a decoder LIBRARY with the HF checkpoint WEIGHTS (which holds its tokenizer files) over an
    OpenAI-compatible HTTP API on HOST:PORT (port 0: any free port) until interrupted. Requests run in a
    continuous batch of at most MAX_BATCH sequences whose KV cache fits KV_BUDGET (bytes, or a size such
    as "2GB"; None: room for MAX_BATCH sequences of the library's max_seq_len, at most 2 GiB but always
    room for one: `run.batch.default_kv_budget`);
    at most QUEUE_SIZE requests wait beyond the batch's free places, more are refused with 429. A library
    without the batched entry point (split or pipelined) serves one sequence at a time. MODEL_NAME: the
    id clients use (default: the library's model name)."""
    from .run import runtime  # noqa: PLC0415
    from .run.batching import SequentialEngine, engine_for  # noqa: PLC0415
    from .run.tokenizer import Tokenizer  # noqa: PLC0415
    from .serve import app, server  # noqa: PLC0415
    from .units import parse_memory_size  # noqa: PLC0415

    if queue_size < 0:
        raise UserError(f"--queue-size must be >= 0, got {queue_size}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
    kv_budget_bytes = parse_memory_size(kv_budget, "--kv-budget") if isinstance(kv_budget, str) else kv_budget
    if kv_budget_bytes is not None and kv_budget_bytes <= 0:
        raise UserError(f"--kv-budget must be more than 0 bytes, got {kv_budget!r}")
    spec, directory = resolve_runnable(library)
    if directory is None:
        raise UserError(f"{library}: not a library directory (serve takes what `qcompile compile -o` wrote)")
    if spec.kind.name != "decoder":
        raise UserError(f"{library}: {spec.name} is an {spec.kind.name}; serve takes a decoder library")
    tokenizer = Tokenizer.from_directory(Path(weights))  # before the weights: a missing file fails fast
    sock = server.bind(host, port)
    try:
        model = runtime.load(directory, weights=weights)
        engine = engine_for(model, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes)
        application = app.create_app(engine, tokenizer, model_name=model_name, queue_size=queue_size)
    except BaseException:
        sock.close()
        raise
    batch = f"batch {engine.max_batch}" + (" (the library has no batched entry point)"
                                           if isinstance(engine, SequentialEngine) and max_batch > 1 else "")
    log(f"serving {model_name or spec.name} on {server.url_of(sock)}/v1 (context {model.max_seq_len} tokens, "
        f"{batch}, queue {queue_size}); Ctrl-C stops")
    server.run(application, sock)


def set_threads(threads: int | None) -> int:
    """Run kernels on THREADS threads in this process (None: every CPU it may use, the default); must
    come before anything loads TVM. Returns the count in force."""
    from .run.threads import configure  # noqa: PLC0415

    return configure(threads)


# --- deploying ---------------------------------------------------------------------------------------

def bundle(libraries: list[str | os.PathLike], *, out: str | os.PathLike, log: Log = print) -> dict[str, Any]:
    """Write a deploy folder OUT (atomic) that runs LIBRARIES without TVM's compiler: the libraries, TVM's
    runtime libraries (and the non-system ones they link), the runtime part of qcompile, requirements.txt
    and launchers `qcompile-run` / `qcompile-chat` / `qcompile-serve`. Returns its bundle.json record."""
    from .deploy.bundle import bundle as write_bundle  # noqa: PLC0415

    return write_bundle([Path(p) for p in libraries], Path(out), log=log)


# --- what is there -----------------------------------------------------------------------------------

def list_models() -> dict[str, ModelSpec]:
    return load_zoo()


def show_model(model: str | os.PathLike) -> dict[str, Any]:
    spec = resolve_model(model)
    return {**model_summary(spec), "tensor_parallel_plan": spec.family.tensor_parallel_plan}


def target_status() -> dict[str, tuple[TargetSpec, dict[str, tuple[bool, str]]]]:
    """Every target with whether this machine can build it and run what it builds (and why not)."""
    return {name: (spec, availability(spec)) for name, spec in list_targets().items()}


def is_library(path: str | os.PathLike) -> bool:
    """Whether PATH is a library directory (else, for commands taking LIBRARY|MODEL, a MODEL)."""
    from .build.library import is_library_dir  # noqa: PLC0415

    return is_library_dir(Path(path))


def inspect(library: str | os.PathLike) -> dict[str, Any]:
    """What a library was built for and the device code its shared object carries (read from its bytes)."""
    from .build.devicecode import device_modules  # noqa: PLC0415
    from .build.library import LIBRARY, read_manifest  # noqa: PLC0415

    manifest = read_manifest(Path(library))
    target = manifest["target"]
    return {"model": manifest["model"]["name"], "target": target["name"], "device": target["device"],
            "arch": target.get("arch"), "dtype": manifest["dtype"],
            "device_code": manifest.get("device_code"),
            "device_modules_in_library": device_modules(Path(library) / LIBRARY),
            "toolchain": manifest["identity"]["toolchain"], "versions": manifest["versions"],
            "tuning_database": manifest.get("tuning_database"), "library": manifest["library"],
            "memory_plan": manifest.get("memory_plan"),
            "parallel": manifest.get("parallel"),
            "pipeline": [{k: s[k] for k in ("stage", "layers", "library")}
                         for s in (manifest.get("pipeline") or {}).get("stages", [])] or None,
            "kv_cache": manifest.get("kv_cache")}


def memory_plan(model: str | os.PathLike, *, target: str = DEFAULT_TARGET, dtype: str | None = None,
                quantization: str | None = None, group_size: int = 32, max_seq_len: int | None = None,
                tensor_parallel: int = 1, pipeline_stages: int = 1) -> dict[str, Any]:
    """Bytes per device (weights, KV cache per layer kind, workspace estimate) of MODEL built for TARGET
    with these options: `build.memory`. Needs no toolchain and builds nothing."""
    from .build.memory import plan_for  # noqa: PLC0415

    return plan_for(resolve_model(model), load_target(target), dtype=dtype, quantization=quantization,
                    group_size=group_size, max_seq_len=max_seq_len, tensor_parallel=tensor_parallel,
                    pipeline_stages=pipeline_stages)


def memory_fit(plan: dict[str, Any], device_memory: str | int) -> tuple[bool, str]:
    """Whether a memory plan fits devices of DEVICE_MEMORY bytes (or a size: '141GB' = 141e9 bytes,
    '80GiB' = 80 x 2^30), and one line saying so: the margin, or needed vs available and by how much."""
    from .build.memory import fit_line, parse_memory_size  # noqa: PLC0415

    size = device_memory if isinstance(device_memory, int) else parse_memory_size(device_memory)
    return fit_line(plan, size)


def memory_lines(plan: dict[str, Any]) -> list[str]:
    """A memory plan as text lines (weights, KV cache per layer kind, workspace, per device)."""
    from .build.memory import describe  # noqa: PLC0415

    return describe(plan)


def registry():
    """The library registry ($QCOMPILE_HOME): list, entry, verify, remove, gc."""
    from .registry import Registry  # noqa: PLC0415

    return Registry()


def parse_size(text: str) -> int:
    from .registry import parse_size as parse  # noqa: PLC0415

    return parse(text)


# --- measuring ---------------------------------------------------------------------------------------

def check(models: list[str], targets: list[str], *, workdir: str | os.PathLike, dtype: str | None = None,
          log: Log = print) -> list[dict[str, Any]]:
    """The cross-backend harness: build every (model, target), run what runs here, compare with
    transformers and the float32 CPU library against the target's tier."""
    from .measure.check import run  # noqa: PLC0415

    return run(models, targets, workdir=Path(workdir), dtype=dtype, log=log)


def bench(model: str | os.PathLike, *, target: str = DEFAULT_TARGET, vs: tuple[str, ...] = (),
          llama_quant: tuple[str, ...] = (), prompt_len: int = 128, decode_tokens: int = 32, repeats: int = 5,
          workdir: str | os.PathLike = "build/bench", skip: tuple[str, ...] = (), profile: bool = False,
          quantization: str | None = None, log: Log = print):
    """Speed side by side on this machine (see `measure.bench`). `vs`: also "torch" (transformers eager,
    torch.compile) and/or "llama.cpp" (llama-bench on a float32 GGUF of the same weights, plus the
    `llama_quant` types, e.g. ("q8_0", "q4_0")); `quantization`: the qcompile libraries' weight scheme (with
    llama.cpp, q8 adds Q8_0 and q4 adds Q4_0). Returns (report, table header, rows, profile tables:
    [(title, header, rows)] per profiled call when `profile`)."""
    from .measure import bench as benchmark  # noqa: PLC0415

    report = benchmark.bench(os.fspath(model), target=target, vs=tuple(vs), llama_quant=tuple(llama_quant),
                             prompt_len=prompt_len, decode_tokens=decode_tokens, repeats=repeats,
                             workdir=Path(workdir), skip=skip, profile=profile, quantization=quantization,
                             log=log)
    return report, *benchmark.table(report), benchmark.profile_rows(report)


def demo(model: str, *, workdir: str | os.PathLike, prompt_len: int, max_new_tokens: int, seed: int,
         target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """Compile, write random weights, generate with the library and with transformers, print both."""
    from .measure.demo import run_demo  # noqa: PLC0415

    return run_demo(model, workdir=Path(workdir), prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                    seed=seed, target=target)
