"""`accel demo`: every tiny family (or those named), baseline vs each preset, on CPU."""

from __future__ import annotations

import argparse
import time

from accel.cli._common import TINY_WARNING, add_timing_args, check_names, check_output, out, settings, split

NAME = "demo"
HELP = "offline CPU demo: every tiny family, baseline vs each preset"
DESCRIPTION = (
    "Offline, on CPU: for each tiny random-weight family (accel.zoo) run the unpatched baseline and each preset "
    "with the same seed, and print time, speed-up, computed/reused denoiser passes, fidelity to the baseline "
    "output, and what was applied."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from accel.presets import PRESET_NAMES

    p.add_argument("--families", help="comma-separated families (default: all)")
    p.add_argument("--presets", default=",".join(PRESET_NAMES), help="comma-separated presets (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (VLMs: new tokens); default per family")
    p.add_argument("--json", default="accel-demo.json", help="where to write the results (default: %(default)s)")
    add_timing_args(p, repeats=1, warmup=1)


def run(args) -> int:
    from tqdm.auto import tqdm

    from accel import zoo
    from accel.bench.family import bench_family
    from accel.bench.host import write_json
    from accel.bench.tables import results_doc, table_header, table_lines
    from accel.presets import PRESET_NAMES

    families = split(args.families) or list(zoo.FAMILIES)
    presets = split(args.presets)
    check_names("family", families, zoo.FAMILIES)
    check_names("preset", presets, PRESET_NAMES)
    check_output("--json", args.json)
    out(TINY_WARNING)
    out(
        f"baseline vs {', '.join(presets)} on {len(families)} tiny families, CPU, "
        f"{args.repeats} timed run(s) after {args.warmup} warm-up run(s) each\n"
    )
    for line in table_header():
        out(line)
    start = time.perf_counter()
    results = []
    for family in tqdm(families, desc="accel demo", unit="family", disable=True if args.quiet else None):
        result = bench_family(
            family,
            presets,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            progress=not args.quiet,
        )
        results.append(result)
        for line in table_lines(result):
            out(line)
    total = time.perf_counter() - start
    write_json(args.json, results_doc(NAME, settings(args), results, total, "cpu", tiny=True))
    out(f"\ntotal {total:.1f} s; JSON written to {args.json}")
    return 0
