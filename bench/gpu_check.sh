#!/usr/bin/env bash
# The GPU check, for a GPU machine lent for a few minutes (under 8): run from the repository root,
#   bash bench/gpu_check.sh            # prints one JSON line (the last line of output)
# It uses .venv when that has torch with CUDA, else whatever python3 has it; otherwise it installs
# torch (pinned, CUDA build) and rayft into .venv (pip's index or local wheels: PIP_FIND_LINKS) first.
# Checks: bitsandbytes 4-bit (nf4, fp4) QLoRA steps on CUDA; full fine-tuning under DeepSpeed ZeRO-3 over
# NCCL on one GPU; tokens/s and MFU of full / lora / qlora on a ~0.5B VLM built from config; and
# torch.cuda.max_memory_allocated against the memory planner's prediction.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0


PY=""
for candidate in .venv/bin/python python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c "import torch, bitsandbytes, deepspeed, ray, orchestrator, yaml; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=$candidate; break
  fi
done
if [ -z "$PY" ]; then
  echo "installing into .venv (torch==$TORCH_VERSION with CUDA, rayft and its deps)" >&2
  python3 -m venv .venv >&2 && .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" >&2 \
    && DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e . >&2 && PY=.venv/bin/python
fi
if [ -z "$PY" ] || ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo '{"gpu_check": "not run", "reason": "no python with torch+CUDA and rayft could be found or installed"}'
  exit 1
fi
export PATH="$(dirname "$(command -v "$PY")"):$PATH" RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
exec "$PY" bench/gpu_check.py "$@"
