"""llama.cpp as a bench engine: its own `llama-bench` on the same weights, shapes and threads.

The tools: `llama-bench` and `llama-quantize`, built once from the llama.cpp tree that the
`llama-cpp-python` sdist vendors (PyPI carries it as source only: `pip download` is the one way in here),
cached under `$QCOMPILE_HOME/llama.cpp/<llama-cpp-python version>/` with the tree's vocab-only Qwen2 GGUF
(the tokenizer a GGUF needs). `QCOMPILE_LLAMA_CPP=DIR` uses an existing build instead. Nothing of
llama.cpp is in this repository.

The model: the bench's HF checkpoint written as a float32 GGUF (`gguf_export`), and quantized copies made
with `llama-quantize`, cached in `<checkpoint>-gguf/` beside the checkpoint and rewritten when it changes.

The figures: `llama-bench -p PROMPT -n DECODE -t THREADS -r REPEATS -o json`. Its `pp` test times a
prompt of PROMPT tokens in one batch (-> `prefill_seconds`), its `tg` test DECODE single-token steps from
an empty context (-> `decode_tokens_per_s`); both the median of the repeats, as the other engines report,
after llama-bench's own warm-up run. llama-bench's defaults stay as its users get them (and as the
issue's reference figures were taken): an f16 KV cache, flash attention on auto. Numerics checked by hand
(llama-debug --save-logits vs transformers in float64, random qwen2-0.5b): with an f32 KV cache and
flash attention off the last-token logits agree to 8.6e-6 of the logit scale (transformers' own float32:
1.1e-5); with the defaults, 7.8e-3 (the f16 cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..atomic import atomic_dir, atomic_path, write_json
from ..errors import UserError
from ..registry import home
from ..spec.model import ModelSpec
from .gguf_export import gguf_module, tensor_names, write_gguf

# The sdist whose vendored llama.cpp is built; pinned so every machine compares against the same code.
LLAMA_CPP_PYTHON = "0.3.36"
ENV = "QCOMPILE_LLAMA_CPP"
VOCAB = "ggml-vocab-qwen2.gguf"
TOOLS = ("llama-bench", "llama-quantize")
# Built with them, but not required of a build (caches from before it, $QCOMPILE_LLAMA_CPP trees): what
# `bench/concurrency.py` compares against (aggregate decode of several sequences at once).
BATCHED_BENCH = "llama-batched-bench"
# The notes' verified configuration, plus:
# - static libraries: the binaries carry no RPATH into the build tree and still run after it is removed;
# - no AMX kernels: on AMX CPUs (this build machine's included) this llama.cpp segfaults in
#   ggml_backend_amx_mul_mat on the first Q8_0/Q4_0 matmul (llama.cpp issue 20824, no fix upstream).
#   -march=native turns AMX on with explicit -m flags that would override a -mno-amx-*, but the kernels
#   are compiled under `#if __AMX_INT8__`, and -U removes that macro. Float32 never used AMX; quantized
#   types run on the AVX-512/AVX2 kernels and CPU repacking, as on any CPU without AMX.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
               "-DCMAKE_C_FLAGS=-U__AMX_INT8__", "-DCMAKE_CXX_FLAGS=-U__AMX_INT8__")
# `--llama-quant` name -> llama-quantize's type name.
QUANTS = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_0": "Q5_0", "q5_k_m": "Q5_K_M", "q4_0": "Q4_0",
          "q4_k_m": "Q4_K_M", "f16": "F16", "bf16": "BF16"}
ENGINE_PREFIX = "llama.cpp-"
# Seconds; under bench.ENGINE_TIMEOUT, which ends the child it runs in. A float32 7B model at -r 5 takes
# ~6 minutes on 2 cores.
BENCH_TIMEOUT = 850

Log = Callable[[str], None]


@dataclass(frozen=True)
class Tools:
    bench: Path
    quantize: Path
    vocab: Path  # the vocab-only GGUF holding Qwen2's tokenizer
    origin: str  # where they came from: the cache directory or $QCOMPILE_LLAMA_CPP
    batched_bench: Path | None = None  # llama-batched-bench, where the build has it


def engine_names(quants: tuple[str, ...]) -> tuple[str, ...]:
    """The bench engines for llama.cpp: float32, then each quantization asked for."""
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        raise UserError(f"--llama-quant: unknown type '{unknown[0]}'; choose from {', '.join(QUANTS)}")
    return (f"{ENGINE_PREFIX}f32", *(f"{ENGINE_PREFIX}{q}" for q in quants))


# --- the tools ---------------------------------------------------------------------------------------

def tools(log: Log = print) -> Tools:
    """llama-bench, llama-quantize and the Qwen2 vocab: from $QCOMPILE_LLAMA_CPP, else the cache (built
    on first use, which takes ~10 minutes on 2 cores)."""
    if os.environ.get(ENV):
        return _existing(Path(os.environ[ENV]))
    root = home() / "llama.cpp"
    final = root / LLAMA_CPP_PYTHON
    if not _complete(final):
        root.mkdir(parents=True, exist_ok=True)
        with _lock(root / f"{LLAMA_CPP_PYTHON}.lock"):
            if not _complete(final):  # another process may have built it while we waited
                _build(root, final, log)
    batched = final / "bin" / BATCHED_BENCH
    return Tools(final / "bin" / TOOLS[0], final / "bin" / TOOLS[1], final / VOCAB, str(final),
                 batched if batched.is_file() else None)


def _complete(directory: Path) -> bool:
    """A finished build with today's flags (one with other flags is rebuilt)."""
    try:
        record = json.loads((directory / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("cmake_flags") == list(CMAKE_FLAGS) and all((directory / "bin" / t).is_file() for t in TOOLS)


def _existing(directory: Path) -> Tools:
    """An existing llama.cpp build: the tools in DIR, DIR/bin or DIR/build/bin; the vocab in DIR's
    models/ (or its parents', when DIR is a build directory inside the tree)."""
    found = {}
    for tool in TOOLS:
        hits = [d / tool for d in (directory, directory / "bin", directory / "build" / "bin") if (d / tool).is_file()]
        if not hits:
            raise UserError(f"{ENV}={directory}: no {tool} in it, its bin/ or build/bin/")
        found[tool] = hits[0]
    places = [directory, directory / "models"] + [p / "models" for p in directory.parents[:2]]
    vocab = next((p / VOCAB for p in places if (p / VOCAB).is_file()), None)
    if vocab is None:
        raise UserError(f"{ENV}={directory}: no models/{VOCAB} in it or its parents (the llama.cpp tree has one)")
    batched = found[TOOLS[0]].parent / BATCHED_BENCH
    return Tools(found[TOOLS[0]], found[TOOLS[1]], vocab, f"{ENV}={directory}",
                 batched if batched.is_file() else None)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive across processes: one build at a time; the others wait and then find it built."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _require_toolchain() -> None:
    """cmake and a C/C++ compiler, checked before minutes of downloading and unpacking."""
    missing = [] if shutil.which("cmake") else ["cmake"]
    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    if missing:
        raise UserError(f"building llama.cpp needs {' and '.join(missing)} (e.g. apt-get install cmake g++), "
                        f"or set {ENV}=DIR to an existing llama.cpp build")


def _build(root: Path, final: Path, log: Log) -> None:
    """Download the sdist, unpack its llama.cpp tree, build the two tools, publish them with the vocab.
    The work directory survives a failure (a rerun resumes the compile) and is removed on success."""
    _require_toolchain()
    work = root / f"{LLAMA_CPP_PYTHON}.work"
    src = work / "src"
    start = time.monotonic()
    if not (src / "CMakeLists.txt").is_file():
        archive = _download(root / "sdist", log)
        log(f"llama.cpp: unpacking {archive.name}")
        _unpack(archive, src)
    log_file = work / "build.log"
    log(f"llama.cpp: configuring with cmake (full log: {log_file})")
    with open(log_file, "w", buffering=1) as out:  # line-buffered: the log is readable while it builds
        _run_logged(["cmake", "-S", str(src), "-B", str(src / "build"), *CMAKE_FLAGS], out, log_file, log)
        jobs = str(len(os.sched_getaffinity(0)))
        log(f"llama.cpp: building {' and '.join(TOOLS)} with {jobs} jobs (~10 minutes on 2 cores, once)")
        _run_logged(["cmake", "--build", str(src / "build"), "-j", jobs, "--target", *TOOLS, BATCHED_BENCH],
                    out, log_file, log, percent=True)
    seconds = time.monotonic() - start
    with atomic_dir(final, replaceable=lambda d: not _complete(d)) as tmp:
        (tmp / "bin").mkdir()
        for tool in (*TOOLS, BATCHED_BENCH):
            shutil.copy2(src / "build" / "bin" / tool, tmp / "bin" / tool)
        shutil.copy2(src / "models" / VOCAB, tmp / VOCAB)
        write_json(tmp / "build.json", {"llama_cpp_python": LLAMA_CPP_PYTHON, "cmake_flags": list(CMAKE_FLAGS),
                                        "build_seconds": round(seconds, 1), "machine": platform.machine(),
                                        "built": time.strftime("%Y-%m-%dT%H:%M:%S")})
    shutil.rmtree(work, ignore_errors=True)
    log(f"llama.cpp: built in {seconds / 60:.1f} min -> {final}")


def _download(sdists: Path, log: Log) -> Path:
    """The sdist, kept (77 MB) so that a rebuild with other flags needs no network."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not (sdists / name).is_file():
        log(f"llama.cpp: downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (~77 MB) with pip")
        sdists.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(sdists)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0 or not (sdists / name).is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} failed: {last}")
    return sdists / name


def _unpack(archive: Path, src: Path) -> None:
    """Only the vendored tree (`<sdist>/vendor/llama.cpp/...`), into `src`."""
    marker = "/vendor/llama.cpp/"
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            if marker in member.name:
                member.name = member.name.split(marker, 1)[1]
                members.append(member)
        if not members:
            raise UserError(f"{archive}: no vendor/llama.cpp tree in it")
        tar.extractall(src, members=members, filter="data")


def _run_logged(command: list[str], out: TextIO, log_file: Path, log: Log, percent: bool = False) -> None:
    """Run a build step with its output in the log file; with `percent`, cmake's progress every 10%.
    A failure is one line: the step, the first compiler error, and the log's path."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shown, first_error = -10, None
    for line in proc.stdout:
        out.write(line)
        if first_error is None and re.search(r"\berror\b", line, re.IGNORECASE):
            first_error = line.strip()
        match = re.match(r"\[\s*(\d+)%\]", line) if percent else None
        if match and int(match[1]) >= shown + 10:
            shown = int(match[1]) // 10 * 10
            log(f"llama.cpp: build {match[1]}%")
    if proc.wait() != 0:
        raise UserError(f"llama.cpp build failed at '{' '.join(command[:2])}': "
                        f"{first_error or 'exit status ' + str(proc.returncode)} (log: {log_file})")


# --- the model files ---------------------------------------------------------------------------------

def check_model(spec: ModelSpec) -> None:
    """A one-line error unless `spec` is a model the GGUF writer handles (a qwen2 decoder)."""
    if not spec.kind.has_sequence:
        raise UserError(f"{spec.name}: --vs llama.cpp compares decoders; this is an encoder")
    tensor_names(spec)  # names the family when it is not qwen2; needs the gguf package


def tensor_bytes(gguf_file: Path) -> int:
    """The bytes of a GGUF's tensors (what a decode step reads), from its header."""
    return sum(int(t.n_bytes) for t in gguf_module().GGUFReader(gguf_file).tensors)


def model_files(spec: ModelSpec, checkpoint: Path, quants: tuple[str, ...], found: Tools,
                log: Log = print) -> dict[str, Path]:
    """engine name -> its GGUF, written or quantized only when the checkpoint changed since."""
    check_model(spec)  # before anything is written
    directory = checkpoint.parent / f"{checkpoint.name}-gguf"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot write the GGUF files beside the checkpoint ({e.strerror})") from None
    stamp_file = directory / "source.json"
    stamp = _source_stamp(checkpoint, found)
    current = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
    f32 = directory / "f32.gguf"
    if current != stamp or not f32.is_file():
        for old in directory.glob("*.gguf"):  # made from other weights
            old.unlink()
        log(f"llama.cpp: writing {f32} (float32 GGUF of {checkpoint})")
        write_gguf(spec, checkpoint, f32, vocab=found.vocab, log=log)
        write_json(stamp_file, stamp)
    files = {f"{ENGINE_PREFIX}f32": f32}
    for quant in quants:
        target = directory / f"{quant}.gguf"
        if not target.is_file():
            log(f"llama.cpp: llama-quantize {QUANTS[quant]} -> {target}")
            _quantize(found, f32, target, quant)
        files[f"{ENGINE_PREFIX}{quant}"] = target
    return files


def _source_stamp(checkpoint: Path, found: Tools) -> dict[str, Any]:
    """What the GGUFs were made from: the checkpoint's files, the vocab and llama-quantize (each as name,
    size, mtime): another build of the tools may quantize differently."""
    def identity(p: Path, name: str) -> list:
        return [name, p.stat().st_size, p.stat().st_mtime_ns]

    files = sorted(p for p in checkpoint.iterdir() if p.suffix in (".json", ".safetensors"))
    return {"checkpoint": [identity(p, p.name) for p in files],  # names: the same from any directory
            "vocab": identity(found.vocab, str(found.vocab.resolve())),
            "quantize": identity(found.quantize, str(found.quantize.resolve()))}


def _quantize(found: Tools, f32: Path, target: Path, quant: str) -> None:
    with atomic_path(target) as tmp:
        done = subprocess.run([str(found.quantize), str(f32), str(tmp), QUANTS[quant],
                               str(len(os.sched_getaffinity(0)))], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
            raise UserError(f"llama-quantize {QUANTS[quant]} failed: {last}")


# --- the measurement (in the bench's child process) ------------------------------------------------

def _run_tool(command: list[str], name: str, gguf: str | Path) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool on `gguf` within BENCH_TIMEOUT; a one-line UserError if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BENCH_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"{name} did not finish in {BENCH_TIMEOUT} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{name} failed on {gguf}: {last}")
    return done


def run_bench(*, llama_bench: str, gguf: str, prompt_len: int, decode_tokens: int, repeats: int,
              threads: int) -> dict[str, Any]:
    """llama-bench's figures in the bench's terms, with llama-bench's own peak RSS."""
    done = _run_tool([llama_bench, "-m", gguf, "-p", str(prompt_len), "-n", str(decode_tokens),
                      "-t", str(threads), "-r", str(repeats), "-o", "json"], "llama-bench", gguf)
    figures = parse_bench_json(done.stdout, prompt_len=prompt_len, decode_tokens=decode_tokens)
    # This process's only child was llama-bench, so the children's peak RSS is its own. (The kernel
    # carries the spawning process's peak across exec, so it is at least this Python's: ~40 MB.)
    figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return figures


def run_batched_bench(*, tool: Path, gguf: Path, prompt_len: int, decode_tokens: int, streams: list[int],
                      threads: int) -> list[dict[str, Any]]:
    """`llama-batched-bench`: for each count of sequences B, B prompts of prompt_len tokens (one batch),
    then decode_tokens steps decoding all B at once. Per B: {"streams", "prefill_seconds" (all B
    prompts), "decode_tokens_per_s" (aggregate over the B sequences)}. Its defaults stay (f16 KV cache,
    flash attention auto), as for llama-bench."""
    context = max(streams) * (prompt_len + decode_tokens)
    done = _run_tool([str(tool), "-m", str(gguf), "-c", str(context), "-b", "2048", "-ub", "512",
                      "-npp", str(prompt_len), "-ntg", str(decode_tokens), "-npl", ",".join(map(str, streams)),
                      "-t", str(threads), "--output-format", "jsonl"], BATCHED_BENCH, gguf)
    rows = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    if sorted(r["pl"] for r in rows) != sorted(streams):
        raise UserError(f"llama-batched-bench printed results for {[r['pl'] for r in rows]}, asked {streams}")
    return [{"streams": r["pl"], "prefill_seconds": r["t_pp"], "decode_tokens_per_s": r["speed_tg"]} for r in rows]


def parse_bench_json(text: str, *, prompt_len: int, decode_tokens: int) -> dict[str, Any]:
    """`llama-bench -o json` (a list of tests, each with `samples_ns`) -> prefill_seconds for the
    prompt test and decode_tokens_per_s for the generation test, medians of the repeats."""
    try:
        tests = json.loads(text[text.index("["):])
    except ValueError:
        raise UserError(f"llama-bench printed no JSON result: {text.strip()[:200]!r}") from None
    prefill = [t for t in tests if t.get("n_prompt") == prompt_len and t.get("n_gen") == 0]
    decode = [t for t in tests if t.get("n_gen") == decode_tokens and t.get("n_prompt") == 0]
    if not prefill or not decode:
        raise UserError(f"llama-bench output lacks the pp{prompt_len} or tg{decode_tokens} test")
    prefill_s = statistics.median(prefill[0]["samples_ns"]) / 1e9
    decode_s = statistics.median(decode[0]["samples_ns"]) / 1e9
    first = prefill[0]
    return {"prefill_seconds": prefill_s, "decode_tokens_per_s": decode_tokens / decode_s,
            "llama_cpp": {key: first.get(key) for key in ("build_commit", "build_number", "model_type",
                                                          "model_size", "n_threads", "type_k", "type_v",
                                                          "flash_attn", "cpu_info")}}
