#!/usr/bin/env bash
# The prepared GPU check (issue 8): cbscope's LoRRA step against the official-style loop on a
# random-initialised ~0.85B Llama in bf16 (step time, peak torch.cuda.max_memory_allocated), plus
# a correctness check (every cbscope step's loss is finite), and the cached row (issue 20: the
# frozen representations read from cbscope.lorra.frozen's cache, filled in the warm-up). About 1 minute on an H200 (49 s of
# script, plus the machine's start); results in $OUT (bench_gpu.json, bench_gpu.log, env.txt).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --cpu-smoke              # here: a tiny model on the CPU, seconds
#
# The GPU image has torch/transformers/peft/accelerate but not transformer_lens (and its
# datasets/dill/multiprocess): carry them from the local venv, e.g. the device tool's
# carry=[.venv/lib/python3.11/site-packages/{transformer_lens,datasets,dill,multiprocess,_multiprocess}]
# and the dill/datasets/multiprocess *.dist-info folders (pure Python); they are linked into a private folder on PYTHONPATH, never the whole venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  SMOKE=1
  PY="${PYTHON:-.venv/bin/python}"
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
      for meta in "$SITE/$pkg"-*.dist-info; do  # datasets reads dill's version from its metadata
        [[ -e "$meta" ]] && ln -sfn "$PWD/$meta" "$EXTRA/$(basename "$meta")"
      done
    fi
  done
  export PYTHONPATH="$EXTRA:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"  # cbscope from this checkout (not installed there)

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("transformers", "peft", "accelerate", "safetensors", "tokenizers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
import transformer_lens.model_bridge  # noqa: F401  (fails early if the carry is missing)
import cbscope.lorra.trainer  # noqa: F401
print("imports ok")
EOF

if [[ "$SMOKE" == 1 ]]; then
  "$PY" benchmarks/bench_gpu.py --tiny --device cpu --settings 2x32 --steps 2 --warmup 1 \
    --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/env.txt" || true
  timeout 480 "$PY" benchmarks/bench_gpu.py --device cuda --dtype bfloat16 --threads 8 \
    --settings 8x512,16x1024 --steps 8 --warmup 2 \
    --model-dir /tmp/random-llama-1b --out "$OUT/bench_gpu.json" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/bench_gpu.log"
fi
echo "gpu_check done: $OUT/bench_gpu.json"
