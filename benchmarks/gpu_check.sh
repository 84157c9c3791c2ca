#!/usr/bin/env bash
# The GPU path, checked in one run (< 8 min on one GPU): whole-slide read-only, model-only and end-to-end
# tiles/s, e2e / read and e2e / MONAI PatchInferer, then the `gpu` tests (slide path, one training step).
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine
#   PY=python bash benchmarks/gpu_check.sh    # another interpreter (default: .venv/bin/python, else python3)
#
# Without CUDA it is a dry run: the same steps on the CPU on a small slide (a syntax and plumbing check;
# its numbers say nothing about a GPU), and the gpu tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-/tmp/medwsol_gpu_check}"
mkdir -p "$OUT"
start=$(date +%s)

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")'
  WORKERS="${WORKERS:-$(( $(nproc) > 9 ? 8 : $(nproc) - 1 ))}"
  ARGS=(--device cuda --amp auto --batch "${BATCH:-64}" --workers "$WORKERS" --width 16384 --height 12288
        --model-batches 20 --repeats 2 --rss-sizes '')
else
  echo "DRY RUN: no CUDA device visible; the same steps on the CPU, small slide (numbers are not GPU figures)"
  ARGS=(--device cpu --amp off --batch 8 --workers 1 --width 2048 --height 2048 --model-batches 2 --repeats 1
        --rss-sizes '' --no-pipeline-model)
fi
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" benchmarks/slide_throughput.py "${ARGS[@]}" --out "$OUT" 2> "$OUT/throughput.err" \
  || { tail -20 "$OUT/throughput.err"; exit 1; }

echo
echo "## gpu tests"
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -5
echo
echo "gpu_check: $(( $(date +%s) - start )) s"
