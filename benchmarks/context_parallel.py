#!/usr/bin/env python
"""accel under diffusers' context parallelism (Ulysses), several GPUs, random weights: speed-up and fidelity.

Needs a multi-GPU machine; NOT RUN YET (none was available when it was written; `--tiny` checks the script on CPU).
One launch is one Ulysses degree, the number of processes torchrun starts::

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py            # Ulysses 2
    torchrun --nproc-per-node 4 benchmarks/context_parallel.py            # Ulysses 4
    torchrun --nproc-per-node 8 benchmarks/context_parallel.py            # Ulysses 8
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --tiny     # CPU, gloo, tiny config: checks the script

Scenario: the Wan2.1-T2V-1.3B transformer (released config, random weights; `accel.bench.scenarios.WanScenario`) at
1280x720, 81 frames -> latent [1, 16, 21, 90, 160] (75,600 video tokens), 50 steps, CFG as two calls per step, bf16.
The 14B model has the same blocks, wider and deeper; its timings need its weights on every rank (context parallelism
replicates them), which this random-weight script does not shard.

Every rank builds the same weights (same seed), enables `ContextParallelConfig(ulysses_degree=WORLD)`, then per
variant patches (enable_parallelism first, then accel.patch: the supported order), times the denoising loop and
unpatches. Variants: baseline (no accel), accel balanced (step cache), accel int8 attention, accel balanced + int8.
Reported per variant by rank 0: median time, speed-up against the parallel baseline, passes reused, PSNR and relative
L1 of the final latent against the parallel baseline's, and whether every rank got the same latent and took the same
cache decisions (gathered from all ranks). The baseline of one GPU is another launch (`--nproc-per-node 1`), so that
the speed-up of parallelism itself is the ratio of the two baselines.

Results: a table on stdout and JSON at `--json` (default benchmarks/results/context-parallel-u<degree>-<gpu>.json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any

VARIANTS = {
    "baseline": None,
    "accel balanced": {"cache": "balanced"},
    "accel int8": {"cache": False, "attention": "int8"},
    "accel balanced + int8": {"cache": "balanced", "attention": "int8"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--height", type=int, default=None, help="pixels (default 720; tiny: 64)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 1280; tiny: 64)")
    p.add_argument("--frames", type=int, default=None, help="default 81 (tiny: 9)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; tiny: 12)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU over gloo: checks the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if "RANK" not in os.environ:
        p.error("launch with torchrun, e.g. torchrun --nproc-per-node 2 benchmarks/context_parallel.py")
    return args


def _setup(args: argparse.Namespace):
    import torch
    import torch.distributed as dist

    if args.tiny:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        # diffusers picks each rank's device as rank % torch.accelerator.device_count(), 0 without GPUs.
        torch.accelerator.device_count = lambda: 1
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        sys.exit("benchmarks/context_parallel.py needs CUDA GPUs; use --tiny to check the script on CPU")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device, torch.bfloat16


def _keywords(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    import dataclasses

    from accel.presets import preset_configs

    out = dict(spec)
    if out.get("cache") == "balanced":  # a bare transformer: final-step protection needs the step count
        out["cache"] = dataclasses.replace(preset_configs("balanced")["cache"], num_steps=steps)
    return out


def _same_everywhere(value: Any) -> bool:
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(g == gathered[0] for g in gathered)


def run_variant(name: str, scn, model, inputs, steps: int, args, baseline) -> dict[str, Any]:
    import torch

    import accel
    from accel.bench.measure import median, time_calls
    from accel.bench.metrics import latent_fidelity

    spec = VARIANTS[name]
    handle = accel.patch(model, **_keywords(spec, steps)) if spec is not None else None
    try:
        latents = scn.denoise(model, inputs, steps)
        times = time_calls(lambda: scn.denoise(model, inputs, steps), args.repeats, args.warmup, scn.device)
        row: dict[str, Any] = dict(name=name, median_s=median(times), times_s=times)
        calls = handle.report().stats.get("cache", {}).get("calls", []) if handle is not None else []
        decisions = {b: v["reused"] for b, v in calls[-1]["branches"].items()} if calls else {}
        row["reused"] = sum(len(v) for v in decisions.values())
        row["passes"] = steps * len(scn.branches)
        row["same_decisions_on_all_ranks"] = _same_everywhere(decisions)
    finally:
        if handle is not None:
            accel.unpatch(model)
    checksum = float(latents.double().sum())
    row["same_latent_on_all_ranks"] = _same_everywhere(checksum)
    reference = latents if baseline is None else baseline
    row.update(latent_fidelity(latents.float().cpu(), reference.float().cpu()))
    row["latent"] = latents if baseline is None else None
    if scn.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _table(rows: list[dict[str, Any]], degree: int, info: dict[str, Any]) -> None:
    print(f"\n== Wan2.1-1.3B (random weights) {info['pixels']} x {info['frames']} frames, Ulysses {degree} ==")
    print(f"{'variant':<24}{'median s':>10}{'speed-up':>10}{'reused':>10}{'PSNR dB':>10}{'ranks agree':>13}")
    base = rows[0]["median_s"]
    for r in rows:
        psnr = "identical" if r["identical"] else f"{r['psnr_db']:.1f}" if r["psnr_db"] else "-"
        agree = r["same_latent_on_all_ranks"] and r["same_decisions_on_all_ranks"]
        print(
            f"{r['name']:<24}{r['median_s']:>10.3f}{base / r['median_s']:>9.2f}x"
            f"{r['reused']:>5}/{r['passes']:<4}{psnr:>10}{'yes' if agree else 'NO':>13}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = _setup(args)
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from accel.bench.host import default_json_path, environment, write_json
    from accel.bench.scenarios import WanScenario

    degree, rank = dist.get_world_size(), dist.get_rank()
    size = dict(height=args.height or (64 if args.tiny else 720), width=args.width or (64 if args.tiny else 1280))
    size["frames"] = args.frames or (9 if args.tiny else 81)
    scn = WanScenario(args.tiny, device, dtype, args.seed, **size)
    steps = args.steps or (12 if args.tiny else 50)
    model = scn.build()
    if degree > 1:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    inputs = scn.make_inputs()
    rows: list[dict[str, Any]] = []
    for name in ["baseline", *[v for v in args.variants.split(",") if v != "baseline"]]:
        rows.append(run_variant(name, scn, model, inputs, steps, args, rows[0]["latent"] if rows else None))
    for row in rows:
        row.pop("latent")
    if rank == 0:
        info = scn.describe()
        _table(rows, degree, info)
        env = environment(device)
        doc = dict(
            benchmark="accel under context parallelism (Ulysses)",
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            ulysses_degree=degree,
            steps=steps,
            scenario=info,
            rows=rows,
            env=env,
            headline="; ".join(f"{r['name']} {rows[0]['median_s'] / r['median_s']:.2f}x" for r in rows[1:]),
        )
        name = f"context-parallel-u{degree}"
        write_json(args.json or default_json_path(Path(__file__).parent / "results", name, env, args.tiny), doc)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
