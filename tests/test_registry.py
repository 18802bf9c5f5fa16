"""The library registry: stable keys, one entry under concurrent compiles, nothing loadable after a crash,
tamper detection, LRU gc that spares entries in use, and keys that cannot name paths."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import qcompile
from qcompile import registry
from qcompile.api import _plan
from qcompile.cli import main
from qcompile.errors import UserError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory):
    """A registry home with qwen2-debug (max_seq_len 32) registered, once per module: the tests that damage
    or count such an entry start from a copy (the layout holds no absolute paths) instead of compiling it."""
    seed = tmp_path_factory.mktemp("seed") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QCOMPILE_HOME", str(seed))
        qcompile.register_model("qwen2-debug", max_seq_len=32, log=quiet)
    return seed


@pytest.fixture
def home_with_entry(home, seeded_home):
    shutil.copytree(seeded_home, home)
    return home


def test_key_is_stable_and_every_input_changes_it(monkeypatch):
    identity = _plan("qwen2-debug", "cpu", None, 32).identity()
    key = registry.key_of(identity)
    assert key == registry.key_of(_plan("qwen2-debug", "cpu", None, 32).identity())
    assert key == registry.key_of(json.loads(json.dumps(identity)))  # order and spelling do not matter
    changes = {
        ("config", "hidden_size"): 128, ("config", "layer_windows"): [None, 8],
        ("target", "mcpu"): "znver5", ("target", "mtriple"): "aarch64-linux-gnu", ("device",): "cuda",
        ("dtype",): "float16", ("max_seq_len",): 64, ("prefill_chunk",): 16,
        ("versions", "tvm"): "0.28.0", ("versions", "tvm_build"): "0" * 16,
        ("versions", "qcompile"): "0.2.0", ("toolchain", "llvm"): 23, ("tuning_database",): "ab" * 32,
    }
    changes[("qcompile_source",)] = "0" * 16
    changes[("toolchain", "cc")] = "clang 99"
    for path, value in changes.items():
        changed = copy.deepcopy(identity)
        node = changed
        for part in path[:-1]:
            node = node[part]
        assert path[-1] in node, path  # a change, not an addition
        node[path[-1]] = value
        assert registry.key_of(changed) != key, path
    monkeypatch.setattr(registry, "FORMAT", registry.FORMAT + 1)
    assert registry.key_of(identity) != key
    # Real plans: another dtype or another model give other keys; a zoo alias of one config does not.
    assert registry.key_of(_plan("qwen2-debug", "cpu", "float16", 32).identity()) != key
    assert registry.key_of(_plan("qwen2-sw-debug", "cpu", None, 32).identity()) != key


def _python(code: str, home, **env):
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "QCOMPILE_HOME": str(home), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


REGISTER = ("import qcompile; e, built = qcompile.register_model('qwen2-debug', max_seq_len=32, "
            "log=lambda m: None); print(e.key, built)")


def test_parallel_compiles_make_one_entry_and_readers_succeed(home, debug_checkpoint):
    writers = [_python(REGISTER, home) for _ in range(4)]
    store, seen = registry.Registry(), 0
    while any(w.poll() is None for w in writers):  # meanwhile, every entry a reader sees is complete
        for entry in store.list():
            assert store.verify(entry.key) == []
            seen += 1
        time.sleep(0.05)
    results = [(w.wait(timeout=300), *w.communicate()) for w in writers]
    assert all(code == 0 for code, _, _ in results), results
    keys_built = [out.split() for _, out, _ in results]
    assert len({k for k, _ in keys_built}) == 1
    assert [b for _, b in keys_built].count("True") == 1  # the others waited and reused it
    assert len(store.list()) == 1 and list(store.tmp.iterdir()) == []
    read = (f"import qcompile; m = qcompile.load(model='qwen2-debug', max_seq_len=32, "
            f"weights='{debug_checkpoint}'); print(m.generate([1, 2, 3], 4).tolist())")
    readers = [_python(read, home) for _ in range(3)]
    outputs = [(r.wait(timeout=300), r.communicate()) for r in readers]
    assert all(code == 0 for code, _ in outputs), outputs
    assert len({out for _, (out, _) in outputs}) == 1


# A writer that stops (as if stuck) right before the publishing rename, having told `marker` so: the fault is
# injected here, in the test's own process, not through a hook in the product.
PAUSED_REGISTER = ("import pathlib, sys, time; from qcompile import registry; "
                   "registry.Registry._publish = lambda self, build, key: "
                   "(pathlib.Path(sys.argv[1]).write_text(str(build)), time.sleep(3600)); " + REGISTER)


def test_writer_killed_before_publishing_leaves_nothing_loadable(home, tmp_path, debug_checkpoint):
    marker = tmp_path / "paused"
    writer = subprocess.Popen([sys.executable, "-c", PAUSED_REGISTER, str(marker)],
                              env={**os.environ, "QCOMPILE_HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and writer.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), writer.communicate()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    store = registry.Registry()
    assert list(store.entries.iterdir()) == []  # the complete-looking build never became an entry
    assert len(list(store.tmp.iterdir())) == 1
    with pytest.raises(UserError, match="not in the registry"):
        qcompile.load(model="qwen2-debug", max_seq_len=32, weights=debug_checkpoint)
    entry, built = qcompile.register_model("qwen2-debug", max_seq_len=32, log=quiet)  # lock was freed
    assert built and store.verify(entry.key) == []
    store.gc(max_bytes=1 << 40)
    assert list(store.tmp.iterdir()) == []  # the crashed build is cleared
    model = qcompile.load(model="qwen2-debug", max_seq_len=32, weights=debug_checkpoint)
    assert model.generate([1, 2], 3).size == 3
    model.close()


def test_flipped_byte_is_refused_by_verify_and_load(home_with_entry, capsys, debug_checkpoint):
    entry, _ = qcompile.register_model("qwen2-debug", max_seq_len=32, log=quiet)
    library = entry.path / "model.so"
    data = bytearray(library.read_bytes())
    data[1000] ^= 0x40
    library.write_bytes(bytes(data))
    assert registry.Registry().verify(entry.key) == ["model.so: sha256 differs from SHA256SUMS"]
    assert main(["registry", "verify"]) == 2
    assert "DAMAGED" in capsys.readouterr().out
    with pytest.raises(UserError, match="damaged.*refusing to load"):
        qcompile.load(model="qwen2-debug", max_seq_len=32, weights=debug_checkpoint)
    rebuilt, built = qcompile.register_model("qwen2-debug", max_seq_len=32, log=quiet)  # not reused
    assert built and rebuilt.key == entry.key and registry.Registry().verify(entry.key) == []


def test_truncated_library_is_refused(home_with_entry, debug_checkpoint):
    entry, _ = qcompile.register_model("qwen2-debug", max_seq_len=32, log=quiet)
    library = entry.path / "model.so"
    library.write_bytes(library.read_bytes()[:4096])
    assert registry.Registry().verify(entry.key) == ["model.so: sha256 differs from SHA256SUMS"]
    with pytest.raises(UserError, match="damaged"):
        qcompile.load(model="qwen2-debug", max_seq_len=32, weights=debug_checkpoint)


def test_failed_load_releases_the_lock_once(home_with_entry, capsys, tmp_path):
    """A load that fails after taking the entry's lock: one error line, no stray close of another fd."""
    import gc

    qcompile.register_model("qwen2-debug", max_seq_len=32, log=quiet)
    other = qcompile.init_weights("qwen2-sw-debug", out=tmp_path / "other")
    assert main(["run", "qwen2-debug", "--max-seq-len", "32", "--weights", str(other),
                 "--prompt-ids", "1"]) == 2
    gc.collect()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_hidden_layers" in err, err
    entry = registry.Registry().list()[0]
    registry.Registry().remove(entry.key)  # the lock was released: nothing holds the entry


