"""Tuning: a small MetaSchedule run writes a database that compile applies (the applied kernels differ
from the default ones, and the numbers still match transformers); an interrupted run keeps every
record and a rerun resumes; a damaged database is a clear error."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qcompile
from qcompile import api
from qcompile.build import builder, lowering, schedules
from qcompile.build import plan as pipeline
from qcompile.cli import main
from qcompile.measure import reference
from qcompile.spec.target import load_target
from qcompile.spec.model import resolve_model
from tests.conftest import CPU_TOLERANCE, max_rel_diff

MODEL = "qwen2-debug"
# Three of the six projections (+ bias/residual epilogues; every kernel tuned is a search of its own): decode's
# qkv (4) and down (7), and the prefill bucket's qkv (8). The numbers follow the exported graph;
# test_tuning_writes_... checks that both decode and the bucket are among them.
KERNELS = "fused_rows16_matmul[478]_add*"
TRIALS = 8  # candidates per kernel (the default schedule is the first): enough that one beats it somewhere


@dataclasses.dataclass
class Tuned:
    directory: Path  # the database the resumed run completed
    interrupted: subprocess.CompletedProcess  # the first run's exit status and stderr
    before: list[str]  # its records, as the interrupt left them
    report: dict  # the resumed run's


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Tuned:
    """One tuning run, made the way a user resumes one: `qcompile tune` in a real process, interrupted
    (SIGINT) after the default records of the three kernels and the first kernel's round (the signal lands
    while the second is tuned, whose round is kept, so the third is left), then rerun here to finish. The
    other tests apply the database it leaves."""
    directory = tmp_path_factory.mktemp("schedules") / MODEL
    records = directory / schedules.RECORDS
    command = [sys.executable, "-m", "qcompile", "tune", MODEL, "--kernels", KERNELS, "--trials", str(TRIALS),
               "--schedules", str(directory), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and len(records.read_text().splitlines()) >= 4:
            break
        time.sleep(0.5)
    assert process.poll() is None, "tuning ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    before = records.read_text().splitlines()
    report = api.tune(MODEL, trials=TRIALS, schedules=directory, kernels=KERNELS, log=lambda _m: None,
                      show_progress=False)
    return Tuned(directory, subprocess.CompletedProcess(command, process.returncode, out, err), before, report)


def test_interrupted_tuning_keeps_every_record_and_a_rerun_resumes(tuned):
    assert tuned.interrupted.returncode == 130 and "rerun to resume" in tuned.interrupted.stderr
    assert len(tuned.before) >= 4
    after = (tuned.directory / schedules.RECORDS).read_text().splitlines()
    assert after[:len(tuned.before)] == tuned.before  # nothing finished was lost or rewritten
    assert len(after) > len(tuned.before)
    tasks = tuned.report["tasks"]
    assert all(t["trials"] <= TRIALS for t in tasks)  # resumed: only the remainder was tuned
    assert sum(t["trials"] for t in tasks) == len(after)


def test_tuning_writes_metaschedule_database_report_and_curve(tuned):
    directory, report = tuned.directory, tuned.report
    lines = schedules.check_database(directory)
    assert len(lines.workloads) == len(report["tasks"]) == 3
    rows = {int(task["inputs"].split("x", 1)[0]) for task in report["tasks"]}  # the activation's rows
    assert rows == {1, pipeline.plan_build(resolve_model(MODEL), load_target("cpu")).prefill_chunk}
    for task in report["tasks"]:
        assert 1 <= task["trials"] <= TRIALS  # the default schedule is candidate 0
        assert task["default_seconds"] > 0 and 0 < task["tuned_seconds"] <= task["default_seconds"]
    written = (directory / "report.json").read_text()
    assert json.loads(written)["tasks"] == report["tasks"]
    assert str(directory.parent) not in written  # no paths: it is committed beside its database
    assert (directory / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(t["speedup"] > 1 for t in report["tasks"])


def tuned_manifest(libraries, directory: Path) -> dict:
    """The manifest of MODEL built with the tuning database `directory` (compiled once per session)."""
    return json.loads((libraries.get(MODEL, schedules=directory) / "manifest.json").read_text())


def test_compile_applies_the_database_and_kernels_differ_from_default(tuned, libraries):
    directory, report = tuned.directory, tuned.report
    manifest = tuned_manifest(libraries, directory)
    applied = manifest["tuning_database"]
    assert set(applied["kernels"]["tuned"]) == {t["name"] for t in report["tasks"]}
    assert applied["kernels"]["default_static"]  # kernels outside the glob: reported, default schedules
    assert manifest["identity"]["tuning_database"] == applied["sha256"]

    # The kernels a build runs: with the database, those whose best record beat the default differ.
    import tvm_ffi

    plan = pipeline.plan_build(resolve_model(MODEL), load_target("cpu"), schedules=directory)
    fused = lowering.fused(builder.export(plan)[0], plan.target.tvm)
    with_db = lowering.schedule(fused, plan.target.tvm, plan.schedules.open(), lowering.ScheduleReport())
    without = lowering.schedule(fused, plan.target.tvm, None, lowering.ScheduleReport())
    faster = [t["name"] for t in report["tasks"] if t["speedup"] > 1]
    assert faster and all(not tvm_ffi.structural_equal(with_db[n], without[n]) for n in faster)


def test_tuned_library_matches_transformers(tuned, libraries, debug_checkpoint):
    directory = tuned.directory
    ours = qcompile.load(libraries.get(MODEL, schedules=directory), weights=debug_checkpoint)
    hf = reference.load_causal_lm(debug_checkpoint)
    chunk = tuned_manifest(libraries, directory)["prefill_chunk"]  # a full chunk runs the tuned static bucket
    prompt = np.random.default_rng(3).integers(0, ours.vocab_size, chunk)
    assert max_rel_diff(ours.prefill(prompt), reference.logits(hf, prompt)) <= CPU_TOLERANCE
    short = prompt[:20]
    new = ours.generate(short, 10)  # decode kernels, tuned
    np.testing.assert_array_equal(new, reference.greedy_generate(hf, short, 10).new_ids)
    steps = reference.logits(hf, np.concatenate([short, new[:-1]]))[len(short) - 1:]
    assert max_rel_diff(ours.last_step_logits, steps) <= CPU_TOLERANCE


def _one_line_error(stderr: str, needle: str) -> bool:
    """Progress lines may precede it; the error is one line, the last, and no traceback."""
    lines = stderr.strip().splitlines()
    return "Traceback" not in stderr and lines[-1].startswith("qcompile: error:") and needle in lines[-1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`qcompile ARGS` run in this process (a fresh interpreter costs a TVM import; test_cli checks the
    real process's exit path), its exit status and output as subprocess.run gives them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_damaged_database_is_a_clear_error(tuned, tmp_path):
    directory = tuned.directory
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    lines = (broken / schedules.RECORDS).read_text().splitlines()

    (broken / schedules.RECORDS).write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
    out = _cli("compile", MODEL, "--schedules", str(broken), "-o", str(tmp_path / "lib"))
    assert out.returncode == 2
    assert _one_line_error(out.stderr, f"{broken / schedules.RECORDS}: line 3 is not a MetaSchedule tuning record")
    assert not (tmp_path / "lib").exists()

    # A writer killed mid-line leaves a cut-short last line: compile refuses, tune drops it and goes on.
    (broken / schedules.RECORDS).write_text("\n".join(lines) + "\n" + lines[-1][:40])
    out = _cli("compile", MODEL, "--schedules", str(broken), "-o", str(tmp_path / "lib"))
    assert out.returncode == 2 and "cut short" in out.stderr
    schedules.check_database(broken, repair=True)
    assert (broken / schedules.RECORDS).read_text().splitlines() == lines

    out = _cli("compile", MODEL, "--schedules", str(tmp_path / "nowhere"), "-o", str(tmp_path / "lib"))
    assert out.returncode == 2 and "no such directory" in out.stderr


def test_bad_tune_arguments_are_one_line_errors(tmp_path):
    for args, needle in ((["--rpc", "localhost:x"], "expected HOST:PORT:KEY"),
                         (["--kernels", "no-such-kernel*"], "matches none"),
                         (["--trials", "0"], "--trials must be >= 1"),
                         (["--target", "nowhere"], "unknown target")):
        out = _cli("tune", MODEL, "--schedules", str(tmp_path / "db"), *args)
        assert out.returncode == 2 and _one_line_error(out.stderr, needle), (args, out.stderr)


def test_tuning_measures_through_an_rpc_tracker(tmp_path):
    """--rpc: candidates run on a device registered with TVM's RPC tracker (here a local one)."""
    from tvm.s_tir.meta_schedule.testing.local_rpc import LocalRPC

    from qcompile.tune import tasks

    plan = pipeline.plan_build(resolve_model(MODEL), load_target("cpu"), use_schedules=False)
    one_kernel = tasks.static_tasks(plan, KERNELS)[0][0].task_name
    with LocalRPC() as rpc:
        address = f"{rpc.tracker_host}:{rpc.tracker_port}:{rpc.tracker_key}"
        report = api.tune(MODEL, trials=2, schedules=tmp_path / "db", kernels=one_kernel,
                          rpc=address, log=lambda _m: None, show_progress=False)
    assert report["measured_on"] == address
    assert [t["trials"] for t in report["tasks"]] == [2] and report["tasks"][0]["tuned_seconds"] > 0


def test_target_intrinsics_registration_is_lazy():
    """Only the target's tensor intrinsics are imported (all of them take ~20 s)."""
    code = ("import sys; from qcompile.tune import tasks; tasks.register_target_intrinsics('cpu'); "
            "import tvm.s_tir.tensor_intrin as t; print(hasattr(t, 'x86'), 'tvm.s_tir.tensor_intrin.cuda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert out.stdout.split() == ["True", "False"]
