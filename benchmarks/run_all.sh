#!/usr/bin/env bash
# Every GPU benchmark once within a time budget, most important first; JSON per item into one folder.
# Usage: benchmarks/run_all.sh --budget SECONDS [--out DIR] [--tiny] [--only ITEM,...] [--plan]
#   e.g. benchmarks/run_all.sh --budget 480 --out /tmp/bench      (one GPU; see benchmarks/README.md)
#        benchmarks/run_all.sh --budget 480 --tiny                 (the same plan on CPU at tiny shapes)
# The plan, the estimates and the summary are in benchmarks/run_budget.py.
# PYTHON picks the interpreter (default python3); every item runs under the same one.
set -eu
exec "${PYTHON:-python3}" "$(dirname "$0")/run_budget.py" "$@"
