"""The TVM runtime that libraries run on, and the one place that knows where it comes from.

Two sources, one interface (`Runtime`):
- full TVM (the `apache-tvm` wheel, its compiler included) when it is importable: `import tvm` loads
  libtvm_runtime.so, and this CPU's features come from LLVM, as the build recorded them;
- TVM's runtime shared objects and `apache-tvm-ffi` alone, with no `import tvm`: a deploy bundle's runtime
  folder (`$QCOMPILE_TVM_RUNTIME`, written by `qcompile bundle`), or an apache-tvm install whose
  libtvm_compiler.so is absent. libtvm_runtime.so is loaded here with ctypes (RTLD_GLOBAL, as `import tvm`
  does), and this CPU's features come from /proc/cpuinfo (`run.cpu_features`).

After loading, everything goes through the global functions libtvm_runtime.so registers with tvm-ffi, the
same in both cases. Tensors are always allocated by the runtime and filled by copy, never wrapped numpy
memory: TVM's kernels assume 64-byte-aligned buffers and use aligned vector loads (vmovaps), so a numpy
buffer passed through DLPack (16-byte aligned) faults in the first kernel that reads it. That was the
segfault of the first runtime-only attempt (see ../shared/notes/tvm-0.27.md, Deploy).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

from ..errors import UserError
from . import cpu_features

RUNTIME_DIR = "QCOMPILE_TVM_RUNTIME"  # a runtime folder: the shared objects + RECORD (a bundle sets it)
RECORD = "tvm-runtime.json"  # in a runtime folder: {"tvm": version, "tvm_build": id}
RUNTIME_LIBRARY = "libtvm_runtime.so"
# Sort/top-k (MoE routing calls tvm.contrib.sort.*), random and Disco: in the compiler library with full
# TVM, in this one without it.
EXTRA_LIBRARY = "libtvm_runtime_extra.so"
COMPILER_LIBRARY = "libtvm_compiler.so"
# Per GPU kind: the runtime library that registers its device API and code loader, and that loader's name.
DEVICE_LIBRARY = {"cuda": "libtvm_runtime_cuda.so", "rocm": "libtvm_runtime_rocm.so"}
CODE_LOADER = {"cuda": "ffi.Module.load_from_bytes.cuda", "rocm": "ffi.Module.load_from_bytes.hip"}
_POOLED_ALLOCATOR = 2  # the VM's allocator kind (TVM's VirtualMachine.POOLED_ALLOCATOR, its default)
_EXIST, _COMPUTE_VERSION = 0, 4  # runtime.GetDeviceAttr attribute ids (TVM's DeviceAttrKind)


@dataclasses.dataclass(frozen=True)
class RuntimeFiles:
    """Where TVM's runtime shared objects are, and which TVM they are."""

    directory: Path
    version: str
    build: str  # tvm_build_id(): tells apart two builds of one version


