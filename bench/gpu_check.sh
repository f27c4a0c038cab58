#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a GPU machine lent for a few minutes; prints ONE JSON line (the last line
# of stdout; everything else goes to stderr). From the repository root:
#   bash bench/gpu_check.sh [--tiny] [--only worker_qlora,zero3] [--budget 300]
# The python: .venv's, or python3's, where it has rayft's dependencies (transformers >= 5.24); otherwise
# python3 with the wheels carried in .whl/ (bench/gpu_bundle.sh fills it; the lent machine has no index)
# installed into /tmp/site. rayft itself runs from this tree (PYTHONPATH), Ray is not needed.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false \
  RAY_USAGE_STATS_ENABLED=0 DS_SKIP_CUDA_CHECK=1
# shellcheck disable=SC2016
NEEDS='import torch, pydantic, yaml, pyarrow, peft, bitsandbytes, deepspeed, transformers
from packaging.version import Version
assert Version(transformers.__version__) >= Version("5.24"), transformers.__version__'
SITE=/tmp/site

PY="" ENV_SAID=""
if [ -x .venv/bin/python ] && .venv/bin/python -c "$NEEDS" >/dev/null 2>&1; then
  PY=.venv/bin/python ENV_SAID=".venv"
elif python3 -c "$NEEDS" >/dev/null 2>&1; then
  PY=python3 ENV_SAID="python3 as found"
elif compgen -G ".whl/*.whl" >/dev/null; then
  t0=$(date +%s)
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >&2; then
    # no pip: a wheel is a zip of what goes into site-packages
    python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('$SITE') for w in sorted(glob.glob('.whl/*.whl'))]" >&2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # DeepSpeed JIT-builds its ops (CPU Adam) on first use: somewhere writable, not under the system's prefix
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
  if python3 -c "$NEEDS" >/dev/null 2>&1; then
    PY=python3 ENV_SAID="python3 + .whl/ installed into $SITE in $(( $(date +%s) - t0 )) s"
  else
    python3 -c "$NEEDS" >&2 2>&1
  fi
fi
if [ -z "$PY" ]; then
  echo '{"gpu_check": "not run", "reason": "no python with torch and rayft'"'"'s dependencies, and no usable wheels in .whl/ (run bench/gpu_bundle.sh where an index is reachable, and carry .whl)"}'
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAYFT_GPU_CHECK_ENV="$ENV_SAID"
echo "gpu_check: python $PY ($ENV_SAID)" >&2
exec "$PY" bench/gpu_check.py "$@"