def test_edited_manifest_is_refused(home_with_entry, debug_checkpoint):
    entry, _ = qcompile.register_model("qwen2-debug", max_seq_len=32, log=quiet)
    manifest = json.loads((entry.path / "manifest.json").read_text())
    manifest["prefill_chunk"] = 1
    (entry.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json: sha256 differs"):
        qcompile.load(model="qwen2-debug", max_seq_len=32, weights=debug_checkpoint)


def test_gc_evicts_least_recently_used_and_spares_entries_in_use(home_with_entry, debug_checkpoint):
    entries = [qcompile.register_model("qwen2-debug", max_seq_len=n, log=quiet)[0] for n in (16, 32, 48)]
    now = time.time()
    for age, entry in zip((300, 200, 100), entries, strict=True):  # 16 is the least recently used
        os.utime(entry.path, (now - age, now - age))
    in_use = qcompile.load(model="qwen2-debug", max_seq_len=16, weights=debug_checkpoint)  # now recent
    os.utime(entries[0].path, (now - 400, now - 400))  # ... made oldest again: gc must still spare it
    store = registry.Registry()
    result = store.gc(max_bytes=entries[0].size)
    assert result["removed"] == [entries[1].key, entries[2].key]
    assert result["kept_in_use"] == [entries[0].key]
    assert [e.key for e in store.list()] == [entries[0].key]
    with pytest.raises(UserError, match="in use"):
        store.remove(entries[0].key)
    in_use.close()
    assert store.gc(max_bytes=0)["removed"] == [entries[0].key]
    assert store.list() == []


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "/tmp", "abc", "ABCDEF12", "d92bcac8/../x"])
def test_names_cannot_escape_the_registry(home, capsys, name):
    store = registry.Registry()
    with pytest.raises(UserError, match="is not a registry key"):
        store.resolve_key(name)
    for method in (store.path, store.remove, store.verify, store.entry, store.hold_shared):
        with pytest.raises(UserError, match="is not a registry key"):
            method(name)
    for command in (["registry", "show", name], ["registry", "rm", name]):
        assert main(command) == 2
        assert "is not a registry key" in capsys.readouterr().err


def test_cli_compile_register_then_run_model(home, capsys, tmp_path, debug_checkpoint):
    assert main(["compile", "qwen2-debug", "--register", "--max-seq-len", "32", "-o",
                 str(tmp_path / "copy")]) == 0
    out = capsys.readouterr().out
    assert "new registry entry" in out and (tmp_path / "copy" / "manifest.json").is_file()
    assert main(["compile", "qwen2-debug", "--register", "--max-seq-len", "32"]) == 0
    assert "existing registry entry" in capsys.readouterr().out
    assert main(["run", "qwen2-debug", "--max-seq-len", "32", "--weights", str(debug_checkpoint),
                 "--prompt-ids", "1 2 3", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generated_ids"]) == 3
    assert main(["registry", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["model"] == "qwen2-debug" and listed["size_bytes"] > 0
    assert main(["run", "qwen2-debug", "--weights", str(debug_checkpoint), "--prompt-ids", "1"]) == 2
    assert "not in the registry" in capsys.readouterr().err  # other max_seq_len: another key
