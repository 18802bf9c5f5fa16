"""Atomic publication of files and directories: readers see the old thing or the whole new one.

Everything is written under a temporary name in the destination's own directory (same filesystem) and
renamed into place at the end; on any error the temporary is removed and the destination is untouched.
Replacing an existing directory swaps the two in one `renameat2(RENAME_EXCHANGE)` call (Linux), so the
destination never goes missing, not even for an instant.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UserError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the kernel or libc cannot (then the caller falls back)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    ok = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
    return ok


def _mkdtemp(prefix: str, parent: Path) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise UserError(f"{parent}: cannot write here ({e.strerror})") from None


@contextlib.contextmanager
def atomic_dir(dest: Path, *, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `dest` when the block succeeds.

    An existing `dest` is replaced only if `replaceable(dest)` says it is a previous output of the same
    kind (so a typo cannot wipe an unrelated directory); otherwise it is a UserError, checked up front
    and again just before the swap.
    """
    dest = Path(dest)

    def check_replaceable() -> None:
        if dest.exists() and not (dest.is_dir() and replaceable(dest)):
            raise UserError(f"{dest}: exists and is not a previous qcompile output; choose another path")

    check_replaceable()
    tmp = _mkdtemp(f".{dest.name}.tmp-", dest.parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; publish with the usual permissions
        check_replaceable()
        if not dest.exists():
            os.rename(tmp, dest)
        elif not _exchange(tmp, dest):  # no renameat2: old -> aside, new -> dest (a short gap)
            aside = _mkdtemp(f".{dest.name}.old-", dest.parent)
            os.rename(dest, aside / "old")
            os.rename(tmp, dest)
            shutil.rmtree(aside, ignore_errors=True)
        # after an exchange, tmp holds the old directory and is removed below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """For tools that write a file by name (an external program, a writer that opens its own file):
    yield a temporary path beside `path`; when the block succeeds it is fsync'd and renamed to `path`,
    otherwise removed."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise UserError(f"{path.parent}: cannot write here ({e.strerror})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace file `path` atomically: `write` fills a temp file, fsync, rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json(path: Path, data: Any) -> None:
    atomic_file(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def save_npy(path: Path, array: Any) -> None:
    """A .npy file (no pickle: plain numeric arrays only)."""
    import numpy as np  # noqa: PLC0415

    atomic_file(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))
