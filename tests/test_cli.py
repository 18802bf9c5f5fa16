"""The command line: happy paths print what they promise; bad input exits 2 with one stderr line and
leaves no output behind."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from qcompile.cli import main
from qcompile.data import package_data


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, needle, *argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("qcompile: error: ") and err.count("\n") == 1, err
    assert needle in err, err


def test_zoo_and_targets_listing(capsys):
    code, out, _ = run_cli(capsys, "zoo", "list", "--json")
    assert code == 0 and {"qwen-72b", "qwen2-sw-debug"} <= {m["name"] for m in json.loads(out)}
    code, out, _ = run_cli(capsys, "zoo", "show", "qwen2-0.5b", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["config"]["tie_word_embeddings"] and 4.9e8 < shown["parameters"] < 5.0e8
    code, out, _ = run_cli(capsys, "targets", "list")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and "yes: this CPU" in rows["cpu"] and "no: " in rows["cuda-sm90"]


def test_run_json_and_logits_out(capsys, tmp_path, debug_library, debug_checkpoint):
    logits_path = tmp_path / "logits.npy"
    code, out, err = run_cli(capsys, "run", debug_library, "--weights", debug_checkpoint, "--prompt-ids",
                             "3 14 15", "--max-new-tokens", 5, "--logits-out", logits_path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["generated_ids"]) == 5 and result["decode_tokens_per_s"] > 0
    logits = np.load(logits_path)
    assert logits.shape == (3, 256) and logits.dtype == np.float32
    assert result["generated_ids"][0] == int(np.argmax(logits[-1]))


def test_compile_cli_writes_a_library(capsys, tmp_path):
    code, out, err = run_cli(capsys, "compile", "qwen2-debug", "-o", tmp_path / "lib", "--max-seq-len", 32)
    assert code == 0, err
    assert out.startswith("qwen2-debug for cpu (107,072 parameters") and "[2/3] building" in err  # progress on stderr
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert manifest["max_seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib"]  # no temporaries left


@pytest.mark.parametrize("argv,needle", [
    (["compile", "qwen9", "-o", "{out}"], "unknown model 'qwen9'"),
    (["compile", "qwen2-debug", "--target", "tpu", "-o", "{out}"], "unknown target 'tpu'"),
    (["compile", "qwen2-debug", "--max-seq-len", "257", "-o", "{out}"], "--max-seq-len must be in 1..256"),
    (["compile", "qwen2-debug", "--dtype", "int3", "-o", "{out}"], "--dtype must be one of"),
    (["compile", "./no/such/dir", "-o", "{out}"], "no such model directory"),
    (["init-weights", "qwen9", "-o", "{out}"], "unknown model 'qwen9'"),
    (["compile", "qwen2-debug"], "give -o DIR, --register, or both"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_compile_input(capsys, tmp_path, argv, needle):
    out = tmp_path / "out"
    assert_user_error(capsys, needle, *[a.format(out=out) for a in argv])
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_bad_zoo_field_through_the_cli(capsys, tmp_path, monkeypatch):
    zoo = yaml.safe_load(open(package_data() / "zoo.yaml"))
    zoo["models"]["qwen2-debug"]["num_key_value_heads"] = 3
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    monkeypatch.setenv("QCOMPILE_ZOO", str(tmp_path / "zoo.yaml"))
    assert_user_error(capsys, "model 'qwen2-debug': field 'num_key_value_heads' (3) must divide",
                      "compile", "qwen2-debug", "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_target_tvm_rejects_is_a_user_error(capsys, tmp_path, monkeypatch):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "bogus.yaml").write_text(yaml.safe_dump({
        "description": "a kind TVM does not know", "target": {"kind": "no-such-kind"}, "device": "cpu",
        "dtype": "float32", "tolerance": {"float32": {"max_rel_diff": 1e-4}}}))
    monkeypatch.setenv("QCOMPILE_TARGETS", str(targets))
    assert_user_error(capsys, "TVM rejects the target dict", "compile", "qwen2-debug", "--target", "bogus",
                      "-o", tmp_path / "builds" / "lib")
    assert not (tmp_path / "builds").exists()


def test_interrupted_build_leaves_nothing_and_keeps_the_old_library(capsys, tmp_path, monkeypatch):
    """Ctrl-C after model.so is written but before the manifest: no new output, old library intact."""
    out = tmp_path / "lib"
    assert run_cli(capsys, "compile", "qwen2-debug", "-o", out, "--max-seq-len", 16)[0] == 0
    before = (out / "manifest.json").read_text()

    def interrupt(_path):
        raise KeyboardInterrupt

    monkeypatch.setattr("qcompile.build.library.sha256_file", interrupt)
    code, _, err = run_cli(capsys, "compile", "qwen2-debug", "-o", out, "--max-seq-len", 32)
    assert code == 130 and "interrupted" in err
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib"]  # the temporary is gone


@pytest.mark.parametrize("command,own_file", [
    (["compile", "qwen2-debug"], "manifest.json"),  # someone else's manifest.json
    (["init-weights", "qwen2-debug"], "config.json"),  # a real HF checkpoint, not our random one
])
def test_outputs_that_are_not_ours_are_not_overwritten(capsys, tmp_path, command, own_file):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / own_file).write_text('{"keep": "me"}')
    assert_user_error(capsys, "exists and is not a previous qcompile output", *command, "-o", precious)
    assert (precious / own_file).read_text() == '{"keep": "me"}'


def test_init_weights_replaces_its_own_output(capsys, tmp_path):
    for seed in ("1", "2"):
        assert run_cli(capsys, "init-weights", "qwen2-debug", "-o", tmp_path / "ck", "--seed", seed)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("extra,needle", [
    (["--prompt-ids", "3 999"], "token id 999 is out of range 0..255"),
    (["--prompt-ids", "3 x 5"], "--prompt-ids: 'x' is not a token id"),
    (["--prompt-ids", " ".join(["1"] * 65)], "max_seq_len is 64"),
    (["--prompt-ids", "1 2", "--max-new-tokens", "63"], "exceeds the library's max_seq_len 64"),
    (["--prompt-ids", "1 2", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0"),
    (["--prompt-ids", "1", "--logits-out", "/no/such/dir/l.npy"], "--logits-out: directory"),
    (["--prompt-ids", "1", "--logits-out", "/tmp"], "--logits-out: /tmp: is a directory"),
])
def test_bad_run_input(capsys, debug_library, debug_checkpoint, extra, needle):
    assert_user_error(capsys, needle, "run", debug_library, "--weights", debug_checkpoint, *extra)


@pytest.mark.parametrize("argv,needle", [
    (["init-weights", "qwen2-debug", "-o", "{out}", "--std", "nan"], "--std: must be a finite number > 0"),
    (["init-weights", "qwen2-debug", "-o", "{out}", "--max-shard-mb", "inf"], "--max-shard-mb: must be"),
])
def test_bad_numbers(capsys, tmp_path, argv, needle):
    assert_user_error(capsys, needle, *[a.format(out=tmp_path / "out") for a in argv])


def test_incomplete_manifest(capsys, tmp_path, debug_library, debug_checkpoint):
    broken = tmp_path / "lib"
    broken.mkdir()
    manifest = json.loads((debug_library / "manifest.json").read_text())
    del manifest["model"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(capsys, "incomplete manifest (no 'model')", "run", broken, "--weights",
                      debug_checkpoint, "--prompt-ids", "1")


def test_run_missing_paths(capsys, tmp_path, debug_library, debug_checkpoint):
    assert_user_error(capsys, "library directory not found", "run", tmp_path / "nolib", "--weights",
                      debug_checkpoint, "--prompt-ids", "1")
    assert_user_error(capsys, "checkpoint directory not found", "run", debug_library, "--weights",
                      tmp_path / "nockpt", "--prompt-ids", "1")


def test_real_process_exit_status_and_help(tmp_path):
    """Through a real interpreter: exit status 2, one stderr line, no traceback; --help works."""
    proc = subprocess.run([sys.executable, "-m", "qcompile", "compile", "qwen9", "-o", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    helped = subprocess.run([sys.executable, "-m", "qcompile", "run", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--logits-out" in helped.stdout


def test_output_named_like_the_model_does_not_shadow_it(capsys, tmp_path, monkeypatch):
    """`compile qwen2-debug -o qwen2-debug` twice: the library dir is not taken for a checkpoint."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, _, err = run_cli(capsys, "compile", "qwen2-debug", "-o", "qwen2-debug", "--max-seq-len", 16)
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2-debug"]
