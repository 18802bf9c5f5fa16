"""GPU device code built ahead of time, and reading it back out of a library.

TVM packs a library's device modules into one blob, the symbol `__tvm_ffi__library_bin` of model.so:
  <nbytes: u64> then <indptr: vec<u64>> <children: vec<u64>> and per module <kind: str> [<payload: str>]
  ("_lib" is the host code itself, without payload; str/vec = u64 length + data, little endian)
A "cuda" or "hip" payload is <format: str> <function table> <code: bytes>.

CUDA: the PyPI TVM cannot compile device code itself without a GPU driver (it keeps CUDA C source, to
be compiled when loaded). `cuda_fpack_imports` takes over export_library's packing step: each module of
CUDA source becomes a fatbin from nvcc (a cubin for the target arch + PTX for later GPUs), format
"fatbin", which TVM's CUDA loader hands to cuModuleLoadData unchanged. No compiler on the deployment side.
ROCm: TVM links a HSA code object with ld.lld; `rocm_code_object(v)` pins its code-object version.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError

BLOB_SYMBOL = b"__tvm_ffi__library_bin"
# The flags TVM's own nvcc path passes (tvm.support.nvcc), so kernels compile the same way.
NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
              *(f"-U__CUDA_NO_{t}_{w}__" for t in ("HALF", "BFLOAT16", "BFLOAT162")
                for w in ("OPERATORS", "CONVERSIONS"))]
FATBIN_MAGIC = 0xBA55ED50
AMDGPU_MACHINES = {0x30: "gfx908", 0x3F: "gfx90a", 0x40: "gfx940", 0x4C: "gfx942", 0x4F: "gfx950",
                   0x41: "gfx1100"}
CODE_OBJECT_VERSIONS = {2: 4, 3: 5, 4: 6}  # ELF EI_ABIVERSION -> AMDHSA code object version


# --- reading ------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.at)
        self.at += 8
        return value

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def bytes_(self) -> bytes:
        return self.take(self.u64())

    def u64s(self) -> list[int]:
        n = self.u64()
        return list(struct.unpack("<" + "Q" * n, self.take(8 * n)))


def _symbol_offset(elf: bytes, name: bytes) -> int | None:
    """File offset of a defined symbol of an ELF64 little-endian file (.symtab or .dynsym)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return None
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    entsize, count, _ = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strings = sections[link][4]
        for i in range(size // 24):
            st_name, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", elf, offset + i * 24)
            end = elf.index(b"\0", strings + st_name)
            if elf[strings + st_name:end] == name and shndx != 0:
                section = sections[shndx]
                return value - section[3] + section[4]
    return None


def device_modules(library: Path) -> list[dict[str, Any]]:
    """The device modules packed in a library .so: kind, format, code size and what the code is."""
    elf = Path(library).read_bytes()
    at = _symbol_offset(elf, BLOB_SYMBOL)
    if at is None:
        return []
    reader = _Reader(elf[at + 8:at + 8 + struct.unpack_from("<Q", elf, at)[0]])
    indptr, _ = reader.u64s(), reader.u64s()
    found = []
    for _ in range(len(indptr) - 1):
        kind = reader.bytes_().decode()
        if kind == "_lib":
            continue
        payload = reader.bytes_()
        if kind in ("cuda", "hip"):
            fmt, code = _split_device_payload(payload)
            found.append({"kind": kind, "format": fmt, "bytes": len(code), **describe(code)})
    return found


def _split_device_payload(payload: bytes) -> tuple[str, bytes]:
    """<format: str> <function table> <code: bytes> -> (format, code); the code is the last field."""
    reader = _Reader(payload)
    fmt = reader.bytes_().decode()
    for _ in range(reader.u64()):  # the function table
        reader.bytes_()
        reader.bytes_()
        reader.take(4 * reader.u64())  # argument types: (u8 code, u8 bits, u16 lanes)
        for _ in range(reader.u64()):
            reader.bytes_()
        reader.take(4 * reader.u64())
    return fmt, reader.bytes_()


def describe(code: bytes) -> dict[str, Any]:
    """What a device binary holds: {"code": fatbin|cubin|hsaco|ptx|cuda-source, arch details}."""
    if len(code) >= 16 and struct.unpack_from("<I", code)[0] == FATBIN_MAGIC:
        return {"code": "fatbin", **_fatbin_entries(code)}
    if code[:4] == b"\x7fELF":
        machine, flags = struct.unpack_from("<H", code, 18)[0], struct.unpack_from("<I", code, 0x30)[0]
        if machine == 224:  # EM_AMDGPU
            return {"code": "hsaco", "arch": AMDGPU_MACHINES.get(flags & 0xFF, hex(flags & 0xFF)),
                    "code_object_version": CODE_OBJECT_VERSIONS.get(code[8])}
        if machine == 190:  # EM_CUDA
            return {"code": "cubin", "cubin": [f"sm_{flags & 0xFF}"]}
    text = code[:4096].decode("latin1")
    if ".target" in text and ".version" in text:
        return {"code": "ptx", "ptx": re.findall(r"\.target\s+(sm_\d+)", text)}
    return {"code": "cuda-source" if b"__global__" in code else "unknown"}


def _fatbin_entries(code: bytes) -> dict[str, list[str]]:
    """Entries of a fatbin: kind 1 = PTX (listed as compute_N), 2 = cubin (sm_N); arch at +28."""
    _, _, header, size = struct.unpack_from("<IHHQ", code)
    cubins, ptx, at = [], [], header
    while at < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", code, at)
        (arch,) = struct.unpack_from("<I", code, at + 28)
        (cubins if kind == 2 else ptx).append(f"{'sm' if kind == 2 else 'compute'}_{arch}")
        at += entry_header + payload
    return {"cubin": cubins, "ptx": ptx}


# --- building: CUDA ---------------------------------------------------------------------------------

def nvcc() -> str | None:
    return shutil.which("nvcc")


@functools.cache
def nvcc_version() -> str | None:
    if nvcc() is None:
        return None
    out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return found.group(2) if found else out.strip().splitlines()[-1]


def gencode(arch: str) -> list[str]:
    """sm_90 -> a cubin for sm_90 and PTX for compute_90 (which newer GPUs' drivers JIT-compile)."""
    number = arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{number},code=sm_{number}",
            "-gencode", f"arch=compute_{number},code=compute_{number}"]


