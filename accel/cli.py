"""`accel demo` and `accel bench`: the unpatched baseline next to each preset, in one process, same seed."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
import warnings
from typing import Any, Callable

TINY_WARNING = """\
=====================================================================================================
  TINY RANDOM-WEIGHT MODELS. These are untrained, tiny-config instances of the real architectures.
  * Fidelity columns (PSNR/SSIM, token agreement/KL) measure how close each accelerated output is to
    the UNACCELERATED output of the same model and seed, not image or text quality.
  * Timings of tiny models on CPU say little about real speed-ups: overheads dominate here. See
    benchmarks/ for measurements of real models on GPUs.
====================================================================================================="""

TINY_NOTE = (
    "Tiny random-weight models: fidelity numbers measure closeness to the unaccelerated output of the same model "
    "and seed, not quality; timings of tiny models on CPU say little about real speed (see benchmarks/)."
)

DEMO_REPEATS = 1
DEMO_WARMUP = 1
VLM_NEW_TOKENS = 8


class UsageError(SystemExit):
    """A mistake on the command line or in the user's --pipeline/--runner function: `main` prints
    `accel: error: <message>` on one line and exits with status 2 (argparse's convention), no traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = " ".join(message.splitlines())

    def __str__(self) -> str:
        return f"accel: error: {self.message}"


_COLUMNS = (
    ("family", 15), ("variant", 9), ("time", 8), ("speedup", 7), ("comp/reuse", 10), ("fidelity vs baseline", 26)
)


# ------------------------------------------------------------------------------------------------- running


def _tiny_run_fn(tiny, steps: int | None) -> Callable[[int], Any]:
    """run_fn(seed) of a zoo model; VLM outputs keep only the generated tokens (so agreement is not inflated by
    the shared prompt)."""
    if tiny.kind == "vlm":
        from accel.zoo import VLMOutput

        new = steps or VLM_NEW_TOKENS

        def run_vlm(seed: int) -> VLMOutput:
            out = tiny.run(seed, max_new_tokens=new)
            return VLMOutput(sequences=out.sequences[:, -new:], first_logits=out.first_logits)

        return run_vlm
    overrides = {"num_inference_steps": steps} if steps else {}
    return lambda seed: tiny.run(seed, **overrides)


def _variants(presets: list[str], attention: list[str] = ()) -> list:
    from accel.bench.harness import Variant

    # strict=False: a family accel cannot patch shows up as "nothing applied" instead of aborting the run.
    variants = [Variant(p, {"preset": p, "strict": False}) for p in presets]
    # Attention routes alone ("lossless" preset), so their column shows what the kernel costs and saves.
    variants += [Variant(f"attn-{k}", {"preset": "lossless", "attention": k}) for k in attention]
    return variants


def _bench_tiny(family: str, presets: list[str], args, progress: bool, attention: list[str] = ()) -> dict:
    from accel import zoo
    from accel.bench.harness import compare

    tiny = zoo.build(family, seed=args.seed)
    rows = compare(
        tiny.obj,
        _tiny_run_fn(tiny, args.steps),
        _variants(presets, attention),
        repeats=args.repeats,
        warmup=args.warmup,
        device="cpu",
        seed=args.seed,
        progress=progress,
        desc=family,
    )
    steps = args.steps or (tiny.default_steps if tiny.kind != "vlm" else VLM_NEW_TOKENS)
    return {"family": family, "model": tiny.name, "kind": tiny.kind, "steps": steps, "rows": rows}


def _machine(device: str) -> dict:
    import diffusers
    import torch
    import transformers

    import accel

    return {
        "accel": accel.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------- output


def _fmt_fidelity(row) -> str:
    if row.token_agreement is not None:
        return f"tokens {row.token_agreement:.0%}  KL {row.first_token_kl:.2g}"
    if row.psnr is None:
        return "-"
    psnr = "inf" if math.isinf(row.psnr) else f"{row.psnr:.1f}"
    text = f"PSNR {psnr} dB  SSIM {row.ssim:.3f}"
    return text + (f"  LPIPS {row.lpips:.3f}" if row.lpips is not None else "")


def _fmt_applied(row) -> str:
    if row.error:
        return f"ERROR {row.error}"
    if row.report is None:
        return "unpatched reference"
    if row.applied:
        # "cache: first-block cache: 1 of 5 blocks ..." -> "cache (first-block cache)"
        parts = [a.partition(": ") for a in row.applied]
        return ", ".join(f"{name} ({detail.split(':')[0]})" if detail else name for name, _, detail in parts)
    reason = row.skipped[0].split(": ", 1)[1] if row.skipped else ""
    return f"nothing applied ({reason})" if reason else "nothing applied"


def _table_line(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS)) + "  " + cells[-1]


def table_header() -> list[str]:
    head = _table_line([name for name, _ in _COLUMNS] + ["applied"])
    return [head, "-" * len(head)]


def table_lines(result: dict) -> list[str]:
    lines = []
    for row in result["rows"]:
        ok = row.median_s is not None
        lines.append(
            _table_line(
                [
                    result["family"],
                    row.variant,
                    f"{row.median_s:.2f} s" if ok else "-",
                    f"{row.speedup:.2f}x" if row.speedup is not None else "-",
                    f"{row.computed}/{row.reused}" if row.computed is not None else "-",
                    _fmt_fidelity(row),
                    _fmt_applied(row),
                ]
            )
        )
    return lines


def _write_json(path: str, args, results: list[dict], total_s: float, device: str, tiny: bool) -> None:
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "json")}
    data = {
        "command": args.command,
        "warning": TINY_NOTE if tiny else None,
        "machine": _machine(device),
        "settings": settings,
        "total_time_s": round(total_s, 3),
        "rows": [
            {"family": r["family"], "model": r["model"], "kind": r["kind"], "steps": r["steps"], **row.to_dict()}
            for r in results
            for row in r["rows"]
        ],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# ------------------------------------------------------------------------------------------------- commands


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _check_names(kind: str, names: list[str], allowed) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise UsageError(f"unknown {kind} {names}; choose from: {', '.join(allowed)}")


def _check_output(option: str, path: str | None) -> None:
    """Fail now, not after the run, if `path` cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a folder; give a file name, e.g. {os.path.join(path, 'results.json')}")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path!r}: no permission to write there")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device; e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {device}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")


def _check_positive(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{option} must be >= 1, got {value}")


def _cmd_demo(args) -> int:
    from tqdm.auto import tqdm

    from accel import zoo
    from accel.presets import PRESET_NAMES

    families = _split(args.families) or list(zoo.FAMILIES)
    presets = _split(args.presets)
    _check_names("family", families, zoo.FAMILIES)
    _check_names("preset", presets, PRESET_NAMES)
    _check_output("--json", args.json)
    _out(TINY_WARNING)
    _out(f"baseline vs {', '.join(presets)} on {len(families)} tiny families, CPU, "
         f"{args.repeats} timed run(s) after {args.warmup} warm-up run(s) each\n")
    for line in table_header():
        _out(line)
    start = time.perf_counter()
    results = []
    for family in tqdm(families, desc="accel demo", unit="family", disable=True if args.quiet else None):
        result = _bench_tiny(family, presets, args, progress=not args.quiet)
        results.append(result)
        for line in table_lines(result):
            _out(line)
    total = time.perf_counter() - start
    _write_json(args.json, args, results, total, "cpu", tiny=True)
    _out(f"\ntotal {total:.1f} s; JSON written to {args.json}")
    return 0


def _load_user_function(option: str, spec: str) -> Callable:
    """FUNCTION of `option MODULE:FUNCTION` (or path/to/file.py:FUNCTION). Errors raised by the user's module
    itself keep their traceback; a missing module, file or function is a usage error."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"{option} takes MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UsageError(f"{option} {spec}: no such file {module_name!r}")
            file_spec = importlib.util.spec_from_file_location("accel_user_pipeline", module_name)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UsageError(f"{option} {spec}: no module named {err.name!r} (run accel from the folder that "
                             "holds it, or give path/to/file.py:FUNCTION)") from None
        raise UsageError(f"{option} {spec}: importing {module_name!r} failed: {err}") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise UsageError(f"{option} {spec}: {module_name!r} has no {func_name!r}")
    if not callable(func):
        raise UsageError(f"{option} {spec}: {func_name!r} is a {type(func).__name__}, not a function")
    return func


def _load_pipeline(spec: str) -> tuple[Any, Callable[[int], Any]]:
    """(obj, run_fn) from the user's --pipeline function, both checked; run_fn's first output is checked too."""
    from accel.api import _resolve
    from accel.bench.harness import output_kind
    from accel.errors import UnsupportedModelError

    result = _load_user_function("--pipeline", spec)()
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise UsageError(f"--pipeline {spec}: the function must return (obj, run_fn) with run_fn(seed) callable, "
                         f"got {got}")
    obj, run_fn = result
    try:
        _resolve(obj)
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


def _cmd_bench(args) -> int:
    from accel import zoo
    from accel.bench.harness import compare
    from accel.attention.config import KERNELS
    from accel.presets import PRESET_NAMES

    presets = _split(args.preset)
    _check_names("preset", presets, PRESET_NAMES)
    _check_names("attention route", _split(args.attention), KERNELS)
    if bool(args.family) == bool(args.pipeline):
        raise UsageError("give exactly one of --family F or --pipeline MODULE:FUNCTION")
    _check_output("--json", args.json)
    _check_device(args.device)
    start = time.perf_counter()
    if args.keep:
        return _bench_pruning(args, start)
    if args.family:
        _check_names("family", [args.family], zoo.FAMILIES)
        if args.device != "cpu":
            raise UsageError("tiny families run on CPU; bench a GPU pipeline with --pipeline")
        _out(TINY_WARNING)
        result = _bench_tiny(args.family, presets, args, progress=not args.quiet, attention=_split(args.attention))
    else:
        if args.steps is not None:
            raise UsageError("--steps sets the steps of a tiny --family; with --pipeline, your run_fn decides them")
        obj, run_fn = _load_pipeline(args.pipeline)
        rows = compare(obj, run_fn, _variants(presets, _split(args.attention)), repeats=args.repeats, warmup=args.warmup,
                       device=args.device, seed=args.seed, progress=not args.quiet, desc=args.pipeline)
        result = {"family": args.pipeline, "model": type(obj).__name__, "kind": None,
                  "steps": args.steps, "rows": rows}
    total = time.perf_counter() - start
    for line in table_header() + table_lines(result):
        _out(line)
    for row in result["rows"]:
        if row.peak_memory_bytes is not None:
            from accel.bench.measure import format_bytes

            _out(f"  {row.variant:<9} peak memory {format_bytes(row.peak_memory_bytes)} ({row.memory_kind}), "
                 f"times {', '.join(f'{t:.3f}' for t in row.times_s)} s")
    if args.json:
        _write_json(args.json, args, [result], total, args.device, tiny=bool(args.family))
        _out(f"JSON written to {args.json}")
    return 0


# ---- accel eval: accuracy of visual token pruning on VLM benchmarks (accel.bench.evaluate)


def _cmd_eval(args) -> int:
    from accel.bench import evaluate

    tasks = _split(args.tasks)
    keep = _int_list("--keep", args.keep)
    if not tasks:
        raise UsageError("--tasks names no task")
    _check_positive("--limit", args.limit)
    _check_positive("--max-new-tokens", args.max_new_tokens)
    _check_output("--json", args.json)
    _check_output("--markdown", args.markdown)
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise UsageError(f"--include-path {args.include_path!r} is not a folder")
    if args.runner:
        runner = _checked_runner(args.runner, _load_user_function("--runner", args.runner))
    else:
        try:
            evaluate._require_lmms_eval()
        except ImportError as err:
            raise UsageError(str(err)) from None

        def runner(model, processor, tasks, limit):
            return evaluate.run_lmms_eval(model, processor, tasks, limit, max_new_tokens=args.max_new_tokens,
                                          include_path=args.include_path)

    _check_device(args.device)
    import torch

    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise UsageError(f"--dtype {args.dtype!r} is not a torch dtype; e.g. bfloat16, float16, float32")
    _out(f"loading {args.model} ({args.dtype}, {args.attn}) on {args.device}")
    try:
        model, processor = evaluate.load_model(args.model, device=args.device, dtype=args.dtype,
                                               attn_implementation=args.attn)
    except (OSError, ValueError) as err:  # no such model or folder, not a VLM, unknown --attn
        raise UsageError(f"cannot load --model {args.model!r}: {str(err).strip().splitlines()[0]}") from None
    start = time.perf_counter()
    result = evaluate.evaluate_pruning(model, processor, runner, tasks, keep=keep,
                                       prune_options={"where": args.prune_where}, limit=args.limit, log=_out)
    table = result.to_markdown()
    _out("\n" + table)
    data = {"command": "eval", "model": args.model, "machine": _machine(args.device),
            "settings": {k: v for k, v in vars(args).items() if k != "func"},
            "total_time_s": round(time.perf_counter() - start, 3), **result.to_dict()}
    with open(args.json, "w") as f:
        json.dump(data, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    _out(f"\nJSON written to {args.json}" + (f", table to {args.markdown}" if args.markdown else ""))
    return 0


def _checked_runner(spec: str, runner: Callable) -> Callable:
    """`runner`, with each result checked: {task: {metric: number}} for every task asked."""

    def run(model, processor, tasks, limit):
        scores = runner(model, processor, tasks, limit)
        if not isinstance(scores, dict):
            raise UsageError(f"--runner {spec} must return {{task: {{metric: value}}}}, got {type(scores).__name__}")
        for task in tasks:
            metrics = scores.get(task)
            if not isinstance(metrics, dict) or not metrics:
                raise UsageError(f"--runner {spec} returned no metrics for task {task!r} (got {metrics!r})")
            bad = {k: v for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
            if bad:
                raise UsageError(f"--runner {spec}: metrics of task {task!r} must be numbers, got {bad!r}")
        return scores

    return run


# ---- accel bench --family VLM --keep ...: visual token pruning


_VLM_COLUMNS = (
    ("variant", 10), ("visual kept/in", 14), ("seq to LM", 9), ("prefill", 9), ("speedup", 7), ("TTFT", 9),
    ("decode", 12), ("peak memory", 20), ("first-token KL", 14), ("agreement", 9),
)


def _int_list(option: str, value: str) -> list[int]:
    try:
        values = [int(v) for v in _split(value)]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, e.g. 64,128, got {value!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes positive integers, got {value!r}")
    return values


def _bench_pruning(args, start: float) -> int:
    from accel import zoo
    from accel.bench.vlm import compare_pruning
    from accel.pruning import PruneConfig
    from accel.zoo import vlm

    keep = _int_list("--keep", args.keep)
    if not args.family:
        raise UsageError("--keep works with --family; for your own VLM call "
                         "accel.bench.vlm.compare_pruning(model, inputs, ...) or see benchmarks/pruning.py")
    _check_names("family", [args.family], zoo.FAMILIES)
    if args.family not in vlm.BUILDERS:
        raise UsageError(f"--keep (visual token pruning) needs a VLM family ({', '.join(vlm.BUILDERS)}), "
                         f"not {args.family!r}")
    if args.device != "cpu":
        raise UsageError("tiny families run on CPU; for a GPU see benchmarks/pruning.py")
    tiny = zoo.build(args.family, seed=args.seed)
    _out(TINY_WARNING)
    inputs = vlm.make_inputs(tiny.obj, seed=args.seed, video=args.video)
    variants = {f"keep={k}": PruneConfig(keep=k, where=args.prune_where) for k in keep}
    new_tokens = args.steps or VLM_NEW_TOKENS
    rows = compare_pruning(tiny.obj, inputs, variants, new_tokens=new_tokens, repeats=args.repeats,
                           warmup=args.warmup, device="cpu")
    total = time.perf_counter() - start
    _out(f"{args.family} ({'video' if args.video else 'image'}), pruning {args.prune_where}, {new_tokens} new tokens, "
         f"{args.repeats} timed run(s)\n")
    for line in vlm_table_lines(rows):
        _out(line)
    if args.json:
        result = {"family": args.family, "model": tiny.name, "kind": tiny.kind, "steps": new_tokens, "rows": rows}
        _write_json(args.json, args, [result], total, "cpu", tiny=True)
        _out(f"JSON written to {args.json}")
    return 0


def vlm_table_lines(rows) -> list[str]:
    from accel.bench.measure import format_bytes

    def line(cells):
        return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _VLM_COLUMNS))

    head = line([name for name, _ in _VLM_COLUMNS])
    out = [head, "-" * len(head)]
    for r in rows:
        kept = f"{r.visual_tokens_kept}/{r.visual_tokens_in}" if r.visual_tokens_kept is not None else "all"
        out.append(line([
            r.variant, kept, str(r.sequence_to_lm),
            f"{r.prefill_s * 1e3:.1f} ms", f"{r.prefill_speedup:.2f}x", f"{r.ttft_s * 1e3:.1f} ms",
            f"{r.decode_tokens_per_s:.1f} tok/s" if r.decode_tokens_per_s is not None else "-",
            f"{format_bytes(r.peak_memory_bytes)} ({r.memory_kind})" if r.peak_memory_bytes is not None else "-",
            f"{r.first_token_kl:.3g}", f"{r.token_agreement:.0%}",
        ]))
    return out


def _out(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)


# ------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from accel.presets import PRESET_NAMES

    PRESETS_HELP = "comma-separated presets (default: %(default)s)"
    parser = argparse.ArgumentParser(
        prog="accel", description="Benchmark accel presets against the unaccelerated baseline."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, repeats: int, warmup: int) -> None:
        p.add_argument(
            "--repeats", type=int, default=repeats, help=f"timed runs per variant (median reported; default {repeats})"
        )
        p.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs before them (default {warmup})")
        p.add_argument("--seed", type=int, default=0, help="seed of the model weights and of every run (default 0)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    demo = sub.add_parser(
        "demo",
        help="offline CPU demo: every tiny family, baseline vs each preset",
        description="Offline, on CPU: for each tiny random-weight family (accel.zoo) run the unpatched baseline and "
        "each preset with the same seed, and print time, speed-up, computed/reused denoiser passes, fidelity to "
        "the baseline output, and what was applied.",
    )
    demo.add_argument("--families", help="comma-separated families (default: all)")
    demo.add_argument("--presets", default=",".join(PRESET_NAMES), help=PRESETS_HELP)
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (VLMs: new tokens); default per family")
    demo.add_argument("--json", default="accel-demo.json", help="where to write the results (default: %(default)s)")
    common(demo, DEMO_REPEATS, DEMO_WARMUP)
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="benchmark one tiny family or your own pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Baseline vs presets for one tiny family (--family) or for your own pipeline (--pipeline).",
        epilog="""\
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

    accel bench --pipeline my_bench.py:make --device cuda --repeats 3""",
    )
    bench.add_argument("--family", help="a tiny zoo family, e.g. flux")
    bench.add_argument("--pipeline", metavar="MODULE:FUNCTION", help="your own pipeline (see below)")
    bench.add_argument("--preset", default=",".join(PRESET_NAMES), help=PRESETS_HELP)
    bench.add_argument("--steps", type=int, default=None, help="tiny family: denoising steps (VLMs: new tokens)")
    bench.add_argument("--device", default="cpu", help="device to synchronise and measure memory on (default: cpu)")
    bench.add_argument("--json", default=None, help="also write the results as JSON here")
    bench.add_argument(
        "--attention", default=None,
        help="also bench these attention routes alone, comma-separated: int8, sdpa, flash, xformers "
        "(on CPU, int8 runs its PyTorch reference: fidelity, not speed)",
    )
    pruning = bench.add_argument_group(
        "visual token pruning (VLM families)",
        "--keep 8,4 replaces the preset table by baseline vs PruneConfig(keep=k) for each k: visual tokens kept, "
        "sequence length reaching the language model, prefill time, time to first token, decode tokens/s, peak "
        "memory, first-token KL and greedy agreement with the baseline (--steps: new tokens)",
    )
    pruning.add_argument("--keep", metavar="K,K", help="visual tokens kept per image/video, comma-separated")
    pruning.add_argument("--prune-where", choices=("before_lm", "in_lm"), default="before_lm",
                         help="PruneConfig.where (default: %(default)s)")
    pruning.add_argument("--video", action="store_true", help="a video prompt instead of an image "
                         "(llava_onevision, qwen2_vl, qwen2_5_vl)")
    common(bench, 3, 1)
    bench.set_defaults(func=_cmd_bench)

    from accel.bench.evaluate import DEFAULT_MAX_NEW_TOKENS, STANDARD_KEEP, STANDARD_TASKS

    ev = sub.add_parser(
        "eval",
        help="accuracy of visual token pruning on VLM benchmarks (lmms-eval)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a Hugging Face VLM unpruned, then with PruneConfig(keep=k) for each --keep, on lmms-eval "
        "tasks, and print a markdown table (rows: budgets, columns: tasks and % of baseline). Needs "
        "`pip install lmms-eval`; lmms-eval downloads the data sets from the Hugging Face Hub. Image tasks only.",
        epilog="""\
Example (LLaVA-1.5-7B, the standard table; --limit 100 for a quick look):

    accel eval --model llava-hf/llava-1.5-7b-hf --tasks gqa,mme,pope,textvqa_val --keep 192,128,64 --device cuda

--runner MODULE:FUNCTION (or path/to/file.py:FUNCTION) scores with your own function instead of lmms-eval:
FUNCTION(model, processor, tasks, limit) -> {task: {metric: value}}; it is called once per budget on the
patched model.""",
    )
    ev.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    ev.add_argument("--tasks", default=",".join(STANDARD_TASKS), help="comma-separated lmms-eval tasks "
                    "(default: %(default)s)")
    ev.add_argument("--keep", default=",".join(map(str, STANDARD_KEEP)),
                    help="visual token budgets after the baseline (default: %(default)s)")
    ev.add_argument("--prune-where", choices=("before_lm", "in_lm"), default="before_lm",
                    help="PruneConfig.where (default: %(default)s)")
    ev.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ev.add_argument("--device", default="cuda", help="default: %(default)s")
    ev.add_argument("--dtype", default="bfloat16", help="default: %(default)s")
    ev.add_argument("--attn", default="sdpa", help="attn_implementation (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                    help="when a task sets none (default: %(default)s)")
    ev.add_argument("--include-path", metavar="DIR", help="a folder of your own lmms-eval task YAML files")
    ev.add_argument("--runner", metavar="MODULE:FUNCTION", help="your own scoring function (see below)")
    ev.add_argument("--json", default="accel-eval.json", help="default: %(default)s")
    ev.add_argument("--markdown", default=None, help="also write the table here")
    ev.set_defaults(func=_cmd_eval, repeats=1, warmup=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_positive("--repeats", args.repeats)
        if args.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
        _check_positive("--steps", getattr(args, "steps", None))
        warnings.filterwarnings("ignore", message=".*Nothing was patched")  # the row says "nothing applied"
        # transformers' notices (e.g. image processors without torchvision) would break up the table.
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        return args.func(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
