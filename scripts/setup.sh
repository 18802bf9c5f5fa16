#!/usr/bin/env bash
# Sets up .venv with qcompile and its test/reference extra (torch 2.13.0 CPU build, transformers, pytest),
# and the ROCm cross-build tools (apt).
# Idempotent: it reinstalls only when pyproject.toml changed since the last successful run.
# Needs Python >= 3.11 (set PYTHON to choose one).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.qcompile-setup
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing qcompile[test] into .venv (first run: a few minutes)"
  # pip's notes about absent local mirrors and setuptools' editable-install banner are noise here;
  # real errors still fail the script (pipefail).
  quiet() { grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" -e "^ *[!*]*$" \
              -e "Please be careful with folders" -e "name as your package" -e "with strategy, WheelFile" || true; }
  .venv/bin/python -m pip install -q --progress-bar off --upgrade pip 2>&1 | quiet
  .venv/bin/python -m pip install -q --progress-bar off -e '.[test]' 2>&1 | quiet
  echo "$want" > "$stamp"
fi
# Cross-building for ROCm needs ld.lld >= 19 and the ROCm device libraries: Debian packages, installed
# once (nvcc for the CUDA targets comes with the image). Without them the rocm targets say what is
# missing (`qcompile targets list`) and the rest works.
if ! command -v ld.lld-22 >/dev/null || [ ! -f /usr/lib/x86_64-linux-gnu/amdgcn/bitcode/ocml.bc ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
    echo "setup: installing lld-22 and rocm-device-libs (apt) for ROCm cross-builds"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        --no-install-recommends lld-22 rocm-device-libs; } >/dev/null 2>&1 \
      || echo "setup: apt-get could not install lld-22 rocm-device-libs; rocm targets will not build"
  else
    echo "setup: no root/apt: rocm targets need 'apt-get install lld-22 rocm-device-libs'"
  fi
fi
.venv/bin/python -c "import tvm, torch, transformers; print(f'setup: ok (tvm {tvm.__version__}, torch {torch.__version__}, transformers {transformers.__version__})')"
