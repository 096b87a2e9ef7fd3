#!/usr/bin/env bash
# MFU of the training recipe on one GPU (prepared for the H200 machine; under 10 minutes).
# ~1.1B Llama from config (random init), bf16, seq 2048, ZeRO-2, packing; see bench/gpu_mfu.py.
# On a machine without the project's venv (the GPU image), wheels carried in .whl/ are installed
# first: deepspeed's own (pure Python; its CUDA ops JIT-build with nvcc) and its missing needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD/include${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_mfu.py "$@"
