"""What a shared object links (its ELF DT_NEEDED entries) and where this machine's dynamic loader finds
each one, so a bundle carries TVM's runtime libraries together with the non-system libraries they need.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

from ..errors import UserError

# Every Linux machine has these (glibc, the C++ runtime TVM's manylinux wheel was built against).
SYSTEM = frozenset({"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libstdc++.so.6",
                    "libgcc_s.so.1", "ld-linux-x86-64.so.2"})
# Libraries a bundle must not carry, and where the deploy machine gets them instead.
FROM_ELSEWHERE = {
    "libtvm_ffi.so": "the apache-tvm-ffi package (requirements.txt)",
    "libcuda.so.1": "the machine's NVIDIA driver",  # bound to the kernel module's version: never copied
}
_DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
_SHT_DYNAMIC, _DT_NULL, _DT_NEEDED = 6, 0, 1


def needed(path: Path) -> list[str]:
    """The DT_NEEDED names of an ELF64 little-endian shared object, in order."""
    elf = Path(path).read_bytes()
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise UserError(f"{path}: not a 64-bit little-endian ELF shared object")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    entsize, count = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    names: list[str] = []
    for _name, kind, _flags, _addr, offset, size, link, *_ in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strings = sections[link][4]  # the .dynstr section's file offset
        for at in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", elf, at)
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                names.append(elf[strings + value:elf.index(b"\0", strings + value)].decode())
    return names


def _loader_cache() -> dict[str, Path]:
    """Library name -> path from the dynamic loader's cache (`ldconfig -p`), x86-64 entries only."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/sbin:/usr/sbin"}).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cache: dict[str, Path] = {}
    for line in out.splitlines()[1:]:
        name, _, rest = line.strip().partition(" (")
        if "x86-64" in rest and "=>" in rest:
            cache.setdefault(name, Path(rest.split("=>", 1)[1].strip()))
    return cache


def find(name: str, beside: Path) -> Path | None:
    """Where the dynamic loader would find `name` for a library in `beside` (its $ORIGIN runpath first,
    then LD_LIBRARY_PATH, the loader's cache and the default directories)."""
    dirs = [beside, *(Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p)]
    for directory in dirs:
        if (directory / name).is_file():
            return (directory / name).resolve()
    cached = _loader_cache().get(name)
    if cached is not None and cached.is_file():
        return cached.resolve()
    return next(((Path(d) / name).resolve() for d in _DEFAULT_DIRS if (Path(d) / name).is_file()), None)


def closure(libraries: list[Path]) -> dict[str, Path]:
    """Name -> path of every library the given ones need, transitively, that a bundle must carry beside
    them: not the system's, not those that come from elsewhere (FROM_ELSEWHERE). A needed library this
    machine does not have is a UserError naming who needs it."""
    found: dict[str, Path] = {}
    queue = [(path.name, path) for path in libraries]
    carried = {path.name for path in libraries}
    while queue:
        owner, path = queue.pop()
        for name in needed(path):
            if name in SYSTEM or name in FROM_ELSEWHERE or name in carried or name in found:
                continue
            location = find(name, path.parent)
            if location is None:
                raise UserError(f"{owner} needs {name}, which is not on this machine (install it, e.g. the "
                                f"CUDA runtime for libcudart, then bundle again)")
            found[name] = location
            queue.append((name, location))
    return found