def tvm_build_id(distribution: importlib.metadata.Distribution | None = None) -> str:
    """Which TVM binaries these are: a digest of the sha256s that the apache-tvm wheel's RECORD lists for
    its shared libraries (the wheel carries no commit hash; this tells apart two builds of one version)."""
    try:
        distribution = distribution or importlib.metadata.distribution("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed from a wheel)"
    record = distribution.read_text("RECORD") or ""
    libraries = sorted(line for line in record.splitlines() if re.search(r"/libtvm[^/]*\.so,", line))
    return hashlib.sha256("\n".join(libraries).encode()).hexdigest()[:16] if libraries else "unknown"


def installed_runtime_files() -> RuntimeFiles:
    """The runtime of the installed apache-tvm wheel, found from its metadata (no `import tvm`)."""
    try:
        distribution = importlib.metadata.distribution("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("no TVM runtime: install apache-tvm, or run from a folder `qcompile bundle` wrote "
                        f"(its launchers set {RUNTIME_DIR})") from None
    directory = Path(str(distribution.locate_file("tvm/lib")))
    return RuntimeFiles(directory, distribution.version, tvm_build_id(distribution))


def read_runtime_folder(directory: Path) -> RuntimeFiles:
    """A runtime folder `qcompile bundle` wrote: the shared objects and RECORD naming their TVM."""
    path = Path(directory) / RECORD
    try:
        record = json.loads(path.read_text())
        return RuntimeFiles(Path(directory), str(record["tvm"]), str(record["tvm_build"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{RUNTIME_DIR}={directory}: not a TVM runtime folder (no readable {RECORD})") from None


def _compiler_installed() -> bool:
    """Whether full TVM can be imported: the tvm package with its compiler library beside the runtime."""
    spec = importlib.util.find_spec("tvm")
    return spec is not None and any((Path(p) / "lib" / COMPILER_LIBRARY).is_file()
                                    for p in spec.submodule_search_locations or ())


class VirtualMachine:
    """The Relax VM of a loaded library on one device: `vm[name]` is an entry point."""

    def __init__(self, module: Any, device: tvm_ffi.Device):
        self.module = module["vm_load_executable"]()
        devices = [device] if device.dlpack_device_type() == 1 else [device, tvm_ffi.device("cpu", 0)]
        # (kind, index, allocator) per device; a GPU VM also needs the CPU, where shape functions run
        # (as TVM's own VirtualMachine sets it up).
        self.module["vm_initialization"](*[v for d in devices for v in (d.dlpack_device_type(), d.index,
                                                                         _POOLED_ALLOCATOR)])

    def __getitem__(self, name: str) -> Any:
        return self.module[name]

    def set_instrument(self, instrument: Any) -> None:
        """Call `instrument(func, name, before, result, *args)` around every call the VM makes (None: stop)."""
        self.module["set_instrument"](instrument)


class Runtime:
    """TVM's runtime in this process: devices, tensors, modules, the VM, and what verification asks of it."""

    def __init__(self, files: RuntimeFiles, full_tvm: bool):
        self.files, self.full_tvm = files, full_tvm
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy_from = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
        self._copy_to = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
        self._device_attr = tvm_ffi.get_global_func("runtime.GetDeviceAttr")
        self._device_libraries: dict[str, str | None] = {}  # kind -> why it did not load (None: loaded)

    @property
    def version(self) -> str:
        return self.files.version

    @property
    def source(self) -> str:
        return "tvm" if self.full_tvm else f"runtime libraries in {self.files.directory}"

    def device(self, kind: str) -> tvm_ffi.Device:
        return tvm_ffi.device(kind, 0)

    def empty(self, shape: tuple[int, ...], dtype: str, device: tvm_ffi.Device) -> Any:
        """A runtime-allocated (aligned) tensor on `device`, not initialised (on the CPU, pages the
        kernels never write are never touched)."""
        return self._alloc(tvm_ffi.Shape(shape), tvm_ffi.dtype(dtype), device, None)

    def tensor(self, array: Any, device: tvm_ffi.Device) -> Any:
        """A runtime-allocated (aligned) tensor on `device` holding a copy of `array`."""
        array = np.ascontiguousarray(array)
        tensor = self.empty(array.shape, str(array.dtype), device)
        self._copy_from(tensor, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)
        return tensor

    def numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of a tensor on any device."""
        array = np.empty(tuple(tensor.shape), np.dtype(str(tensor.dtype)))
        self._copy_to(tensor, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)
        return array

    def load_module(self, path: Path) -> Any:
        return tvm_ffi.load_module(str(path))

    def virtual_machine(self, module: Any, device: tvm_ffi.Device) -> VirtualMachine:
        return VirtualMachine(module, device)

    def cpu_features(self) -> set[str]:
        """This CPU's instruction-set extensions in LLVM's names: LLVM's own reading with full TVM, else
        /proc/cpuinfo's."""
        if self.full_tvm:
            from ..spec.target import host_cpu_features  # noqa: PLC0415 (needs the compiler's LLVM)

            return host_cpu_features()
        return cpu_features.host_from_cpuinfo()

    def _load_device_library(self, kind: str) -> str | None:
        """Load the GPU kind's runtime library from this runtime's folder (once); why not, or None."""
        if kind not in self._device_libraries:
            path = self.files.directory / DEVICE_LIBRARY[kind]
            why = None
            if not path.is_file():
                why = f"this TVM runtime cannot load {kind} code (no {path.name} in {path.parent})"
            else:
                try:  # for its registrations only: local, as TVM loads it
                    ctypes.CDLL(str(path), ctypes.RTLD_LOCAL)
                except OSError as e:  # its own dependencies missing: the driver (libcuda), the CUDA runtime
                    why = f"this TVM runtime cannot load {kind} code ({str(e).splitlines()[0]})"
            self._device_libraries[kind] = why
        return self._device_libraries[kind]

    def gpu_present(self, kind: str, arch: str) -> tuple[bool, str]:
        """A GPU of `kind` this runtime can load code for, and of the library's arch (sm_NN, gfxNNN);
        (False, why) otherwise. ROCm is unverified here: the PyPI runtime has no ROCm loader."""
        why = self._load_device_library(kind)
        if why is None and tvm_ffi.get_global_func(CODE_LOADER[kind], allow_missing=True) is None:
            why = f"this TVM runtime cannot load {kind} code (no {CODE_LOADER[kind]})"
        if why is not None:
            return False, why
        device = self.device(kind)
        if not self._device_attr(device.dlpack_device_type(), 0, _EXIST):
            return False, f"no {kind} device on this machine"
        version = str(self._device_attr(device.dlpack_device_type(), 0, _COMPUTE_VERSION))  # "9.0"
        found = ("sm_" if kind == "cuda" else "gfx") + version.replace(".", "")
        return (True, found) if found == arch else (False, f"this GPU is {found}, not {arch}")


LIBRARY_PATH = "TVM_LIBRARY_PATH"  # TVM's own override: runtime libraries found here before the wheel's


def _preload_library_path() -> None:
    """With full TVM and $TVM_LIBRARY_PATH (runtime libraries of the same TVM commit built with NCCL, say:
    scripts/build-tvm-runtime-nccl.sh), load its libtvm_runtime.so and libtvm_runtime_extra.so globally
    before `import tvm`: TVM finds libtvm_runtime there itself, but the wheel's compiler library would
    pull in the wheel's libtvm_runtime_extra.so (Disco and its collectives) by its own rpath, unless one
    of that name is loaded already."""
    directory = os.environ.get(LIBRARY_PATH)
    if not directory or "tvm" in sys.modules:
        return
    for name in (RUNTIME_LIBRARY, EXTRA_LIBRARY):
        library = Path(directory) / name
        if library.is_file():
            try:
                ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise UserError(f"{LIBRARY_PATH}={directory}: cannot load {name}: {str(e).splitlines()[0]}") from None


@functools.cache
def runtime() -> Runtime:
    """This process's TVM runtime, loaded on first use. Full TVM when it is importable (or already
    imported: a second libtvm_runtime.so cannot live beside the first); otherwise the runtime folder that
    $QCOMPILE_TVM_RUNTIME names, or the installed apache-tvm's runtime without its compiler."""
    folder = os.environ.get(RUNTIME_DIR)
    if "tvm" in sys.modules or (not folder and _compiler_installed()):
        _preload_library_path()
        import tvm  # noqa: PLC0415

        files = RuntimeFiles(Path(tvm.libinfo.find_libtvm_runtime()).parent, tvm.__version__, tvm_build_id())
        return Runtime(files, full_tvm=True)
    files = read_runtime_folder(Path(folder)) if folder else installed_runtime_files()
    for name in (RUNTIME_LIBRARY, EXTRA_LIBRARY):
        library = files.directory / name
        try:  # global, as `import tvm` loads it: the libraries loaded after it resolve its symbols
            ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise UserError(f"cannot load TVM's runtime {library}: {str(e).splitlines()[0]}") from None
    return Runtime(files, full_tvm=False)


def loaded() -> bool:
    """Whether TVM's runtime is in this process (its thread pool size is then fixed)."""
    return "tvm" in sys.modules or runtime.cache_info().currsize > 0
