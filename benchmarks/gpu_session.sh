#!/usr/bin/env bash
# One lent GPU session in one device command: ref-vlm trained on the GPU for VLM_MINUTES, then every GPU benchmark
# (run_all.sh) in the time left of TOTAL seconds; logs and results packed into $OUT (at most 8 files come back).
#
#   benchmarks/gpu_session.sh TOTAL VLM_MINUTES        e.g. benchmarks/gpu_session.sh 540 4
#
# Carry .whl (benchmarks/README.md, "On a lent GPU machine"): the wheels are installed first when present.
# DEVICE=cpu with a few seconds of TOTAL checks the script here (the benchmarks then need --tiny: BENCH_ARGS).
# SCENES: images per training step (default 128). The training step no longer grows in operations with the scenes
# (one batched prefix pass); on 2026-12-04, before that, 64 scenes took 0.205 s a step on the H200, dispatch-bound.
set -u
total=${1:?usage: $0 TOTAL_SECONDS VLM_MINUTES}
vlm_minutes=${2:?usage: $0 TOTAL_SECONDS VLM_MINUTES}
out=${OUT:-gpu-session}
device=${DEVICE:-cuda}
scenes=${SCENES:-128}
python=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi -L 2>&1
  "$python" -c 'import torch, transformers, triton; print(torch.__version__, torch.version.cuda, transformers.__version__, triton.__version__)'
} > "$out/env.txt" 2>&1

# ref-vlm: the recipe's stages, capped by time; the workers draw scenes while the GPU trains
work=$(mktemp -d)
timeout $((${vlm_minutes%.*} * 60 + 180)) "$python" -m accel.zoo.train_vlm --device "$device" --workers 12 --threads 4 \
  --scenes "$scenes" --steps 1000000 --finish-steps 200000 --minutes "$vlm_minutes" --eval-minutes 1 \
  --work "$work" --out "$work/ref-vlm" --quiet > "$out/vlm.log" 2>&1
echo "ref-vlm training exit $?" >> "$out/vlm.log"
tar -czf "$out/vlm.tgz" -C "$work" . 2>> "$out/vlm.log"

left=$((total - ($(date +%s) - start) - 15))
echo "benchmarks: $left s left" >> "$out/env.txt"
if [ "$left" -gt 30 ]; then
  "$python" benchmarks/run_budget.py --budget "$left" --out "$work/bench" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
  echo "run_all exit $?" >> "$out/bench.log"
  tar -czf "$out/bench.tgz" -C "$work" bench
  cp "$work/bench/summary.md" "$out/" 2>/dev/null
fi
tail -3 "$out/vlm.log"; tail -1 "$work/log.jsonl" 2>/dev/null; cat "$out/env.txt"; cat "$out/summary.md" 2>/dev/null
