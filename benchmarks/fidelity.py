#!/usr/bin/env python
"""Fidelity benchmark of issue 12, in full, on CPU: accel's caches and sparse attention against diffusers' and
cache-dit's caches on the reference models, side by side in one run.

On ``ref-flux`` and ``ref-wan`` (``accel.zoo.reference``: the trained weights under ``accel/zoo/weights`` when they
exist; otherwise random weights, with a warning, and every table says so), the same seeded domain prompts
(``accel.zoo.shapes.sample_scenes``) and seeds for every method: the unpatched pipeline, then each method of
``accel.bench.fidelity_methods`` (accel presets and a threshold / target ladder; sparse attention and sparse +
caching; diffusers FirstBlockCache, TaylorSeer, MagCache calibrated on another prompt, FasterCache, Pyramid
Attention Broadcast; cache-dit DBCache with and without TaylorSeer). A method that cannot run on a model is a row
saying why. Per method: passes computed of the generation's transformer passes (CFG: two per step), attention
calls computed, PSNR and SSIM against the unpatched output, prompt score (``accel.bench.prompt_score``) and CPU
wall-clock time per generation. ``accel.bench.fidelity`` documents every column and how passes are counted.

Usage::

    python benchmarks/fidelity.py                          # both models, 8 prompts, every method (tens of minutes)
    python benchmarks/fidelity.py --models ref-wan --seeds 4 --methods "accel threshold,diffusers MagCache"
    python benchmarks/fidelity.py --tiny                   # random weights, 1 prompt, 4 steps: checks the script

Writes the JSON (default ``benchmarks/results/fidelity-cpu.json``) and the plot of PSNR against the share of
passes computed, one line per method family (default ``benchmarks/fidelity.png``), and prints the markdown tables
for ``benchmarks/RESULTS.md`` and, per accel cache setting, the best peer's PSNR at no more passes computed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="ref-flux,ref-wan", help="reference models, comma-separated")
    p.add_argument("--seeds", type=int, default=8, help="seeded prompts per model (default 8)")
    p.add_argument("--seed", type=int, default=0, help="first seed (prompts and generators)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the reference's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the reference's)")
    p.add_argument("--methods", default=None, help="method families or names, comma-separated (default: all)")
    p.add_argument("--weights", default="auto", choices=("auto", "trained", "random"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a busy CPU)")
    p.add_argument("--check-undo", action="store_true", help="rerun one prompt after each removal and compare")
    p.add_argument("--tiny", action="store_true", help="random weights, 1 prompt, 4 steps: checks the script")
    p.add_argument("--json", default=str(HERE / "results" / "fidelity-cpu.json"))
    p.add_argument("--plot", default=str(HERE / "fidelity.png"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.tiny:
        args.weights, args.seeds, args.steps = "random", 1, 4
        if args.json == p.get_default("json"):
            args.json = str(HERE / "results" / "fidelity-cpu-tiny.json")
        if args.plot == p.get_default("plot"):
            args.plot = str(HERE / "results" / "fidelity-tiny.png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from accel.bench.fidelity import comparison, markdown, plot, run_fidelity
    from accel.bench.host import environment, write_json

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run_fidelity(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        seeds=args.seeds,
        steps=args.steps,
        guidance=args.guidance,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        seed=args.seed,
        weights=args.weights,
        progress=not args.quiet,
        check_undo=args.check_undo,
    )
    result.update(env=environment("cpu"), threads=args.threads, total_time_s=round(time.perf_counter() - start, 1))
    lines = comparison(result)
    result["headline"] = "; ".join(line for line in lines if "balanced target" in line) or "no balanced row"
    print(markdown(result))
    print("\n".join(lines))
    write_json(args.json, result)
    print(f"JSON written to {args.json}")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    try:
        print(f"plot written to {plot(result, args.plot)}")
    except ImportError as err:
        print(f"no plot: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
