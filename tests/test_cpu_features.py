"""CPU features without LLVM: /proc/cpuinfo flags in LLVM's names (what the runtime checks a CPU library's
recorded features against when TVM's compiler is absent) agree with LLVM's own reading of this CPU."""

from __future__ import annotations

import json

import pytest
import tvm_ffi

from qcompile.run import cpu_features

# A Sapphire Rapids guest's flags line (abridged): names that differ from LLVM's, and AVX-512 ones.
CPUINFO = """processor\t: 0
flags\t\t: fpu cx8 cmov mmx fxsr sse sse2 lm nopl pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes \
xsave avx f16c rdrand lahf_lm abm 3dnowprefetch bmi1 avx2 bmi2 avx512f avx512dq rdseed adx sha_ni avx512bw \
avx512vl avx_vnni avx512_bf16 avx512_vnni avx512_fp16 amx_tile
processor\t: 1
flags\t\t: fpu
"""


def test_cpuinfo_flags_map_to_llvm_names():
    features = cpu_features.from_cpuinfo(CPUINFO)
    assert {"x87", "64bit", "64bit-mode", "sse3", "sse4.1", "sse4.2", "crc32", "pclmul", "rdrnd", "sahf", "lzcnt",
            "bmi", "prfchw", "sha", "avxvnni", "avx512bf16", "avx512vnni", "avx512fp16", "amx-tile", "evex512",
            "nopl", "vzeroupper"} <= features
    assert not {"sse4_1", "pni", "lahf_lm", "bmi1", "sha_ni", "avx512_vnni"} & features  # cpuinfo spellings
    assert "avx10.1" not in features  # AVX10.1 needs the whole Sapphire Rapids AVX-512 set (no vbmi2 here)


def test_missing_leaves_out_instructions_no_kernel_contains():
    present = cpu_features.from_cpuinfo(CPUINFO)
    assert cpu_features.missing(["avx2", "pku", "xsaves", "vzeroupper"], present) == []
    assert cpu_features.missing(["avx512vbmi2", "avx2", "amx-tile-imaginary"], present) == [
        "amx-tile-imaginary", "avx512vbmi2"]
    assert cpu_features.missing(["avx2"], set()) == ["avx2"]  # no cpuinfo: refuse rather than run blind


def test_cpuinfo_agrees_with_llvm_on_this_cpu(debug_library):
    """Every extension LLVM detects on this CPU (CPUID) is read from /proc/cpuinfo too, except system
    instructions; and a library built here passes the runtime-only check."""
    llvm = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures", allow_missing=True)
    if llvm is None:
        import tvm  # noqa: F401 (registers LLVM's functions)

        llvm = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")
    detected = {name for name, on in llvm().items() if on}
    host = cpu_features.host_from_cpuinfo()
    if not host:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert cpu_features.missing(detected, host) == []
    recorded = json.loads((debug_library / "manifest.json").read_text())["target"]["cpu_features"]
    assert cpu_features.missing(recorded, host) == []