def cuda_fpack_imports(arch: str, log: Callable[[str], None]) -> Callable[..., str]:
    """An `export_library(fpack_imports=...)` hook: TVM's own import blob, with every CUDA-source
    module replaced by nvcc's fatbin, assembled into the object that carries the blob."""
    from tvm.runtime import _ffi_api  # noqa: PLC0415

    def pack(module, is_system_lib, symbol_prefix, workspace_dir) -> str:
        if is_system_lib or symbol_prefix:
            raise UserError("system-lib exports are not supported for CUDA targets")
        blob = _ffi_api.ModulePackImportsToTensor(module).numpy().tobytes()
        work = Path(workspace_dir)
        packed = _rewrite_cuda_modules(blob, lambda source: _nvcc_fatbin(source, arch, work, log))
        (work / "devc.bin").write_bytes(packed)
        (work / "devc.S").write_text(
            '\t.section .rodata.__tvm_ffi__library_bin,"a"\n\t.p2align 4\n'
            "\t.globl __tvm_ffi__library_bin\n\t.type __tvm_ffi__library_bin, @object\n"
            f'__tvm_ffi__library_bin:\n\t.incbin "{work / "devc.bin"}"\n'
            "\t.size __tvm_ffi__library_bin, .-__tvm_ffi__library_bin\n"
            '\t.section .note.GNU-stack,"",@progbits\n')
        subprocess.run(["cc", "-c", str(work / "devc.S"), "-o", str(work / "devc.o")], check=True)
        return str(work / "devc.o")

    return pack


def _rewrite_cuda_modules(blob: bytes, compile_source: Callable[[bytes], bytes]) -> bytes:
    """TVM's blob (with its u64 length) with each "cuda" module of format "cuda" (source) compiled."""
    reader = _Reader(blob[8:8 + struct.unpack_from("<Q", blob)[0]])
    indptr, children = reader.u64s(), reader.u64s()
    out = [_vec(indptr), _vec(children)]
    for _ in range(len(indptr) - 1):
        kind = reader.bytes_()
        out.append(_str(kind))
        if kind == b"_lib":
            continue
        payload = reader.bytes_()
        if kind == b"cuda":
            fmt, code = _split_device_payload(payload)
            if fmt == "cuda":
                table = payload[8 + len(fmt):len(payload) - 8 - len(code)]
                payload = _str(b"fatbin") + table + _str(compile_source(code))
        out.append(_str(payload))
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _vec(values: list[int]) -> bytes:
    return struct.pack("<Q" + "Q" * len(values), len(values), *values)


def _nvcc_fatbin(source: bytes, arch: str, work: Path, log: Callable[[str], None]) -> bytes:
    if nvcc() is None:
        raise UserError("CUDA targets need nvcc on PATH to build device code")
    (work / "kernels.cu").write_bytes(source)
    command = [nvcc(), "--fatbin", *gencode(arch), *NVCC_FLAGS, "-o", str(work / "kernels.fatbin"),
               str(work / "kernels.cu")]
    log(f"      nvcc {nvcc_version()}: {len(source) // 1024} KiB of CUDA -> fatbin ({arch} + PTX)")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on TVM's generated kernels: {done.stderr.strip()[-2000:]}")
    return (work / "kernels.fatbin").read_bytes()


