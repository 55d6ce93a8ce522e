#!/usr/bin/env bash
# Train both reference models on a GPU within a time budget, from scratch: larger batches and more steps than
# the CPU defaults, each stage capped by time, then score each pipeline's prompt following (50 prompts by default) into
# $OUT/<model>-scores.json. The pipelines land in $OUT/ref-flux and $OUT/ref-wan; copy them over
# accel/zoo/weights/ after checking their scores against the shipped ones (benchmarks/RESULTS.md).
#
#   benchmarks/train_reference_gpu.sh --budget 480 --out DIR
#   benchmarks/train_reference_gpu.sh --budget 60 --out DIR -- --device cpu --steps 2   (a smoke run: arguments
#                                                                  after -- go to the trainer and override these)
set -euo pipefail
budget=480
out=${OUT:-reference-gpu}
python=${PYTHON:-python3}
prompts=50
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --score-prompts) prompts=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--budget SECONDS] [--out DIR] [--score-prompts N] [-- TRAINER ARGUMENTS]" >&2; exit 2 ;;
  esac
done
# Per model: 15% of its share for the VAE, the rest for the transformer; a minute and a half kept for saving and
# scoring.
half=$("$python" -c "print(max(0.5, ($budget - 90) / 2 / 60))")
vae=$("$python" -c "print(round($half * 0.15, 2))")
dit=$("$python" -c "print(round($half * 0.85, 2))")
device=cuda
for arg in "$@"; do [ "${previous:-}" = --device ] && device=$arg; previous=$arg; done  # score where it trained
work=$(mktemp -d)
mkdir -p "$out"
for name in ref-flux ref-wan; do
  "$python" -m accel.zoo.train "$name" --device cuda --threads 8 --work "$work/$name" --out "$out/$name" \
    --vae-batch 64 --vae-steps 100000 --vae-minutes "$vae" --batch 256 --steps 1000000 --minutes "$dit" --quiet "$@"
done
for name in ref-flux ref-wan; do
  "$python" -m accel.bench.prompt_eval "$name" --path "$out/$name" --n "$prompts" --device "$device" > "$out/$name-scores.json"
done
echo "trained and scored: $out/ref-flux $out/ref-wan (scores: $out/ref-flux-scores.json $out/ref-wan-scores.json)"
