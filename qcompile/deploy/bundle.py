"""`qcompile bundle`: a self-contained folder that runs built libraries on a machine without TVM's compiler.

  qcompile-run, qcompile-chat, qcompile-serve   launchers: `qcompile run` / `chat` / `serve`, same arguments
  requirements.txt      the Python packages to install beside it (apache-tvm-ffi, numpy, ...; no apache-tvm)
  libraries/NAME/       each library as `compile` wrote it (model.so + manifest.json)
  runtime/              TVM's runtime shared objects, the non-system libraries they link (libcudart for
                        CUDA), and tvm-runtime.json naming their TVM (`run.tvm_runtime` reads it)
  python/qcompile/      the runtime part of qcompile: no build/ (but the library format), tune/, measure/,
                        nor the models' Relax graphs
  bundle.json, README.txt

The launchers point `$QCOMPILE_TVM_RUNTIME` at runtime/ and put python/ first on the path, so a bundle uses
its own runtime even where a full TVM is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir
from ..build.library import LIBRARY, MANIFEST, read_manifest, sha256_file
from ..errors import UserError
from ..run import tvm_runtime
from . import shared_objects

FORMAT = "qcompile-bundle/1"
RECORD = "bundle.json"
LIBRARIES, RUNTIME, PYTHON = "libraries", "runtime", "python"

# The runtime part of the qcompile package, as globs under it; a glob's files minus EXCLUDED. Whatever is
# not listed stays out: the compiler side (build/ but the library format, tune/, measure/, the models'
# Relax graphs and blocks), the other commands, the committed tuning databases.
PACKAGE_FILES = ("__init__.py", "api.py", "errors.py", "atomic.py", "units.py", "spec/*.py", "models/*.py",
                 "run/*.py", "serve/*.py", "build/__init__.py", "build/library.py", "cli/__init__.py", "cli/common.py",
                 "cli/sampling.py", "cli/run.py", "cli/chat.py", "cli/serve.py", "data/__init__.py",
                 "data/*.yaml", "data/targets/*.yaml",
                 # what the loader reads quantized weights with (not the kernels: TVM's compiler)
                 "quant/__init__.py", "quant/schemes.py", "quant/policy.py", "quant/choice.py")
# The models' Relax code (blocks, paged attention, graphs, rows16 modules): TVM's compiler.
EXCLUDED = re.compile(r"^models/(layers|packing|paged|.*_graph)\.py$")

# Launcher -> the qcompile command it is.
LAUNCHERS = {"qcompile-run": "run", "qcompile-chat": "chat", "qcompile-serve": "serve"}
LAUNCHER = '''#!/usr/bin/env python3
"""{name}: `qcompile {command}` from this bundle, on the TVM runtime libraries beside it (no compiler).
The Python packages of requirements.txt must be installed (python3 -m pip install -r requirements.txt)."""
import os
import sys

here = os.path.dirname(os.path.realpath(__file__))
os.environ["{variable}"] = os.path.join(here, "{runtime}")  # this bundle's runtime, whatever else is installed
sys.path.insert(0, os.path.join(here, "{python}"))

from qcompile.cli import command_main  # noqa: E402

sys.exit(command_main("{command}", "{name}"))
'''

# Distribution names (as pyproject spells them) of what the bundle's Python part imports, per need; their
# version specifiers come from qcompile's own dependencies.
REQUIREMENTS = {
    "always": ("apache-tvm-ffi", "numpy", "safetensors", "ml_dtypes", "pyyaml"),
    "decoder": ("tokenizers", "jinja2", "fastapi", "uvicorn"),  # text, chat templates, serve
    "encoder": ("pillow",),  # image preprocessing
}


def _dependency_specs() -> dict[str, str]:
    """qcompile's dependencies, name -> requirement line: from pyproject.toml in a source checkout (an
    editable install's metadata goes stale), else from the installed distribution's metadata."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    lines: list[str] | None = None
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "qcompile":
            lines = project.get("dependencies", [])
    if lines is None:
        lines = [r for r in metadata.requires("qcompile") or [] if "extra ==" not in r]
    return {re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower(): line for line in lines}


def requirements(kinds: set[str]) -> list[str]:
    specs = _dependency_specs()
    names = [*REQUIREMENTS["always"], *(n for kind in sorted(kinds) for n in REQUIREMENTS.get(kind, ()))]
    missing = [n for n in names if n.lower() not in specs]
    if missing:
        raise UserError(f"qcompile's dependencies do not list {missing[0]} (needed in a bundle)")
    return [specs[n.lower()] for n in names]


def package_files(package: Path) -> list[Path]:
    """The runtime part of the qcompile package at `package`, relative paths."""
    files = {p.relative_to(package) for pattern in PACKAGE_FILES for p in package.glob(pattern)}
    return sorted(p for p in files if not EXCLUDED.match(p.as_posix()))


