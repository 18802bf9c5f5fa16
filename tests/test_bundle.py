"""`qcompile bundle` and runtime-only loading.

A fresh venv holding only the bundle's requirements.txt (and what they need) — no apache-tvm, so
`import tvm` fails there — runs a CPU library through the bundle's launchers and through `qcompile.load`
with logits identical to the full install's, on TVM's runtime libraries alone (libtvm_compiler.so is never
mapped). The venv borrows the packages already installed here: a .pth file names a directory of symlinks
to exactly those distributions, so nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest

from qcompile import api
from qcompile.cli import main
from qcompile.deploy import bundle as bundles
from qcompile.deploy import shared_objects
from qcompile.run import tvm_runtime

PROMPT_IDS = "3 14 15 92 65 35 89 79 32 38"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]


def _distributions(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `names` need, transitively (extras left out; an optional dependency
    that is not installed here is skipped)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        key = _name(todo.pop()).lower().replace("_", "-")
        if key in found:
            continue
        try:
            found[key] = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue
        todo += [r for r in found[key].requires or [] if "extra ==" not in r]
    return list(found.values())


def _link_site(distributions: list[metadata.Distribution], directory: Path) -> None:
    """A site directory of symlinks to these distributions' top-level files (packages, modules,
    dist-info) and nothing else."""
    directory.mkdir()
    for distribution in distributions:
        tops = {f.parts[0] for f in distribution.files or () if f.parts[0] != ".."}
        for top in tops:
            source = Path(str(distribution.locate_file(top)))
            if source.exists() and not (directory / top).exists() and not top.endswith(".pth"):
                (directory / top).symlink_to(source)


def _run(command: list, cwd: Path = Path("/")) -> subprocess.CompletedProcess:
    """Run outside the checkout (a `python -c` imports from its working directory)."""
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, cwd=cwd)


def _fake_device_library(library: Path, where: Path, device: str, arch: str) -> Path:
    """A copy of a CPU library whose manifest says it was built for another device (the bundle and the
    runtime decide from the manifest, before the shared object is opened)."""
    copy = shutil.copytree(library, where)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"].update(device=device, arch=arch, name=f"{device}-{arch}")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, debug_library, text_library) -> tuple[Path, dict, list[str]]:
    out, lines = tmp_path_factory.mktemp("deploy") / "bundle", []
    record = api.bundle([debug_library, text_library], out=out, log=lines.append)
    return out, record, lines


@pytest.fixture(scope="module")
def deploy_python(tmp_path_factory, bundle) -> Path:
    """A fresh venv's python that sees only the bundle's requirements (and their dependencies)."""
    root = tmp_path_factory.mktemp("deploy-venv")
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"]).check_returncode()
    python = root / "venv" / "bin" / "python"
    requirements = [line for line in (bundle[0] / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    _link_site(_distributions(requirements), root / "site")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "bundle-requirements.pth").write_text(f"{root / 'site'}\n")
    return python


def test_the_deploy_venv_has_no_tvm_and_no_qcompile(deploy_python):
    for module in ("tvm", "qcompile", "torch", "transformers"):
        result = _run([deploy_python, "-c", f"import {module}"])
        assert result.returncode != 0 and f"No module named '{module}'" in result.stderr, module
    assert _run([deploy_python, "-c", "import tvm_ffi, numpy, safetensors, tokenizers, fastapi"]).returncode == 0


def test_bundle_layout_requirements_and_size(bundle, debug_library, text_library):
    out, record, lines = bundle
    assert record["format"] == bundles.FORMAT and bundles.is_bundle_dir(out)
    assert sorted(p.name for p in (out / "libraries").iterdir()) == sorted([debug_library.name, text_library.name])
    assert record["libraries"][debug_library.name] == {"model": "qwen2-debug", "target": "cpu", "device": "cpu",
                                                       "dtype": "float32"}
    for name in record["libraries"]:
        assert sorted(p.name for p in (out / "libraries" / name).iterdir()) == ["manifest.json", "model.so"]
    assert sorted(p.name for p in (out / "runtime").iterdir()) == [
        "libtvm_runtime.so", "libtvm_runtime_extra.so", "tvm-runtime.json"]  # CPU only: no CUDA runtime
    assert json.loads((out / "runtime" / "tvm-runtime.json").read_text())["tvm"] == tvm_runtime.runtime().version
    requirements = (out / "requirements.txt").read_text()
    assert "apache-tvm-ffi==0.1.14.post1" in requirements and "apache-tvm==" not in requirements
    assert {"numpy", "safetensors", "tokenizers", "jinja2", "fastapi", "uvicorn"} <= {
        _name(line).lower() for line in requirements.splitlines() if not line.startswith("#")}
    python = {p.relative_to(out / "python" / "qcompile").as_posix() for p in (out / "python").rglob("*.py")}
    assert {"run/runtime.py", "run/tvm_runtime.py", "build/library.py", "cli/run.py", "cli/serve.py"} <= python
    compiler_side = [p for p in python if re.match(r"(build/(?!library|__init__)|tune/|measure/|models/layers"
                                                   r"|models/.*_graph|registry|cli/compile)", p)]
    assert compiler_side == []
    for launcher in bundles.LAUNCHERS:
        assert (out / launcher).stat().st_mode & 0o111
    beside = record["bytes"]["runtime"] + record["bytes"]["python"]
    assert beside <= 30e6 and "beside them" in lines[0] and "MiB" in lines[0]


def test_bundle_runs_a_library_with_the_full_installs_logits(bundle, deploy_python, debug_library,
                                                              debug_checkpoint, tmp_path, capsys):
    assert main(["run", str(debug_library), "--weights", str(debug_checkpoint), "--prompt-ids", PROMPT_IDS,
                 "--max-new-tokens", "8", "--logits-out", str(tmp_path / "full.npy"), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    deployed = _run([deploy_python, bundle[0] / "qcompile-run", bundle[0] / "libraries" / debug_library.name,
                     "--weights", debug_checkpoint, "--prompt-ids", PROMPT_IDS, "--max-new-tokens", "8",
                     "--logits-out", tmp_path / "deployed.npy", "--json"], cwd=tmp_path)
    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(deployed.stdout)["generated_ids"] == full["generated_ids"]
    np.testing.assert_array_equal(np.load(tmp_path / "deployed.npy"), np.load(tmp_path / "full.npy"))


def test_load_in_the_deploy_venv_uses_the_runtime_libraries_alone(bundle, deploy_python, debug_library,
                                                                  debug_checkpoint, tmp_path):
    """qcompile.load from the bundle's Python part: no `import tvm`, libtvm_compiler.so never mapped,
    the bundle's runtime loaded; prefill and decode as in the full install."""
    out = bundle[0]
    script = f"""
import json, os, sys
os.environ["{tvm_runtime.RUNTIME_DIR}"] = {str(out / "runtime")!r}
sys.path.insert(0, {str(out / "python")!r})
import numpy as np, qcompile
from qcompile.run.tvm_runtime import runtime
model = qcompile.load({str(out / "libraries" / debug_library.name)!r}, weights={str(debug_checkpoint)!r})
np.save("prefill.npy", model.prefill([{PROMPT_IDS.replace(" ", ", ")}]))
np.save("decode.npy", model.decode(7))
maps = open("/proc/self/maps").read()
print(json.dumps({{"tvm": "tvm" in sys.modules, "compiler": "libtvm_compiler" in maps,
                  "runtime": {str(out / "runtime" / "libtvm_runtime.so")!r} in maps, "source": runtime().source}}))
"""
    result = _run([deploy_python, "-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts == {"tvm": False, "compiler": False, "runtime": True,
                     "source": f"runtime libraries in {out / 'runtime'}"}
    import qcompile

    model = qcompile.load(debug_library, weights=debug_checkpoint)  # full TVM in this process
    np.testing.assert_array_equal(np.load(tmp_path / "prefill.npy"),
                                  model.prefill([int(i) for i in PROMPT_IDS.split()]))
    np.testing.assert_array_equal(np.load(tmp_path / "decode.npy"), model.decode(7))


def test_every_bundled_module_imports_in_the_deploy_venv(bundle, deploy_python):
    """requirements.txt covers what the bundled Python part imports (nothing of it needs TVM's compiler)."""
    root = bundle[0] / "python"
    modules = sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                     for p in root.rglob("*.py"))
    script = f"import importlib, sys; sys.path.insert(0, {str(root)!r})\n" \
             f"for m in {modules!r}: importlib.import_module(m)\nprint('tvm' in sys.modules)"
    result = _run([deploy_python, "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_bundle_text_chat_and_serve_launchers(bundle, deploy_python, text_library, text_checkpoint, tmp_path,
                                              capsys):
    """qcompile-run --prompt --chat (tokenizers, the chat template) gives the full install's text;
    qcompile-chat replies from stdin as the model's chat does; qcompile-serve answers a completion and
    stops on Ctrl-C."""
    args = ["--weights", str(text_checkpoint), "--prompt", "Hello", "--chat", "--max-new-tokens", "4", "--json"]
    assert main(["run", str(text_library), *args]) == 0
    full = json.loads(capsys.readouterr().out)
    library = bundle[0] / "libraries" / text_library.name
    deployed = _run([deploy_python, bundle[0] / "qcompile-run", library, *args], cwd=tmp_path)
    assert deployed.returncode == 0, deployed.stderr
    assert {k: v for k, v in json.loads(deployed.stdout).items() if "seconds" not in k and "per_s" not in k} == \
        {k: v for k, v in full.items() if "seconds" not in k and "per_s" not in k}

    chat = subprocess.run([str(deploy_python), str(bundle[0] / "qcompile-chat"), str(library), "--weights",
                           str(text_checkpoint), "--max-new-tokens", "4"], input="Hello\n", capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == f"> {full['text']}\n> \n"  # the same greedy reply to the same single message

    server = subprocess.Popen([str(deploy_python), str(bundle[0] / "qcompile-serve"), str(library), "--weights",
                               str(text_checkpoint), "--port", "0"], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = server.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/v1 ", line)
        assert url, line
        answer = httpx.post(url.group(1) + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                                    "temperature": 0}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_library_for_a_device_the_bundle_cannot_run_is_refused_when_loading(bundle, deploy_python, debug_library,
                                                                             debug_checkpoint, tmp_path):
    cuda = _fake_device_library(debug_library, tmp_path / "cuda", "cuda", "sm_90")
    result = _run([deploy_python, bundle[0] / "qcompile-run", cuda, "--weights", debug_checkpoint,
                   "--prompt-ids", "1 2"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "built for cuda sm_90; this TVM runtime cannot load cuda code (no " \
        f"libtvm_runtime_cuda.so in {bundle[0] / 'runtime'})" in result.stderr
    model = _run([deploy_python, bundle[0] / "qcompile-run", "qwen2-debug", "--weights", debug_checkpoint,
                  "--prompt-ids", "1 2"])
    assert model.returncode == 2 and "runtime-only (a deploy bundle): give a library directory" in model.stderr


def test_bundling_for_a_device_without_its_runtime_library_is_refused(debug_library, tmp_path, capsys):
    rocm = _fake_device_library(debug_library, tmp_path / "rocm", "rocm", "gfx942")
    assert main(["bundle", str(debug_library), str(rocm), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{rocm}: built for rocm, but this TVM install has no " \
        "libtvm_runtime_rocm.so" in err
    assert not (tmp_path / "out").exists()


def test_a_cuda_bundle_carries_the_cuda_runtime_within_the_size_target(debug_library, tmp_path, capsys):
    """CPU + CUDA runtime beside the libraries: at most 30 MB (libcudart comes along; the driver does not)."""
    cudart = shared_objects.find("libcudart.so.13", tvm_runtime.installed_runtime_files().directory)
    if cudart is None:
        pytest.skip("no CUDA 13 runtime (libcudart.so.13) on this machine to bundle")
    cuda = _fake_device_library(debug_library, tmp_path / "cuda", "cuda", "sm_90")
    assert main(["bundle", str(debug_library), str(cuda), "-o", str(tmp_path / "out"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["runtime"] == ["libcudart.so.13", "libtvm_runtime.so", "libtvm_runtime_cuda.so",
                                 "libtvm_runtime_extra.so", "tvm-runtime.json"]
    assert record["bytes"]["runtime"] + record["bytes"]["python"] <= 30e6
    print(f"CPU + CUDA bundle beside the libraries: "
          f"{(record['bytes']['runtime'] + record['bytes']['python']) / 2**20:.1f} MiB", file=sys.stderr)


def test_bundle_bad_input(debug_library, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [(["bundle", str(tmp_path / "nope"), "-o", str(tmp_path / "b")], "library directory not found"),
             (["bundle", str(debug_library), "-o", str(taken)], "exists and is not a previous qcompile output"),
             (["bundle", str(debug_library), str(shutil.copytree(debug_library, tmp_path / "x" / debug_library.name)),
               "-o", str(tmp_path / "b")], "a second library named"),
             (["bundle", "-o", str(tmp_path / "b")], "the following arguments are required: LIBRARY")]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "b").exists()
    assert main(["bundle", str(debug_library), "-o", str(tmp_path / "b")]) == 0  # a bundle may replace a bundle
    assert main(["bundle", str(debug_library), "-o", str(tmp_path / "b")]) == 0
    assert "1 library" in capsys.readouterr().out
