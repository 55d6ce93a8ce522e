#!/usr/bin/env python
"""Step-caching benchmark at real model shapes, random weights, one CUDA GPU.

What it measures: for each scenario, the denoising loop of the real diffusers pipeline is replayed on the
transformer alone (no text encoders, no VAE), with every caching variant side by side in one process:

- ``baseline``: no cache;
- ``diffusers FBC <t>``: diffusers' own First Block Cache,
  ``transformer.enable_cache(FirstBlockCacheConfig(threshold=t))``;
- ``accel balanced`` / ``accel fast``: the step-cache configs of accel's presets (``preset_configs(name)["cache"]``);
- ``accel thr <t>``: ``accel.CacheConfig(threshold=t)``;
- ``baseline (re-run)``: the baseline once more at the end: drift of the GPU clock over the session, and proof that
  ``disable_cache()`` / ``accel.unpatch`` left the model as it was (its latent must equal the baseline's).

For each: median time over ``--repeats`` runs after ``--warmup`` untimed runs (``accel.bench.measure.time_calls``:
CUDA events around each run, after the queue is drained), speedup against the baseline of the same process, peak
``torch.cuda.max_memory_allocated`` during the timed runs, denoiser passes computed/reused in one run, and the
fidelity of the final latent against the baseline's final latent from the same seed (PSNR with both latents mapped
to [0, 1] by the baseline's min/max, and relative L1 ``sum|x - ref| / sum|ref|``).

The weights are random (built from the released configs, nothing is downloaded), so the timings are real - same
shapes, same kernels - but fidelity is only closeness to the random baseline, and how many steps a threshold
reuses depends on the weights: a trained model's first-block signal differs, so read the skip counts and
speedups as "cost per reused step and overhead of the cache", not as what a trained model would get.

Scenarios (``--scenario``):

- ``wan``: Wan2.1-T2V-1.3B, 832x480, 81 frames -> latent [1, 16, 21, 60, 104] (32,760 video tokens), 50 steps,
  classifier-free guidance as two transformer calls per step (``cache_context("cond")`` / ``("uncond")``, with
  the ``step_index`` / ``sigma`` / ``num_inference_steps`` the real ``WanPipeline`` attaches), text embeddings
  [1, 512, 4096] (umT5-XXL), guidance 5.0. Scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (the released
  pipeline ships UniPC with ``flow_shift=3.0``; Euler is used here for simplicity, see benchmarks/README.md).
- ``flux``: FLUX.1-dev, 1024x1024 -> 4096 packed image tokens [1, 4096, 64] + 512 text tokens (T5-XXL, 4096 wide),
  pooled CLIP-L [1, 768], 28 steps, guidance-distilled (one call per step under ``cache_context("cond")``, distilled
  guidance 3.5), ``timestep / 1000``, ``txt_ids`` / ``img_ids`` as ``FluxPipeline`` builds them, the released
  scheduler config (dynamic shift, mu from the image sequence length).

Call boundaries: like the real pipelines (``DiffusionPipeline.maybe_free_model_hooks``), every denoising loop ends
with a reset of the transformer's stateful hooks (the scenario's ``denoise``). That resets diffusers' FBC state and closes accel's call, so every run
is its own call in ``handle.report().stats["cache"]["calls"]`` (the script checks that there is one call per run,
each with all the passes of one run). accel is given the bare transformer here, so ``CacheConfig(num_steps=steps)``
is set for its final-step protection.

Usage::

    python benchmarks/caching.py                        # both scenarios, 3 timed runs each, on cuda:0
    python benchmarks/caching.py --scenario flux --repeats 5
    python benchmarks/caching.py --tiny --repeats 1     # tiny configs, CPU, float32: checks the script itself

The scenarios, the loop and the measurements are `accel.bench.scenarios` and `accel.bench.denoise`; this script
picks the variants and writes the table and the JSON.

Results: a table on stdout and JSON at ``--json`` (default ``benchmarks/results/caching-<gpu>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any

NO_GPU_MESSAGE = "benchmarks/caching.py needs a CUDA GPU; use --tiny to check the script on CPU"
DTYPES = ("bf16", "fp16", "fp32")


def make_variants(args: argparse.Namespace, steps: int) -> list:
    from accel import CacheConfig
    from accel.bench.denoise import diffusers_cache
    from accel.bench.harness import Variant
    from accel.presets import preset_configs

    def ours(name: str, config: CacheConfig) -> Variant:
        return Variant(name, {"cache": config})

    variants = [Variant("baseline", kind="baseline")]
    variants += [diffusers_cache(th) for th in args.fbc_thresholds]
    for preset in args.accel_presets:
        cfg = preset_configs(preset)["cache"]
        if cfg is not None:  # "lossless": no step cache
            variants.append(ours(f"accel {preset}", dataclasses.replace(cfg, num_steps=steps)))
    variants += [ours(f"accel thr {th:g}", CacheConfig(threshold=th, num_steps=steps)) for th in args.accel_thresholds]
    # Threshold 0 never reuses: against the baseline these show the hooks' own overhead, and against each
    # other the cost of the one host-device sync per step that decision="current" adds.
    for decision in ("lagged", "current"):
        variants.append(
            ours(f"accel overhead {decision}", CacheConfig(threshold=0.0, decision=decision, num_steps=steps))
        )
    if args.variants:
        wanted = set(args.variants)
        variants = [v for v in variants if v.kind == "baseline" or v.name in wanted]
    if not args.no_rerun:
        variants.append(Variant("baseline (re-run)", kind="baseline-rerun"))
    return variants


def run_scenario(key: str, args: argparse.Namespace, device, dtype) -> dict[str, Any]:
    import torch

    from accel.bench.denoise import compare_denoise, format_row
    from accel.bench.scenarios import SCENARIOS

    scn = SCENARIOS[key](args.tiny, device, dtype, args.seed)
    steps = args.steps or scn.default_steps
    info = scn.describe()
    info.update(steps=steps, dtype=str(dtype).replace("torch.", ""), passes_per_run=steps * len(scn.branches))
    print(f"\n[{key}] building {scn.title} ({'tiny' if args.tiny else 'released config'}) on {device} ...", flush=True)
    t0 = time.perf_counter()
    model = scn.build()
    info.update(parameters=sum(p.numel() for p in model.parameters()), build_s=round(time.perf_counter() - t0, 1))
    inputs = scn.make_inputs()
    if device.type == "cuda":
        info["weights_bytes"] = torch.cuda.memory_allocated(device)
    info["rows"] = compare_denoise(
        scn,
        model,
        inputs,
        make_variants(args, steps),
        steps,
        repeats=args.repeats,
        warmup=args.warmup,
        log=lambda row: print(f"[{key}] {format_row(row)}", flush=True),
    )
    if not info["rows"][0]["finite"]:
        print(f"[{key}] WARNING: the baseline's final latent is not finite; fidelity is meaningless", flush=True)
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def print_table(key: str, info: dict[str, Any], env: dict[str, Any]) -> None:
    from accel.bench.denoise import format_row, table_header

    branches = "cond + uncond (CFG)" if info["calls_per_step"] == 2 else "cond (guidance-distilled)"
    print()
    print(
        f"== {key}: {info['checkpoint_config']} shapes, random weights, {_count(info['parameters'])} params | "
        f"latent {info.get('latent_shape')} | {info['steps']} steps x {branches} | {info['dtype']} | "
        f"{env['device_name']} =="
    )
    print(table_header())
    for row in info["rows"]:
        print(format_row(row))
    print(
        "computed/reused: denoiser passes in one run (all CFG branches); PSNR/rel L1: final latent vs the baseline's "
        "(latents mapped to [0,1] by the baseline's min/max); random weights: fidelity = closeness to the baseline "
        "only."
    )


def headline(doc: dict[str, Any]) -> str:
    """One line for the budgeted run's summary: per scenario the baseline's time, each variant's speed-up and
    reused passes, and whether the re-run matched."""
    parts = []
    for key, sc in doc["scenarios"].items():
        cells = []
        for r in sc["rows"][1:]:
            if "error" in r:
                cells.append(f"{r['name']} ERROR")
            elif r["kind"] == "baseline-rerun":
                cells.append("re-run " + ("identical" if r["identical"] else "DIFFERS"))
            else:
                cells.append(f"{r['name']} {r['speedup']:.2f}x ({r['reused']}/{r['passes']} reused)")
        parts.append(f"{key} {sc['steps']} steps: baseline {sc['rows'][0]['median_s']:.2f} s; " + ", ".join(cells))
    return "; ".join(parts)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenario", choices=["wan", "flux", "all"], default="all")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing (default 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: wan 50, flux 28)")
    p.add_argument("--tiny", action="store_true", help="tiny configs and latents, CPU, float32: checks the script")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fbc-thresholds", type=_floats, default=[0.05, 0.1], help="diffusers FBC thresholds (default 0.05,0.1)"
    )
    p.add_argument(
        "--accel-presets", type=_names, default=["balanced", "fast"], help="accel presets (default balanced,fast)"
    )
    p.add_argument(
        "--accel-thresholds", type=_floats, default=[0.05, 0.1], help="accel raw thresholds (default 0.05,0.1)"
    )
    p.add_argument(
        "--variants", type=_names, default=None, help="only these variant names (comma-separated; baseline always runs)"
    )
    p.add_argument("--no-rerun", action="store_true", help="skip the final baseline re-run")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/caching-<gpu>.json")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be >= 2")
    return args


def _device(args: argparse.Namespace):
    import torch

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type != "cuda" and not args.tiny):
        sys.exit(NO_GPU_MESSAGE)
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # tiny models: one thread is as fast and far steadier on a shared CPU
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = _device(args)
    import torch

    from accel.bench.host import default_json_path, environment, write_json

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if args.tiny else "bf16")
    ]
    env = environment(device)
    print(
        f"accel step-caching benchmark | {env['device_name']} | torch {env['torch']} | diffusers {env['diffusers']} "
        f"| {str(dtype).replace('torch.', '')}{' | TINY configs (script check, not a benchmark)' if args.tiny else ''}",
        flush=True,
    )
    out = args.json or default_json_path(Path(__file__).parent / "results", "caching", env, args.tiny)
    keys = ["wan", "flux"] if args.scenario == "all" else [args.scenario]
    results: dict[str, Any] = {}
    doc = dict(
        benchmark="accel step caching",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        tiny=args.tiny,
        weights="random (released configs, nothing downloaded): timings are real, fidelity is closeness to the "
        "baseline",
        settings=dict(
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            dtype=str(dtype).replace("torch.", ""),
            steps=args.steps,
            fbc_thresholds=args.fbc_thresholds,
            accel_presets=args.accel_presets,
            accel_thresholds=args.accel_thresholds,
        ),
        env=env,
        scenarios=results,
    )
    for key in keys:
        results[key] = run_scenario(key, args, device, dtype)
        write_json(out, doc)  # after each scenario: a crash keeps the rest
    doc["headline"] = headline(doc)
    write_json(out, doc)
    for key in keys:
        print_table(key, results[key], env)
    print(f"\nwrote {out}")
    failed = [f"{key}: {row['name']}" for key in keys for row in results[key]["rows"] if "error" in row]
    if failed:
        print("FAILED variants: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
