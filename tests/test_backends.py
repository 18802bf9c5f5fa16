"""Every debug model builds for every target; GPU libraries carry device code built here for the right
arch; mismatched libraries are refused.

The device matrix (as litgpt writes it): every (model, target) pair builds everywhere (by default the GPU
pairs of `_default_pairs`; QCOMPILE_ALL_PAIRS=1 all); a pair runs and must meet its target's numeric tier
where its device is present, and is skipped, with the reason, where not. Nothing asserts that hardware is
absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qcompile
from qcompile.build import devicecode
from qcompile.measure import check as crosscheck
from qcompile.spec import target as targets
from qcompile.errors import UserError

DEBUG_MODELS = ["qwen2-debug", "qwen2-sw-debug", "qwen3-moe-debug", "vit-debug"]
ALL_TARGETS = sorted(targets.list_targets())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("check")


def test_the_issue_targets_exist():
    assert set(ALL_TARGETS) >= {"cpu", "cpu-x86-64-v3", "cuda-sm80", "cuda-sm90", "rocm-gfx90a", "rocm-gfx942"}


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_this_machine_can_build_every_target(target):
    """setup.sh installs the cross toolchains (nvcc is on the image; lld-22, rocm-device-libs by apt)."""
    can, why = targets.availability(targets.load_target(target))["build"]
    assert can, f"{target}: {why}"


def _library(workdir: Path, model: str, target: str, dtype: str | None = None) -> Path:
    """The (model, target) library, built once per module; its device code is checked at build time."""
    dtype = dtype or targets.load_target(target).dtype
    library = workdir / f"{model}--{target}--{dtype}"
    if not (library / "manifest.json").is_file():
        qcompile.compile_model(model, target=target, out=library, dtype=dtype, log=lambda _m: None)
    return library


@pytest.mark.parametrize("target", ALL_TARGETS)
@pytest.mark.parametrize("model", DEBUG_MODELS)
def test_debug_model_runs_and_meets_its_tier_where_its_device_is(model, target, workdir):
    runs, why = targets.availability(targets.load_target(target))["run"]
    if not runs:
        pytest.skip(f"{target} does not run here: {why}")
    row = crosscheck.check_pair(model, target, workdir=workdir, log=lambda _m: None)  # builds it (kept)
    assert row["ran"]["ok"] and row["failed"] == [], row


def _default_pairs() -> set[tuple[str, str]]:
    """The GPU (model, target) pairs the suite cross-builds by default (each ~11 s): qwen2-debug for every
    target, and every other model for one CUDA and one ROCm arch, taking the archs in turn. The
    arch-specific part (the device code's arch and format) is then checked for every target and every
    model's kernels for both vendors; QCOMPILE_ALL_PAIRS=1 builds all of them."""
    gpu = {device: [t for t in ALL_TARGETS if targets.load_target(t).device == device] for device in ("cuda", "rocm")}
    pairs = {("qwen2-debug", t) for archs in gpu.values() for t in archs}
    for i, model in enumerate(m for m in DEBUG_MODELS if m != "qwen2-debug"):
        pairs |= {(model, archs[i % len(archs)]) for archs in gpu.values()}
    return pairs


@pytest.mark.parametrize("target", ALL_TARGETS)
@pytest.mark.parametrize("model", DEBUG_MODELS)
def test_debug_model_builds_with_the_targets_device_code(model, target, workdir):
    spec = targets.load_target(target)
    if spec.device != "cpu" and (model, target) not in _default_pairs() and not os.environ.get("QCOMPILE_ALL_PAIRS"):
        pytest.skip("a GPU pair beyond the default cross-builds (QCOMPILE_ALL_PAIRS=1 builds it)")
    library = _library(workdir, model, target)
    manifest = json.loads((library / "manifest.json").read_text())
    modules = devicecode.device_modules(library / "model.so")  # read back from the .so's bytes
    if spec.device == "cpu":
        assert modules == [] and manifest["device_code"] is None
        return
    assert manifest["device_code"]["modules"] == modules and len(modules) == 1
    (module,) = modules
    arch = targets.architecture(spec.target)
    if spec.device == "cuda":
        number = arch.removeprefix("sm_")
        assert (module["kind"], module["format"], module["code"]) == ("cuda", "fatbin", "fatbin")
        assert module["cubin"] == [arch] and module["ptx"] == [f"compute_{number}"]
    else:
        assert (module["kind"], module["code"], module["arch"]) == ("hip", "hsaco", arch)
        assert module["code_object_version"] == spec.device_code["code_object_version"] == 5


@pytest.mark.parametrize("model,dtype", [("qwen2-debug", "float16"), ("qwen2-debug", "bfloat16"),
                                         ("qwen3-moe-debug", "bfloat16")])
def test_16_bit_cpu_build_meets_its_tier(model, dtype, workdir):
    """The 16-bit tier metrics (top-1 agreement, KL, max diff) on the one backend that runs here.

    qwen3-moe-debug: the router runs in float32 whatever the dtype. As a bfloat16 product (before
    quantization's session) near-tied experts flipped and it missed the bfloat16 tier (max_rel_diff 0.34 >
    0.15); now 0.04."""
    row = crosscheck.check_pair(model, "cpu", dtype=dtype, workdir=workdir, log=lambda _m: None)
    metrics = row["vs_transformers"]
    assert set(metrics) == {"max_rel_diff", "top1_agreement", "kl"}
    assert row["failed"] == [], row
    assert 0 < metrics["max_rel_diff"] and metrics["kl"] >= 0  # 16-bit really differs from float32


def test_compare_metrics():
    import numpy as np

    ref = np.array([[0.0, 1.0, 5.0], [2.0, 0.0, 0.0]])
    same = crosscheck.compare(ref, ref, logits=True)
    assert same == {"max_rel_diff": 0.0, "top1_agreement": 1.0, "kl": 0.0}
    swapped = crosscheck.compare(ref[:, ::-1], ref, logits=True)
    assert swapped["top1_agreement"] == 0.0 and swapped["kl"] > 1
    assert crosscheck.within(swapped, {"max_rel_diff": 1.0, "top1_agreement": 0.9}) == [
        "top1_agreement 0 (tier 0.9)"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True)


def test_inspect_shows_arch_device_code_and_toolchain(workdir):
    _library(workdir, "qwen2-debug", "cuda-sm90")
    _library(workdir, "qwen2-debug", "rocm-gfx942")
    cuda = json.loads(_cli("inspect", workdir / "qwen2-debug--cuda-sm90--float16", "--json").stdout)
    assert cuda["arch"] == "sm_90" and cuda["toolchain"]["nvcc"]
    assert cuda["device_modules_in_library"][0]["cubin"] == ["sm_90"]
    text = _cli("inspect", workdir / "qwen2-debug--rocm-gfx942--float16").stdout
    assert "gfx942, code object v5" in text and "ld.lld 22" in text


def test_loading_on_the_wrong_device_or_tvm_is_refused(workdir, tmp_path):
    """A GPU library for an arch no GPU has is refused before it is opened, whatever this machine has
    (no GPU, no runtime for its code, or another arch), with both sides named."""
    gpu = tmp_path / "gpu"
    shutil.copytree(_library(workdir, "qwen2-debug", "cuda-sm90"), gpu)
    manifest = json.loads((gpu / "manifest.json").read_text())
    manifest["target"]["arch"] = "sm_1"  # no such GPU
    (gpu / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"built for cuda sm_1; (no cuda device|this TVM runtime cannot load "
                                        r"cuda code|this GPU is sm_\d+, not sm_1)"):
        qcompile.load(gpu, weights=tmp_path)

    copy = tmp_path / "lib"
    shutil.copytree(_library(workdir, "qwen2-debug", "cpu"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["versions"]["tvm"] = "0.26.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    import tvm

    with pytest.raises(UserError, match=rf"built with TVM 0.26.0, this runtime is TVM {tvm.__version__}"):
        qcompile.load(copy, weights=tmp_path)


def test_targets_list_says_what_builds_and_runs_here():
    listed = json.loads(_cli("targets", "list", "--json").stdout)
    assert listed["cpu"]["run"]["ok"] and listed["cuda-sm90"]["build"]["ok"]
    for name in ("cuda-sm90", "rocm-gfx942"):  # as this machine is: said either way, with the reason
        spec = targets.load_target(name)
        present = targets.gpu_present(spec.device, targets.architecture(spec.target))
        assert (listed[name]["run"]["ok"], listed[name]["run"]["why"]) == present
    assert listed["rocm-gfx942"]["device_code"] == {"format": "hsaco", "code_object_version": 5}
