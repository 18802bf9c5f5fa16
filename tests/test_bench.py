"""`qcompile bench` runs its engines side by side and reports each figure beside its physical limit."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_reports_engines_limits_and_fractions(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qcompile", "bench", "qwen2-debug", "--repeats", "1",
                          "--decode-tokens", "4", "--prompt-len", "16", "--workdir", str(tmp_path), "--profile",
                          "--threads", "2", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["engines"]) == {"qcompile-tuned", "qcompile-default"}
    assert report["machine"]["read_bytes_per_s"] > 1e9 and report["machine"]["matmul_flop_per_s"] > 1e9
    limits = report["limits"]
    assert limits["decode_weight_bytes"] > 0 and limits["prefill_flops"] > 0
    for figures in report["engines"].values():
        assert figures["prefill_seconds"] > 0 and figures["decode_tokens_per_s"] > 0
        assert 0 < figures["decode_fraction_of_limit"] and 0 < figures["prefill_fraction_of_limit"]
        assert figures["peak_rss_bytes"] > 50e6  # its own process: TVM and the weights at least
        # the read-bandwidth probe is a bound no engine beats
        assert figures["decode_fraction_of_limit"] < 1
        for call in ("prefill", "decode"):  # --profile: where one call's time goes
            measured = figures["profile"][call]
            kernels = measured["kernels"]
            assert kernels and sum(k["seconds"] for k in kernels) <= measured["seconds"]
            assert any("matmul" in k["kernel"] for k in kernels)
    assert report["machine"]["threads"] == 2


def test_bench_rejects_a_bad_prompt_length(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qcompile", "bench", "qwen2-debug", "--prompt-len", "4",
                          "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "--prompt-len must be in 8.." in out.stderr


def test_bench_encoder_vs_torch_on_any_cpu_target(tmp_path):
    """An encoder against transformers eager, built for a CPU target other than `cpu`."""
    out = subprocess.run([sys.executable, "-m", "qcompile", "bench", "vit-debug", "--target", "cpu-x86-64-v3",
                          "--vs", "torch", "--skip", "qcompile-default,torch-compile", "--repeats", "1",
                          "--workdir", str(tmp_path), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["target"] == "cpu-x86-64-v3" and set(report["engines"]) == {"qcompile-tuned", "torch-eager"}
    for engine, figures in report["engines"].items():
        assert "error" not in figures, (engine, figures)
        assert figures["encode_seconds"] > 0 and figures["encode_fraction_of_limit"] > 0
