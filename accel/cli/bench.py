"""`accel bench`: baseline vs presets (and attention routes) on one tiny family or on your own pipeline."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from accel.cli._common import (
    TINY_WARNING,
    UsageError,
    add_timing_args,
    check_device,
    check_names,
    check_output,
    load_user_function,
    out,
    settings,
    split,
)

NAME = "bench"
HELP = "benchmark one tiny family or your own pipeline"
DESCRIPTION = (
    "Baseline vs presets for one tiny family (--family) or for your own pipeline (--pipeline); or, with "
    "--suite fidelity, accel's caches and sparse attention against diffusers' and cache-dit's caches on the "
    "reference models; or, with --suite pruning, the accuracy ref-vlm keeps under visual token pruning."
)
EPILOG = """\
--pipeline MODULE:FUNCTION (or path/to/file.py:FUNCTION) calls FUNCTION() with no arguments; it must return
(obj, run_fn): obj is what accel.patch gets (a diffusers pipeline or a transformers model), and run_fn(seed)
runs it once and returns float pixels in [0, 1] ([B,C,H,W] or [B,F,C,H,W]) or an accel.zoo.VLMOutput.
Use the seed for the generator so every variant starts from the same noise. Example, in my_bench.py:

    import torch
    from diffusers import FluxPipeline

    def make():
        pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
        def run(seed):
            g = torch.Generator("cuda").manual_seed(seed)
            return pipe("a red fox", num_inference_steps=28, generator=g, output_type="pt").images
        return pipe, run

    accel bench --pipeline my_bench.py:make --device cuda --repeats 3

Visual token pruning of a VLM family has its own command: accel bench-vlm --family llava --keep 8,4

--suite fidelity runs every method of accel.bench.fidelity_methods on the reference models (trained weights when
present, else random weights with a warning), the same seeded prompts for all, and prints a markdown table:

    accel bench --suite fidelity --models ref-wan --seeds 2 --methods "accel threshold,diffusers FBC" --plot f.png

