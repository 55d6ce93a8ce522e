#!/usr/bin/env bash
# Every GPU benchmark once, JSON into one folder (default benchmarks/results/<date>), logs beside it.
# Usage: benchmarks/run_all.sh [out_dir] [minutes_per_script]
# Meant for one H100-class GPU; each script gets a time limit so one slow part cannot eat the lease.
set -u
out=${1:-benchmarks/results/$(date +%Y%m%d-%H%M)}
minutes=${2:-8}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {
  name=$1; shift
  echo "== $name: $*"
  timeout "${minutes}m" python "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
  echo "== $name exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
run attention        benchmarks/attention.py --e2e
run sparse_attention benchmarks/sparse_attention.py
run quant            benchmarks/quant.py
run pruning          benchmarks/pruning.py
run caching          benchmarks/caching.py
