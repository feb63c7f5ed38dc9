#!/usr/bin/env bash
# One command for a lent GPU: every `cuda`-marked test, then the CUDA rows of the benchmarks, in under
# 8 minutes; the tables go to a file (default: $OUT/cuda_check.md on the device tool, else
# benchmarks/cuda_check.md).
#
#   bash benchmarks/cuda_check.sh --dry-run     # here, without a GPU: list what would run
#   bash benchmarks/cuda_check.sh [FILE]        # on the GPU machine
#
# The GPU machine has torch, timm, transformers, pluggy and typer but not torchao, torch-pruning,
# diffusers or tomesd: download them here first with `bash benchmarks/cuda_wheels.sh` (into .whl/, which
# .git/info/exclude ignores) and carry `.whl` in the device call; this script installs them, and
# model-opt with its plugins, into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--dry-run" ]; then
  echo "# would run: the cuda-marked tests"
  "$PY" -m pytest -m cuda --collect-only -q -p no:cacheprovider 2>/dev/null | grep '::' || {
    echo "(could not collect the tests here)"; }
  echo "# would run: the CUDA benchmark rows"
  "$PY" benchmarks/gpu.py --list
  exit 0
fi

REPORT=${1:-${OUT:-benchmarks}/cuda_check.md}
if ! "$PY" -c "import model_opt, model_opt_torchao" 2>/dev/null; then
  echo "installing model-opt, its plugins and the carried wheels into /tmp/site"
  mkdir -p /tmp/site
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
    . plugins/torchao plugins/torch-pruning plugins/tome plugins/tomesd plugins/svd plugins/fusion || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/model-opt-inductor

{
  echo "# CUDA check: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "- torch", torch.__version__)')"
  echo
  echo '## cuda-marked tests'
  echo '```'
} > "$REPORT"
timeout 300 "$PY" -m pytest -m cuda -q -p no:cacheprovider -rA tests plugins 2>&1 | tail -40 | tee -a "$REPORT"
tests=${PIPESTATUS[0]}
{ echo '```'; echo; echo '## benchmark rows'; echo; } >> "$REPORT"
timeout 180 "$PY" benchmarks/gpu.py 2>&1 | tee -a "$REPORT"
bench=${PIPESTATUS[0]}
echo "tables written to $REPORT (tests exit $tests, benchmark exit $bench)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
