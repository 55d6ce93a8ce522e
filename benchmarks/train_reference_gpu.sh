#!/usr/bin/env bash
# Train both reference models on a GPU within a time budget, from scratch: larger batches and more steps than
# the CPU defaults, each stage capped by time. The pipelines land in $OUT/ref-flux and $OUT/ref-wan; copy them
# over accel/zoo/weights/ after checking their scores:
#   python -m accel.bench.prompt_eval ref-flux --path $OUT/ref-flux
#
#   benchmarks/train_reference_gpu.sh --budget 480 --out DIR
set -euo pipefail
budget=480
out=${OUT:-reference-gpu}
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--budget SECONDS] [--out DIR]" >&2; exit 2 ;;
  esac
done
# Per model: 15% of its share for the VAE, the rest for the transformer, a minute kept for saving.
half=$(python3 -c "print(max(1.0, ($budget - 60) / 2 / 60))")
vae=$(python3 -c "print(round($half * 0.15, 2))")
dit=$(python3 -c "print(round($half * 0.85, 2))")
work=$(mktemp -d)
for name in ref-flux ref-wan; do
  python -m accel.zoo.train "$name" --device cuda --threads 8 --work "$work/$name" --out "$out/$name" \
    --vae-batch 64 --vae-steps 100000 --vae-minutes "$vae" --batch 256 --steps 1000000 --minutes "$dit" --quiet
done
echo "trained: $out/ref-flux $out/ref-wan"
