#!/usr/bin/env bash
# Create .venv (idempotent) and install the project with its dev tools.
# torch comes first, pinned, so that nothing else pulls a multi-GB CUDA build on a CPU machine;
# on a GPU machine install the CUDA torch you want into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,hf,verbmem]"
