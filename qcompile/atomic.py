"""Atomic publication of files and directories: readers see the old thing or the whole new one.

Everything is written under a temporary name in the destination's own directory (same filesystem) and
renamed into place at the end; on any error the temporary is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest: Path, *, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `dest` when the block succeeds.

    An existing `dest` is replaced only if `replaceable(dest)` says it is a previous output of the same
    kind (so a typo cannot wipe an unrelated directory); otherwise it is a UserError, checked up front.
    """
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and replaceable(dest)):
        raise UserError(f"{dest}: exists and is not a previous qcompile output; choose another path")
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{parent}: cannot create directory ({e.strerror})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; publish with the usual permissions
        if dest.exists():  # swap: old -> trash, new -> dest, drop trash
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
            os.rename(dest, trash / "old")
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_npy(path: Path, array: Any) -> None:
    """Write a .npy file atomically (no pickle: plain numeric arrays only)."""
    import numpy as np  # noqa: PLC0415

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
