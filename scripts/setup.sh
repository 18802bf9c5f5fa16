#!/usr/bin/env bash
# Sets up .venv with qcompile and its test/reference extra (torch 2.13.0 CPU build, transformers, pytest).
# Idempotent: a second run only checks. Needs Python >= 3.11 (set PYTHON to choose one).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
echo "setup: installing qcompile[test] into .venv (first run: a few minutes)"
# pip's notes about absent local package mirrors are noise here; real errors still fail the script.
.venv/bin/python -m pip install -q --progress-bar off --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; }
.venv/bin/python -m pip install -q --progress-bar off -e '.[test]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
.venv/bin/python -c "import tvm, torch, transformers; print(f'setup: ok (tvm {tvm.__version__}, torch {torch.__version__}, transformers {transformers.__version__})')"
