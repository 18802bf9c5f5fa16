#!/usr/bin/env bash
# Sets up .venv with qcompile and its test/reference extra (torch 2.13.0 CPU build, transformers, pytest).
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
.venv/bin/python -c "import tvm, torch, transformers; print(f'setup: ok (tvm {tvm.__version__}, torch {torch.__version__}, transformers {transformers.__version__})')"
