#!/usr/bin/env bash
# Build TVM's runtime libraries with NCCL, at the exact commit of the installed apache-tvm wheel, so that
# tensor-parallel / pipelined CUDA libraries can run (the PyPI wheel is built with USE_NCCL=OFF: its runtime
# has no `runtime.disco.compiled_ccl`, and `qcompile run` of such a library refuses, naming this script).
#
#   scripts/build-tvm-runtime-nccl.sh [OUT_DIR]        (default: build/tvm-runtime-nccl)
#   export TVM_LIBRARY_PATH=$PWD/build/tvm-runtime-nccl
#   qcompile run LIB --weights CKPT ...                 (LIB built with --tensor-parallel N --target cuda-...)
#
# What it builds: libtvm_runtime.so, libtvm_runtime_extra.so (Disco + NCCL) and libtvm_runtime_cuda.so,
# from github.com/apache/tvm at the wheel's commit (tvm/_version.py `commit_id`), USE_CUDA=ON, USE_NCCL
# pointing at PyPI's nvidia-nccl-cu<CUDA major> (installed into this venv if missing), no LLVM (the
# compiler stays the wheel's). TVM reads $TVM_LIBRARY_PATH before its own lib/ folder, and qcompile loads
# that folder's runtime libraries ahead of the wheel's (run/tvm_runtime.py), in the controller and in every
# Disco worker. The commit must be the wheel's: the wheel's compiler library links against these.
#
# Needs: git, cmake >= 3.18, ninja, a C++17 compiler, the CUDA toolkit (nvcc on PATH or CUDA_PATH), network
# access to github.com and PyPI. Env: PYTHON (default .venv/bin/python), TVM_SOURCE (an existing clone to
# use instead of cloning), CUDA_ARCHS (default "80;90"), JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=$(realpath -m "${1:-build/tvm-runtime-nccl}")
PYTHON=${PYTHON:-.venv/bin/python}
WORK=$(realpath -m build/tvm-runtime-nccl-work)
JOBS=${JOBS:-$(nproc)}
mkdir -p "$WORK" "$OUT"

# The wheel's version and commit (read from its files: importing tvm is not needed).
read -r VERSION COMMIT < <("$PYTHON" - <<'EOF'
import importlib.metadata, importlib.util, pathlib, re
version = importlib.metadata.version("apache-tvm")
source = pathlib.Path(importlib.util.find_spec("tvm").submodule_search_locations[0], "_version.py").read_text()
commit = re.search(r"commit_id = '(g?[0-9a-f]+)'", source).group(1).removeprefix("g")
print(version, commit)
EOF
)
echo "apache-tvm $VERSION, commit $COMMIT"

# NCCL from PyPI, for this CUDA toolkit's major version. TVM's FindNCCL looks for `nccl_static`: the wheel
# has only libnccl.so.2, so a staging folder names it so (the link records its SONAME, libnccl.so.2).
NVCC=${CUDA_PATH:+$CUDA_PATH/bin/}nvcc
CUDA_MAJOR=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
"$PYTHON" -m pip install --quiet "nvidia-nccl-cu${CUDA_MAJOR}"
NCCL_ROOT=$("$PYTHON" -c 'import nvidia.nccl, pathlib; print(pathlib.Path(list(nvidia.nccl.__path__)[0]))')
STAGE="$WORK/nccl"
rm -rf "$STAGE" && mkdir -p "$STAGE/lib"
ln -s "$NCCL_ROOT/include" "$STAGE/include"
ln -s "$NCCL_ROOT/lib/libnccl.so.2" "$STAGE/lib/libnccl_static.so"
ln -s "$NCCL_ROOT/lib/libnccl.so.2" "$STAGE/lib/libnccl.so"

SRC=${TVM_SOURCE:-$WORK/tvm}
if [ ! -d "$SRC/.git" ]; then
    git clone --filter=blob:none https://github.com/apache/tvm "$SRC"
fi
git -C "$SRC" fetch --quiet origin "$COMMIT" 2>/dev/null || true
git -C "$SRC" checkout --quiet "$COMMIT"
git -C "$SRC" submodule update --init --recursive --quiet

start=$(date +%s)
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DUSE_CUDA=ON -DUSE_NCCL="$STAGE" -DUSE_LLVM=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-80;90}"
cmake --build "$WORK/build" -j "$JOBS" --target tvm_runtime tvm_runtime_extra tvm_runtime_cuda
for lib in libtvm_runtime.so libtvm_runtime_extra.so libtvm_runtime_cuda.so; do
    cp -L "$(find "$WORK/build" -name "$lib" -print -quit)" "$OUT/"
done
echo "built in $(( $(date +%s) - start )) s"

# The check qcompile makes before running a split CUDA library.
TVM_LIBRARY_PATH="$OUT" LD_LIBRARY_PATH="$NCCL_ROOT/lib:${LD_LIBRARY_PATH:-}" "$PYTHON" - <<'EOF'
from qcompile.run import tvm_runtime
tvm_runtime.runtime()
import tvm_ffi
ccl = tvm_ffi.get_global_func("runtime.disco.compiled_ccl", allow_missing=True)
assert ccl is not None and ccl() == "nccl", "the built runtime has no NCCL"
print("runtime.disco.compiled_ccl:", ccl())
EOF
echo "export TVM_LIBRARY_PATH=$OUT LD_LIBRARY_PATH=$NCCL_ROOT/lib:\$LD_LIBRARY_PATH"
