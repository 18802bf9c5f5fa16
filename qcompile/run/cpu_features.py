"""The CPU side of verifying a library: which instruction-set extensions this CPU has, in LLVM's names (what
a CPU library's manifest records as `target.cpu_features`), and which recorded ones it lacks.

Two sources of the host's features, chosen by `run.tvm_runtime`: LLVM through full TVM (the features of the
CPU model LLVM detects, as the build recorded them), and, without TVM's compiler, the kernel's
/proc/cpuinfo flags mapped to LLVM's names here. No TVM is imported.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flag -> LLVM feature, where the two spell one extension differently (the others match).
CPUINFO_TO_LLVM = {
    "lm": "64bit", "fpu": "x87", "pni": "sse3", "sse4_1": "sse4.1", "sse4_2": "sse4.2",
    "pclmulqdq": "pclmul", "rdrand": "rdrnd", "lahf_lm": "sahf", "abm": "lzcnt", "bmi1": "bmi",
    "3dnowprefetch": "prfchw", "sha_ni": "sha", "ospke": "pku",
    "avx_vnni": "avxvnni", "avx_vnni_int8": "avxvnniint8", "avx_vnni_int16": "avxvnniint16",
    "avx_ifma": "avxifma", "avx_ne_convert": "avxneconvert",
    "avx512_vnni": "avx512vnni", "avx512_bitalg": "avx512bitalg", "avx512_vbmi2": "avx512vbmi2",
    "avx512_vpopcntdq": "avx512vpopcntdq", "avx512_bf16": "avx512bf16", "avx512_fp16": "avx512fp16",
    "avx512_vp2intersect": "avx512vp2intersect",
    "amx_tile": "amx-tile", "amx_int8": "amx-int8", "amx_bf16": "amx-bf16", "amx_fp16": "amx-fp16",
    "amx_complex": "amx-complex",
}

# LLVM features no cpuinfo flag names, implied by ones that do (all of them; LLVM derives them alike).
IMPLIED: dict[str, tuple[str, ...]] = {
    "crc32": ("sse4.2",),  # the CRC32 instruction is part of SSE4.2
    "64bit-mode": ("64bit",),  # the mode this (64-bit) process runs in
    "evex512": ("avx512f",),  # 512-bit EVEX encodings: every AVX-512 CPU before AVX10/256
    # AVX10.1 is Sapphire Rapids' AVX-512 set under one name (LLVM 22 reports it there; the kernel's
    # cpuinfo says "avx10" only on CPUs that enumerate AVX10 itself).
    "avx10.1": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512ifma", "avx512vbmi",
                "avx512vbmi2", "avx512vnni", "avx512bitalg", "avx512vpopcntdq", "avx512bf16", "avx512fp16",
                "vaes", "vpclmulqdq", "gfni"),
}

# LLVM features that are not properties of the CPU at all: "vzeroupper" is a code-generation preference
# (insert VZEROUPPER after AVX code; the instruction itself is AVX, recorded on its own).
NOT_CPU_PROPERTIES = frozenset({"vzeroupper"})

# System and OS-support instructions: LLVM emits them only for explicit intrinsics, which TVM's kernels
# never call, so a library cannot contain them and they are not requirements. A CPU model lists them, but
# a virtual machine may hide them (this project's build machine hides pku from its guests).
SYSTEM_FEATURES = frozenset({
    "pku", "invpcid", "fsgsbase", "rdpid", "rdpru", "xsave", "xsavec", "xsaveopt", "xsaves", "clflushopt",
    "clwb", "cldemote", "clzero", "movdiri", "movdir64b", "serialize", "tsxldtrk", "rtm", "hreset", "ptwrite",
    "pconfig", "sgx", "shstk", "uintr", "wbnoinvd", "waitpkg", "enqcmd", "kl", "widekl", "lwp", "mwaitx",
    "usermsr", "prefetchi",
})


def from_cpuinfo(text: str) -> set[str]:
    """LLVM's names of the extensions a /proc/cpuinfo text lists for its first processor (x86)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            break
    features = {CPUINFO_TO_LLVM.get(flag, flag) for flag in flags}
    if "avx10" in flags:
        features.add("avx10.1")
    features |= {implied for implied, by in IMPLIED.items() if features.issuperset(by)}
    return features | NOT_CPU_PROPERTIES


def host_from_cpuinfo() -> set[str]:
    """This CPU's extensions from /proc/cpuinfo (empty where there is none, or not on x86: every recorded
    feature then counts as missing, so a library is refused rather than run blind)."""
    if platform.machine() not in ("x86_64", "AMD64") or not CPUINFO.is_file():
        return set()
    return from_cpuinfo(CPUINFO.read_text())


def missing(recorded: Iterable[str], present: set[str]) -> list[str]:
    """The recorded features a library's code may use that this CPU lacks, sorted."""
    return sorted(set(recorded) - SYSTEM_FEATURES - NOT_CPU_PROPERTIES - present)
