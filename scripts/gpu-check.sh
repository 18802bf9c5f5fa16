#!/usr/bin/env bash
# The GPU check of issue 14: every debug model's cuda-sm90 library against transformers on the same GPU
# (float16 and float32 tiers from qcompile/data/), then decode benchmarks for qwen2-0.5b and qwen2-7b's
# shapes (4 of its 28 layers), printing one JSON report (qcompile/measure/gpu_check.py holds the logic).
#
#   scripts/gpu-check.sh prepare [--device cuda|cpu] [--bench MODEL[:LAYERS]]... [--debug MODEL]... [DIR]
#       here, with the full install (TVM's compiler, nvcc): builds the libraries and bundles them into DIR
#       (default build/gpu-check; a few MB, under the 64 MiB the device tool carries).
#   scripts/gpu-check.sh run [DIR] [--report FILE]
#       on the GPU machine, no TVM wheel: the bundle's runtime, this checkout's qcompile, the python3
#       there (torch, transformers). Exit 0 when every tier is met, 1 when one is missed, 2 on bad input.
#       Fits one device call: about 5 of its 8 minutes by estimate (not yet measured on a GPU).
#   --device cpu (prepare) makes the same check for this CPU (float32 tier, a tiny benchmark model): the
#   plumbing and the report's shape, where no GPU is.
#
# On the device tool (apache-tvm-ffi is not installed there: carry its cp312 wheel, downloaded here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl apache-tvm-ffi==0.1.14.post1
# after `echo /.whl/ >> .git/info/exclude`), carry build/gpu-check and .whl, and run
#   scripts/gpu-check.sh run build/gpu-check --report $OUT/h200.json
# which installs the carried wheels into a private directory first when tvm_ffi is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:-}
[ $# -gt 0 ] && shift
case "$phase" in
  prepare)
    python=.venv/bin/python
    [ -x "$python" ] || { echo "gpu-check: prepare needs the full install (scripts/setup.sh)" >&2; exit 2; }
    args=() dir=build/gpu-check
    while [ $# -gt 0 ]; do
      case "$1" in
        --device|--bench|--debug) args+=("$1" "$2"); shift 2 ;;
        -*) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
        *) dir=$1; shift ;;
      esac
    done
    exec "$python" -m qcompile.measure.gpu_check prepare "$dir" "${args[@]}"
    ;;
  run)
    python=${PYTHON:-python3}
    args=() dir=build/gpu-check
    while [ $# -gt 0 ]; do
      case "$1" in
        --report) args+=("$1" "$2"); shift 2 ;;
        -*) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
        *) dir=$1; shift ;;
      esac
    done
    if ! "$python" -c "import tvm_ffi" 2>/dev/null; then
      wheels=(.whl/*.whl)
      [ -e "${wheels[0]}" ] || { echo "gpu-check: no tvm_ffi here and no .whl/ to install it from" >&2; exit 2; }
      site=$(mktemp -d)
      "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # This checkout's qcompile (the transformers reference lives in it, not in the bundle); TVM's runtime
    # comes from the bundle (gpu_check sets QCOMPILE_TVM_RUNTIME), never from an installed TVM.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    exec "$python" -m qcompile.measure.gpu_check run "$dir" "${args[@]}"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