def is_bundle_dir(path: Path) -> bool:
    """A folder `qcompile bundle` wrote (so `bundle -o` may replace it)."""
    try:
        return json.loads((Path(path) / RECORD).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _runtime_files(devices: set[str], where: dict[str, str]) -> tuple[tvm_runtime.RuntimeFiles, list[Path]]:
    """The installed TVM's runtime libraries the devices need (and the extra library: sort/top-k), checked
    present here: a device without its runtime library is a UserError naming a library built for it."""
    files = tvm_runtime.installed_runtime_files()
    names = [tvm_runtime.RUNTIME_LIBRARY, tvm_runtime.EXTRA_LIBRARY]
    names += [tvm_runtime.DEVICE_LIBRARY[d] for d in sorted(devices) if d != "cpu"]
    for name in names:
        if not (files.directory / name).is_file():
            device = next((d for d, n in tvm_runtime.DEVICE_LIBRARY.items() if n == name), "cpu")
            who = where.get(device, "every library")
            raise UserError(f"{who}: built for {device}, but this TVM install has no {name} in "
                            f"{files.directory}, so the bundle could not run it")
    return files, [files.directory / name for name in names]


def _write_launcher(path: Path, command: str) -> None:
    path.write_text(LAUNCHER.format(name=path.name, command=command, variable=tvm_runtime.RUNTIME_DIR,
                                    runtime=RUNTIME, python=PYTHON))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def bundle(libraries: list[Path], out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the deploy folder OUT (atomic) for LIBRARIES; returns its bundle.json record."""
    if not libraries:
        raise UserError("bundle: give at least one library directory")
    manifests: dict[str, tuple[Path, dict[str, Any]]] = {}
    for directory in map(Path, libraries):
        manifest = read_manifest(directory)
        name = directory.resolve().name
        if name in manifests:
            raise UserError(f"{directory}: a second library named {name!r}; rename one directory")
        manifests[name] = (directory, manifest)
    where = {m["target"]["device"]: str(d) for d, m in manifests.values()}
    runtime_files, runtime_libraries = _runtime_files(set(where), where)
    linked = shared_objects.closure(runtime_libraries)
    kinds = {_kind(manifest) for _, manifest in manifests.values()}
    package = Path(__file__).resolve().parents[1]

    with atomic_dir(Path(out), replaceable=is_bundle_dir) as tmp:
        for name, (directory, manifest) in manifests.items():
            target = tmp / LIBRARIES / name
            target.mkdir(parents=True)
            shutil.copy2(directory / MANIFEST, target / MANIFEST)
            shutil.copy2(directory / manifest["library"]["file"], target / LIBRARY)
            if sha256_file(target / LIBRARY) != manifest["library"]["sha256"]:  # never ship a damaged one
                raise UserError(f"{directory}: {LIBRARY} does not match its manifest's sha256; rebuild it")
        (tmp / RUNTIME).mkdir()
        for name, path in [*((p.name, p) for p in runtime_libraries), *linked.items()]:
            shutil.copy2(path, tmp / RUNTIME / name)  # under the name that links it (a symlink's, too)
        (tmp / RUNTIME / tvm_runtime.RECORD).write_text(json.dumps(
            {"tvm": runtime_files.version, "tvm_build": runtime_files.build}, indent=2) + "\n")
        for relative in package_files(package):
            (tmp / PYTHON / "qcompile" / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package / relative, tmp / PYTHON / "qcompile" / relative)
        (tmp / "requirements.txt").write_text(
            "# The Python packages this bundle's launchers import (no apache-tvm: TVM's runtime is in runtime/)\n"
            + "".join(f"{line}\n" for line in requirements(kinds)))
        for launcher, command in LAUNCHERS.items():
            _write_launcher(tmp / launcher, command)
        sizes = {part: _size(tmp / part) for part in (LIBRARIES, RUNTIME, PYTHON)}
        record = {"format": FORMAT, "tvm": runtime_files.version, "tvm_build": runtime_files.build,
                  "libraries": {name: {"model": m["model"]["name"], "target": m["target"]["name"],
                                       "device": m["target"]["device"], "dtype": m["dtype"]}
                                for name, (_, m) in manifests.items()},
                  "runtime": sorted(p.name for p in (tmp / RUNTIME).iterdir()), "bytes": sizes}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.txt").write_text(_readme(record))
    mib = {part: size / 2**20 for part, size in sizes.items()}
    shared = [name for name in record["runtime"] if ".so" in name]
    log(f"bundle {out}: {len(manifests)} librar{'y' if len(manifests) == 1 else 'ies'} {mib[LIBRARIES]:.1f} MiB; "
        f"beside them {mib[RUNTIME] + mib[PYTHON]:.1f} MiB (TVM runtime {mib[RUNTIME]:.1f} MiB: "
        f"{', '.join(shared)}; Python {mib[PYTHON]:.1f} MiB)")
    return record


def _kind(manifest: dict[str, Any]) -> str:
    from ..spec.model import ModelSpec  # noqa: PLC0415

    return ModelSpec.from_manifest(manifest).kind.name


def _readme(record: dict[str, Any]) -> str:
    first = next(iter(record["libraries"]))
    return (f"A qcompile deploy bundle: built libraries and TVM {record['tvm']}'s runtime, no compiler.\n\n"
            "  python3 -m venv venv && venv/bin/pip install -r requirements.txt\n"
            f"  venv/bin/python qcompile-run {LIBRARIES}/{first} --weights CHECKPOINT --prompt-ids '1 2 3'\n"
            f"  venv/bin/python qcompile-serve {LIBRARIES}/{first} --weights CHECKPOINT --port 8000\n\n"
            "The launchers take the arguments of `qcompile run`, `qcompile chat` and `qcompile serve`; --help "
            "lists them. Libraries: " + ", ".join(f"{n} ({v['model']}, {v['target']})"
                                                   for n, v in record["libraries"].items()) + ".\n")
