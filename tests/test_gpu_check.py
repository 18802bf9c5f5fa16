"""scripts/gpu-check.sh, CPU side: `prepare --device cpu` builds and bundles, `run` (a process that never
imports tvm) loads through the bundle's runtime, compares with transformers against the tier, runs the
bundle's launcher and benchmarks decode, and prints the JSON report the GPU run will print."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})


def test_gpu_check_prepares_and_runs_on_the_cpu(tmp_path):
    prepared = _script("prepare", "--device", "cpu", "--debug", "qwen2-debug", "--bench", "qwen2-sw-debug:1",
                       str(tmp_path / "check"))
    assert prepared.returncode == 0, prepared.stderr
    plan = json.loads((tmp_path / "check" / "plan.json").read_text())
    assert [p["library"] for p in plan["parity"]] == ["qwen2-debug--float32"]
    assert plan["bench"] == [{"library": "qwen2-sw-debug--1-layers", "model": "qwen2-sw-debug", "layers": 1,
                              "of_layers": 3, "dtype": "float32"}]

    ran = _script("run", str(tmp_path / "check"), "--report", str(tmp_path / "report.json"), PYTHON=sys.executable)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["machine"]["tvm_runtime_source"].startswith("runtime libraries in ")
    (parity,) = report["parity"]
    assert parity["ok"] and parity["tier"] == {"max_rel_diff": 1e-4}
    assert parity["vs_transformers"]["max_rel_diff"] < 1e-4
    assert report["launcher"]["ok"] and len(report["launcher"]["generated_ids"]) == 4
    (bench,) = report["bench"]
    assert bench["qcompile"]["decode_tokens_per_s"] > 0 and bench["transformers_eager"]["decode_tokens_per_s"] > 0
    assert 0 < bench["qcompile"]["fraction_of_bandwidth"] and bench["qcompile"]["weight_bytes_per_step"] > 0
    assert report["memory_bandwidth"]["copy_bytes_per_s"] > 0


def test_gpu_check_usage_and_errors(tmp_path):
    usage = _script()
    assert usage.returncode == 2 and "scripts/gpu-check.sh prepare" in usage.stderr
    missing = _script("run", str(tmp_path), PYTHON=sys.executable)
    assert missing.returncode == 2 and missing.stderr.strip() == \
        f"gpu-check: error: {tmp_path}: no plan.json; run `scripts/gpu-check.sh prepare` first"
