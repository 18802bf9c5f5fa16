"""qcompile as an installed package: its data (zoo, targets, tolerance tiers, schedules) ships inside it and
is found from any directory; a user adds their own zoo, targets and schedules; nothing committed holds a
build machine's paths."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from qcompile.data import package_data

REPO = Path(__file__).resolve().parent.parent


def test_every_package_data_pattern_names_files_that_exist():
    """pyproject's package-data globs each match files (a pattern naming nothing ships nothing)."""
    package_data_globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in package_data_globs.items():
        root = REPO / package.replace(".", "/")
        for pattern in patterns:
            assert glob.glob(str(root / pattern)), f"{package}: {pattern} matches nothing"


def test_committed_tuning_reports_hold_no_machine_paths():
    reports = sorted((package_data() / "schedules").glob("*/*/report.json"))
    assert reports
    for path in reports:
        text = path.read_text()
        assert "/work/" not in text and "/home/" not in text and "/root/" not in text, path
        assert "directory" not in json.loads(text), path


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of this checkout installed into a fresh venv outside it. The venv borrows the already
    installed dependencies (TVM, numpy, ...) through a .pth line instead of downloading them again;
    qcompile itself comes only from the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("qcompile-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies only: the checkout's editable install is a .pth *in* that directory, which Python
    # does not process for a directory added this way.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    return venv


def _qcompile(venv: Path, cwd: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([venv / "bin" / "qcompile", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_wheel_install_works_from_another_directory(installed, tmp_path):
    where = subprocess.run([installed / "bin" / "python", "-c", "import qcompile; print(qcompile.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(installed) in where and str(REPO) not in where  # the wheel's copy, not the checkout
    zoo = _qcompile(installed, tmp_path, "zoo", "list")
    assert zoo.returncode == 0 and "qwen2-debug" in zoo.stdout, zoo.stderr
    targets = _qcompile(installed, tmp_path, "targets", "list", "--json")
    assert targets.returncode == 0 and {"cpu", "cuda-sm90"} <= set(json.loads(targets.stdout)), targets.stderr
    built = _qcompile(installed, tmp_path, "compile", "qwen2-debug", "-o", "lib", "--max-seq-len", "32")
    assert built.returncode == 0, built.stderr
    assert "schedules: " in built.stderr and "qcompile/data/schedules/cpu" in built.stderr  # shipped databases
    assert _qcompile(installed, tmp_path, "init-weights", "qwen2-debug", "-o", "ckpt").returncode == 0
    ran = _qcompile(installed, tmp_path, "run", "lib", "--weights", "ckpt", "--prompt-ids", "1 2 3",
                    "--max-new-tokens", "3", "--json")
    assert ran.returncode == 0, ran.stderr
    assert len(json.loads(ran.stdout)["generated_ids"]) == 3


def test_user_zoo_and_targets_are_added_to_the_shipped_ones(tmp_path, monkeypatch):
    zoo = tmp_path / "my-zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": {"my-qwen": {
        "family": "qwen2", "description": "mine", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64}}}))
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "my-cpu.yaml").write_text(yaml.safe_dump({
        "description": "portable AVX2", "device": "cpu", "dtype": "float32", "requires_features": ["avx2"],
        "target": {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "haswell"}}))
    env = {**os.environ, "QCOMPILE_ZOO": str(zoo), "QCOMPILE_TARGETS": str(targets)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qcompile", *args], capture_output=True, text=True, env=env)

    models = [m["name"] for m in json.loads(cli("zoo", "list", "--json").stdout)]
    assert "my-qwen" in models and "qwen2-debug" in models  # added, not replaced
    listed = json.loads(cli("targets", "list", "--json").stdout)
    assert "my-cpu" in listed and "cpu" in listed
    # the shared tolerance tiers apply to a target file that states none
    from qcompile.spec.target import load_target

    monkeypatch.setenv("QCOMPILE_TARGETS", str(targets))
    assert load_target("my-cpu").tolerance == load_target("cpu").tolerance
    assert set(load_target("my-cpu").tolerance) == {"float32", "float16", "bfloat16"}


def test_user_schedules_are_applied_beside_the_shipped_ones(tmp_path, monkeypatch):
    from qcompile.build.schedules import find_schedules

    shipped = find_schedules("cpu")
    mine = tmp_path / "cpu" / "my-model"
    mine.mkdir(parents=True)
    # one workload line (as MetaSchedule writes it: [structural hash, module]) and no record yet
    first = (package_data() / "schedules/cpu/qwen2-debug/database_workload.json").read_text().splitlines()[0]
    (mine / "database_workload.json").write_text(first + "\n")
    monkeypatch.setenv("QCOMPILE_SCHEDULES", str(tmp_path))
    both = find_schedules("cpu")
    assert set(both.directories) == {*shipped.directories, mine} and both.digest != shipped.digest