--suite pruning answers the held-out questions of ref-vlm with every visual token pruning mode of accel and the
random-keep and uniform-pooling baselines at 50/37.5/25/12.5% of the tokens (accel.bench.pruning_accuracy), and writes
pruning.json, pruning.md and pruning.png to --out:

    accel bench --suite pruning --questions 300 --out benchmarks/results/pruning"""
# Flags of the pruning benchmark that `accel bench` had; kept hidden so that an old command line gets pointed to
# `accel bench-vlm` instead of an "unrecognized arguments" message.
_MOVED = ("keep", "video", "prune_where")
_FIDELITY = ("models", "seeds", "methods", "guidance", "weights", "plot")  # flags of --suite fidelity only
_PRUNING = ("questions", "out")  # flags of --suite pruning only (it also takes --methods and --weights)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from accel.presets import PRESET_NAMES

    p.add_argument("--family", help="a tiny zoo family, e.g. flux")
    p.add_argument("--pipeline", metavar="MODULE:FUNCTION", help="your own pipeline (see below)")
    p.add_argument("--preset", default=",".join(PRESET_NAMES), help="comma-separated presets (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="tiny family: denoising steps (VLMs: new tokens)")
    p.add_argument("--device", default="cpu", help="device to synchronise and measure memory on (default: cpu)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument(
        "--attention",
        default=None,
        help="also bench these attention routes alone, comma-separated: int8, sdpa, flash, xformers "
        "(on CPU, int8 runs its PyTorch reference: fidelity, not speed)",
    )
    p.add_argument(
        "--suite", choices=("fidelity", "pruning"), default=None, help="a benchmark suite instead of a family"
    )
    p.add_argument("--models", default=None, help="fidelity: reference models (default: ref-flux,ref-wan)")
    p.add_argument("--seeds", type=int, default=None, help="fidelity: seeded prompts per model (default: 4)")
    p.add_argument(
        "--methods",
        default=None,
        help="fidelity: method families or names; pruning: method names (comma-separated; default: all)",
    )
    p.add_argument("--guidance", type=float, default=None, help="fidelity: CFG scale (default: the reference's)")
    p.add_argument("--weights", default=None, help="fidelity, pruning: auto (default), trained or random")
    p.add_argument("--plot", default=None, help="fidelity: also write PSNR vs passes computed as a PNG here")
    p.add_argument("--questions", type=int, default=None, help="pruning: held-out questions (default: 300)")
    p.add_argument(
        "--out", default=None, help="pruning: folder for pruning.json/.md/.png (default: accel-bench-pruning)"
    )
    p.add_argument("--keep", default=None, help=argparse.SUPPRESS)
    p.add_argument("--video", action="store_const", const=True, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prune-where", default=None, help=argparse.SUPPRESS)
    add_timing_args(p, repeats=3, warmup=1)


def load_pipeline(spec: str) -> tuple[Any, Callable[[int], Any]]:
    """(obj, run_fn) from the user's --pipeline function, both checked; run_fn's first output is checked too."""
    from accel.api import resolve_target
    from accel.bench.harness import output_kind
    from accel.errors import UnsupportedModelError

    result = load_user_function("--pipeline", spec)()
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise UsageError(
            f"--pipeline {spec}: the function must return (obj, run_fn) with run_fn(seed) callable, got {got}"
        )
    obj, run_fn = result
    try:
        resolve_target(obj)
    except UnsupportedModelError as err:
        raise UsageError(f"--pipeline {spec}: {err}") from None
    checked = []

    def run_checked(seed: int) -> Any:
        output = run_fn(seed)
        if not checked:  # the baseline's first call: fail before minutes of timing an unusable output
            try:
                output_kind(output)
            except TypeError as err:
                raise UsageError(f"--pipeline {spec}: {err}") from None
            checked.append(True)
        return output

    return obj, run_checked


def _bench_pipeline(args, presets: list[str], attention: list[str]) -> dict:
    from accel.bench.family import preset_variants
    from accel.bench.harness import compare

    if args.steps is not None:
        raise UsageError("--steps sets the steps of a tiny --family; with --pipeline, your run_fn decides them")
    obj, run_fn = load_pipeline(args.pipeline)
    rows = compare(
        obj,
        run_fn,
        preset_variants(presets, attention),
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
        desc=args.pipeline,
    )
    return {"family": args.pipeline, "model": type(obj).__name__, "kind": None, "steps": args.steps, "rows": rows}


def run(args) -> int:
    from accel import zoo
    from accel.attention.config import KERNELS
    from accel.bench.family import bench_family
    from accel.bench.host import write_json
    from accel.bench.tables import memory_lines, results_doc, table_header, table_lines
    from accel.presets import PRESET_NAMES

    moved = [f"--{name.replace('_', '-')}" for name in _MOVED if getattr(args, name) is not None]
    if moved:
        raise UsageError(
            f"{', '.join(moved)}: visual token pruning has its own command now: "
            "accel bench-vlm --family F --keep K,K (with --video, --prune-where, --new-tokens)"
        )
    if args.suite == "pruning":
        from accel.bench.pruning_suite import run_suite

        return run_suite(args)
    given = [f"--{name}" for name in _PRUNING if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --suite pruning")
    if args.suite == "fidelity":
        return _bench_fidelity(args)
    given = [f"--{name}" for name in _FIDELITY if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --suite fidelity")
    presets, attention = split(args.preset), split(args.attention)
    check_names("preset", presets, PRESET_NAMES)
    check_names("attention route", attention, KERNELS)
    if bool(args.family) == bool(args.pipeline):
        raise UsageError("give exactly one of --family F or --pipeline MODULE:FUNCTION")
    check_output("--json", args.json)
    check_device(args.device)
    start = time.perf_counter()
    if args.family:
        check_names("family", [args.family], zoo.FAMILIES)
        if args.device != "cpu":
            raise UsageError("tiny families run on CPU; bench a GPU pipeline with --pipeline")
        out(TINY_WARNING)
        result = bench_family(
            args.family,
            presets,
            attention=attention,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            progress=not args.quiet,
        )
    else:
        result = _bench_pipeline(args, presets, attention)
    total = time.perf_counter() - start
    for line in table_header() + table_lines(result) + memory_lines(result):
        out(line)
    if args.json:
        data = results_doc(NAME, _settings(args), [result], total, args.device, tiny=bool(args.family))
        write_json(args.json, data)
        out(f"JSON written to {args.json}")
    return 0


def _settings(args) -> dict:
    return {k: v for k, v in settings(args).items() if k not in _MOVED + _FIDELITY + _PRUNING + ("suite",)}


def _bench_fidelity(args) -> int:
    from accel.bench.fidelity import WEIGHTS, comparison, markdown, plot, run_fidelity
    from accel.bench.fidelity_methods import all_methods
    from accel.bench.host import write_json
    from accel.zoo.reference import NAMES

    if args.family or args.pipeline or args.attention:
        raise UsageError("--suite fidelity picks its own models and methods; drop --family/--pipeline/--attention")
    models = split(args.models) or list(NAMES)
    check_names("reference model", models, NAMES)
    methods = split(args.methods) or None
    known = list(dict.fromkeys(n for m in all_methods() for n in (m.family, m.name)))
    check_names("method or family", methods or [], known)
    check_names("--weights", [args.weights or "auto"], WEIGHTS)
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    check_output("--json", args.json)
    check_output("--plot", args.plot)
    if args.device != "cpu":
        raise UsageError("the fidelity suite runs on CPU (the reference models are tiny)")
    start = time.perf_counter()
    result = run_fidelity(
        models=models,
        seeds=args.seeds or 4,
        steps=args.steps,
        guidance=args.guidance,
        methods=methods,
        seed=args.seed,
        weights=args.weights or "auto",
        progress=not args.quiet,
    )
    result["total_time_s"] = round(time.perf_counter() - start, 3)
    for line in markdown(result).splitlines() + comparison(result):
        out(line)
    if args.plot:
        try:
            out(f"plot written to {plot(result, args.plot)}")
        except ImportError as err:
            out(f"no plot: {err}")
    if args.json:
        write_json(args.json, {"command": f"{NAME} --suite fidelity", **result})
        out(f"JSON written to {args.json}")
    return 0