# --- building: ROCm ---------------------------------------------------------------------------------

ROCM_PATH = "/usr/lib/x86_64-linux-gnu"  # Debian's rocm-device-libs put amdgcn/bitcode here
LLD_NAMES = ("ld.lld-22", "ld.lld-21", "ld.lld-20", "ld.lld-19", "ld.lld")


def rocm_device_libs(root: str = ROCM_PATH) -> Path | None:
    bitcode = Path(root) / "amdgcn" / "bitcode"
    return bitcode if (bitcode / "ocml.bc").is_file() else None


@functools.cache
def lld() -> tuple[str, int] | None:
    """The ld.lld TVM will use (it searches ld.lld-<llvm major> first) and its major version."""
    for name in LLD_NAMES:
        path = shutil.which(name)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            found = re.search(r"LLD (\d+)", out)
            return path, int(found.group(1)) if found else 0
    return None


@contextlib.contextmanager
def rocm_code_object(version: int) -> Iterator[None]:
    """While building, link one more bitcode module whose only content is the module flag
    `amdhsa_code_object_version` (TVM 0.27 defaults to v6, which ROCm older than 6.3 cannot load)."""
    import tempfile  # noqa: PLC0415

    import tvm  # noqa: PLC0415
    import tvm_ffi  # noqa: PLC0415
    from tvm.support import rocm  # noqa: PLC0415

    workdir = tempfile.TemporaryDirectory(prefix="qcompile-rocm-")
    flag = Path(workdir.name) / f"code_object_v{version}.ll"
    flag.write_text('!llvm.module.flags = !{!0}\n'
                    f'!0 = !{{i32 1, !"amdhsa_code_object_version", i32 {version * 100}}}\n')
    original = rocm.callback_rocm_bitcode_path
    abi = f"oclc_abi_version_{version * 100}.bc"

    def bitcode_path(rocdl_dir=None):
        files = [str(f) for f in original(rocdl_dir)]
        # the device libraries' ABI-version module must agree with the code object's
        files = [f for f in files if "oclc_abi_version_" not in Path(f).name]
        if (Path(files[0]).parent / abi).is_file():
            files.append(str(Path(files[0]).parent / abi))
        return tvm.runtime.convert([*files, str(flag)])

    tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", bitcode_path, override=True)
    try:
        yield
    finally:
        tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", original, override=True)
        workdir.cleanup()


# --- what the pipeline calls ------------------------------------------------------------------------

def toolchain(target: Any) -> dict[str, Any]:
    """Versions of the tools that build a target's device code (part of the build identity)."""
    if target.device == "cuda":
        return {"nvcc": nvcc_version()}
    if target.device == "rocm":
        found = lld()
        return {"ld.lld": found[1] if found else None,
                "rocm_device_libs": str(rocm_device_libs()) if rocm_device_libs() else None}
    return {}


@contextlib.contextmanager
def build_context(target: Any) -> Iterator[None]:
    """Around tvm.compile: ROCm needs the device libraries' root and a pinned code-object version."""
    if target.device != "rocm":
        yield
        return
    import os  # noqa: PLC0415

    os.environ.setdefault("ROCM_PATH", ROCM_PATH)
    with rocm_code_object(int(target.device_code["code_object_version"])):
        yield


def export_options(target: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """export_library keyword arguments: CUDA packs nvcc's fatbin in place of CUDA source."""
    if target.device == "cuda":
        return {"fpack_imports": cuda_fpack_imports(target.arch, log)}
    return {}


def check_library(target: Any, library: Path) -> dict[str, Any] | None:
    """The device code a built library carries, checked against what the target asks for; returns
    the manifest's `device_code` record. A mismatch is a build failure, not a library."""
    if target.device == "cpu":
        return None
    modules = device_modules(library)
    want = target.device_code
    if target.device == "cuda":
        number = target.arch.removeprefix("sm_")
        ok = modules and all(m["code"] == "fatbin" and m["cubin"] == [target.arch]
                             and m["ptx"] == [f"compute_{number}"] for m in modules)
        expected = f"a fatbin with a cubin for {target.arch} and PTX for compute_{number}"
    else:
        ok = modules and all(m["code"] == "hsaco" and m["arch"] == target.arch
                             and m["code_object_version"] == want["code_object_version"] for m in modules)
        expected = f"an HSA code object v{want['code_object_version']} for {target.arch}"
    if not ok:
        raise RuntimeError(f"{library}: device code is not {expected}: {modules}")
    return {"format": want["format"], "arch": target.arch, "modules": modules, "toolchain": toolchain(target)}
