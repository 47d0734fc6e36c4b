#!/usr/bin/env bash
# GPU check of the llama3-8b-rr preset (issue 19): a random Llama with Llama-3-8B's shape in bf16,
# made-up data in the official format, the --dry-run estimate, then 3 real steps on cuda (step
# time, peak memory against the estimate, finite losses). Results in $OUT/gpu_official.json.
#
#   OUT=/some/dir bash benchmarks/gpu_official.sh          # on the GPU machine, from the repo root
#   bash benchmarks/gpu_official.sh --cpu-smoke            # here: a tiny shape on the CPU, seconds
#
# Like benchmarks/gpu_check.sh, transformer_lens (and datasets/dill/multiprocess) are linked from
# the local venv when the GPU image lacks them (carry those site-packages folders).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
ARGS=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  PY="${PYTHON:-.venv/bin/python}"
  ARGS+=(--smoke)
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
SITE=.venv/lib/python3.11/site-packages
if ! "$PY" -c "import transformer_lens" 2>/dev/null; then
  EXTRA=/tmp/cbscope_site
  mkdir -p "$EXTRA"
  for pkg in transformer_lens datasets dill multiprocess _multiprocess; do
    if [[ -e "$SITE/$pkg" ]] && ! "$PY" -c "import $pkg" 2>/dev/null; then
      ln -sfn "$PWD/$SITE/$pkg" "$EXTRA/$pkg"
      for meta in "$SITE/$pkg"-*.dist-info; do
        [[ -e "$meta" ]] && ln -sfn "$PWD/$meta" "$EXTRA/$(basename "$meta")"
      done
    fi
  done
  export PYTHONPATH="$EXTRA:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" benchmarks/gpu_official.py --out "$OUT" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_official.log"
