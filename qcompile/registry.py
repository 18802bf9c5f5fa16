"""A content-addressed store of built libraries: compile once per build identity, reuse, verify.

Layout (versioned at the root; `QCOMPILE_HOME` overrides the default `~/.cache/qcompile`):

    <home>/registry/v1/
      entries/<key>/      model.so, manifest.json, SHA256SUMS  (a complete entry; never edited in place)
      locks/<key>.lock    flock: exclusive while building or removing, shared while a library is loaded
      tmp/<key>.<rand>/   a build in progress (or a crashed one, until gc)
      trash/              entries being deleted

The key is the sha256 of the build identity (`BuildPlan.identity()`: canonical model config, resolved
target dict with its triple, dtype, sequence bounds, TVM version and commit, tvm-ffi, qcompile, LLVM,
tuning database) plus the registry format. An entry is built in tmp/ on the same filesystem and
published with one rename of the whole directory, so readers see no entry or a complete one; a writer
killed at any point leaves only a tmp/ directory, which never loads. Last use is the entry's mtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .build.library import LIBRARY, MANIFEST, read_manifest, sha256_file

if TYPE_CHECKING:
    from .build.plan import BuildPlan

FORMAT = 1
SUMS = "SHA256SUMS"
KEY_PATTERN = re.compile(r"[0-9a-f]{6,64}")  # a key or prefix as a user types it
FULL_KEY = re.compile(r"[0-9a-f]{64}")
TRASH_GRACE_SECONDS = 600  # trash younger than this may be another process's removal in progress


def home() -> Path:
    if os.environ.get("QCOMPILE_HOME"):  # empty means unset
        return Path(os.environ["QCOMPILE_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qcompile"


def key_of(identity: dict[str, Any]) -> str:
    canonical = json.dumps({"registry_format": FORMAT, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]
    size: int
    last_used: float

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        created = datetime.datetime.fromisoformat(m["build"]["created"]).timestamp()
        return {"key": self.key, "model": m["model"]["name"], "family": m["model"]["family"],
                "target": m["target"]["name"], "dtype": m["dtype"], "max_seq_len": m["max_seq_len"],
                "size_bytes": self.size, "created": m["build"]["created"],
                "age_seconds": round(time.time() - created),
                "last_used": datetime.datetime.fromtimestamp(self.last_used, datetime.UTC)
                .isoformat(timespec="seconds"),
                "idle_seconds": round(time.time() - self.last_used), "path": str(self.path)}


class Registry:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or home()) / "registry" / f"v{FORMAT}"
        self.entries, self.locks = self.root / "entries", self.root / "locks"
        self.tmp, self.trash = self.root / "tmp", self.root / "trash"
        for d in (self.entries, self.locks, self.tmp, self.trash):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"{d}: cannot create the registry directory ({e.strerror})") from None

    # -- paths and locks ------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The entry directory of a full key; anything else is refused (keys never name other paths)."""
        if not isinstance(key, str) or not FULL_KEY.fullmatch(key):
            raise UserError(f"'{key}' is not a registry key (64 lowercase hex digits)")
        return self.entries / key

    def _open_lock(self, key: str) -> int:
        self.path(key)  # validates the key
        try:
            return os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.locks}: cannot open the registry lock ({e.strerror})") from None

    @contextlib.contextmanager
    def _lock(self, key: str, mode: int) -> Iterator[None]:
        fd = self._open_lock(key)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def hold_shared(self, key: str) -> int:
        """A shared lock, as a loaded library holds it (gc and rm skip the entry); close the fd to
        release it."""
        fd = self._open_lock(key)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    # -- building --------------------------------------------------------------------------------

    def publish(self, plan: BuildPlan, *, log=print) -> tuple[str, bool, int]:
        """The entry for `plan`, built if absent or damaged. Returns (key, built_now, fd of a shared lock
        the caller holds while it uses the entry, then closes). Concurrent callers with the same key
        build once: the others wait on the key's lock and then find the entry."""
        key = key_of(plan.identity())
        fd, built = self._open_lock(key), False
        try:
            while True:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not self.path(key).is_dir() or self.verify(key):
                    if self.path(key).is_dir():  # damaged: replace it
                        self._remove_unlocked(key)
                    self._build(plan, key, log)
                    built = True
                os.utime(self.path(key))  # compiled again: counts as a use
                fcntl.flock(fd, fcntl.LOCK_SH)  # a downgrade, but not atomic: a gc may slip in ...
                if self.path(key).is_dir():  # ... so check the entry is still there
                    return key, built, fd
        except BaseException:
            os.close(fd)
            raise

    def _build(self, plan: BuildPlan, key: str, log) -> None:
        try:
            build = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.tmp))
        except OSError as e:
            raise UserError(f"{self.tmp}: cannot write to the registry ({e.strerror})") from None
        from .build.builder import write_library  # noqa: PLC0415 (the compiler: only when building)

        try:
            write_library(plan, build, log=log)
            _write_sums(build)
            self._publish(build, key)
        finally:
            shutil.rmtree(build, ignore_errors=True)

    def _publish(self, build: Path, key: str) -> None:
        """The commit point: a complete build in tmp/ becomes the entry with one rename."""
        os.chmod(build, 0o755)
        os.rename(build, self.path(key))

    # -- reading ---------------------------------------------------------------------------------

    def resolve_key(self, text: str) -> str:
        """A full key or a unique prefix (>= 6 hex digits); anything else cannot name a path here."""
        if not KEY_PATTERN.fullmatch(text):
            raise UserError(f"'{text}' is not a registry key (6 to 64 lowercase hex digits)")
        matches = [p.name for p in self.entries.iterdir() if p.name.startswith(text)]
        if not matches:
            raise UserError(f"no registry entry {text}")
        if len(matches) > 1:
            raise UserError(f"registry key prefix {text} is ambiguous ({len(matches)} entries)")
        return matches[0]

    def entry(self, key: str) -> Entry:
        path = self.path(key)
        files = [p for p in path.iterdir() if p.is_file()]
        return Entry(key, path, read_manifest(path), sum(p.stat().st_size for p in files),
                     path.stat().st_mtime)

    def list(self) -> list[Entry]:
        out = []
        for path in sorted(self.entries.iterdir()):
            with contextlib.suppress(UserError, FileNotFoundError):  # vanished or damaged: skip here
                out.append(self.entry(path.name))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def verify(self, key: str) -> list[str]:
        """Problems with an entry (empty when sound): every file re-hashed, the key recomputed."""
        path, problems = self.path(key), []
        try:
            files = {p.name for p in path.iterdir() if p.is_file()}
        except FileNotFoundError:
            return ["entry missing (removed meanwhile?)"]
        try:
            sums = dict(line.split("  ", 1)[::-1] for line in (path / SUMS).read_text().splitlines())
        except (FileNotFoundError, ValueError):
            return [f"{SUMS} missing or malformed"]
        for name in sorted(files - {SUMS} | set(sums)):
            if name not in sums:
                problems.append(f"{name}: not in {SUMS}")
            elif not (path / name).is_file():
                problems.append(f"{name}: missing")
            elif sha256_file(path / name) != sums[name]:
                problems.append(f"{name}: sha256 differs from {SUMS}")
        if not problems:
            try:
                manifest = read_manifest(path)
            except UserError as e:
                return [str(e)]
            if key_of(manifest["identity"]) != key:
                problems.append("manifest identity does not hash to the entry's key")
            if manifest["library"]["sha256"] != sums.get(LIBRARY):
                problems.append("manifest's library sha256 differs from the file")
        return problems

    def checked_path(self, key: str) -> Path:
        """The entry's directory after a full verification (UserError naming the problem)."""
        problems = self.verify(key)
        if problems:
            raise UserError(f"registry entry {key[:12]} is damaged ({problems[0]}); refusing to load "
                            f"(`qcompile registry rm {key[:12]}` and compile again)")
        os.utime(self.path(key))  # last use, for gc
        return self.path(key)

    def open_for_load(self, key: str, what: str) -> tuple[Path, int]:
        """(verified entry path, held shared-lock fd) for loading; the caller closes the fd when done."""
        fd = self.hold_shared(key)
        try:
            if not self.path(key).is_dir():
                raise UserError(f"{what} is not in the registry (key {key[:12]}); build it with "
                                f"`qcompile compile ... --register` using the same options")
            return self.checked_path(key), fd
        except BaseException:
            os.close(fd)
            raise

    # -- removing --------------------------------------------------------------------------------

    def _remove_unlocked(self, key: str) -> bool:
        """Remove an entry (the caller holds its exclusive lock); False if it was already gone."""
        if not self.path(key).is_dir():
            return False
        grave = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.trash))
        os.rename(self.path(key), grave / key)  # disappears atomically for readers
        shutil.rmtree(grave, ignore_errors=True)
        return True

    def remove(self, key: str) -> None:
        try:
            with self._lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB):
                if not self._remove_unlocked(key):
                    raise UserError(f"no registry entry {key[:12]}")
        except BlockingIOError:
            raise UserError(f"registry entry {key[:12]} is in use (loaded or being built)") from None

    def gc(self, max_bytes: int) -> dict[str, Any]:
        """Evict least-recently-used entries until the total is <= max_bytes, skipping entries in use;
        drop crashed builds and leftovers. Returns what was removed and kept."""
        removed, kept_in_use = [], []
        for build in self.tmp.iterdir():  # a build whose key is not locked is a crashed one
            key = build.name.split(".", 1)[0]
            if not FULL_KEY.fullmatch(key):
                continue  # not ours
            with contextlib.suppress(BlockingIOError), self._lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB):
                shutil.rmtree(build, ignore_errors=True)
        for leftover in self.trash.iterdir():  # removals that crashed; young ones may be in progress
            with contextlib.suppress(FileNotFoundError):
                if time.time() - leftover.stat().st_mtime > TRASH_GRACE_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
        entries = self.list()
        total = sum(e.size for e in entries)
        for entry in sorted(entries, key=lambda e: e.last_used):  # oldest use first
            if total <= max_bytes:
                break
            try:
                with self._lock(entry.key, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    gone = self._remove_unlocked(entry.key)
            except BlockingIOError:
                kept_in_use.append(entry.key)
                continue
            if gone:
                removed.append(entry.key)
            total -= entry.size
        return {"removed": removed, "kept_in_use": kept_in_use, "total_bytes": total,
                "max_bytes": max_bytes}


def _write_sums(directory: Path) -> None:
    lines = [f"{sha256_file(p)}  {p.name}" for p in sorted(directory.iterdir()) if p.is_file()]
    (directory / SUMS).write_text("\n".join(lines) + "\n")
    assert {LIBRARY, MANIFEST} <= {p.name for p in directory.iterdir()}


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GiB', '1000' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise UserError(f"--max-size: {text!r} is not a size (e.g. 500M, 2G)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))
