"""`accel eval`: accuracy of visual token pruning on VLM benchmarks (accel.bench.evaluate, through lmms-eval)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from accel.cli._common import (
    UsageError,
    check_device,
    check_output,
    check_positive,
    int_list,
    load_user_function,
    out,
    split,
)

NAME = "eval"
HELP = "accuracy of visual token pruning on VLM benchmarks (lmms-eval)"
DESCRIPTION = (
    "Score a Hugging Face VLM unpruned, then with PruneConfig(keep=k) for each --keep, on lmms-eval tasks, and "
    "print a markdown table (rows: budgets, columns: tasks and % of baseline). Needs `pip install lmms-eval`; "
    "lmms-eval downloads the data sets from the Hugging Face Hub. Image tasks only."
)
EPILOG = """\
Example (LLaVA-1.5-7B, the standard table; --limit 100 for a quick look):

    accel eval --model llava-hf/llava-1.5-7b-hf --tasks gqa,mme,pope,textvqa_val --keep 192,128,64 --device cuda

--runner MODULE:FUNCTION (or path/to/file.py:FUNCTION) scores with your own function instead of lmms-eval:
FUNCTION(model, processor, tasks, limit) -> {task: {metric: value}}; it is called once per budget on the
patched model."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from accel.bench.evaluate import DEFAULT_MAX_NEW_TOKENS, STANDARD_KEEP, STANDARD_TASKS

    p.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    p.add_argument(
        "--tasks", default=",".join(STANDARD_TASKS), help="comma-separated lmms-eval tasks (default: %(default)s)"
    )
    p.add_argument(
        "--keep",
        default=",".join(map(str, STANDARD_KEEP)),
        help="visual token budgets after the baseline (default: %(default)s)",
    )
    p.add_argument(
        "--prune-where",
        choices=("before_lm", "in_lm"),
        default="before_lm",
        help="PruneConfig.where (default: %(default)s)",
    )
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--device", default="cuda", help="default: %(default)s")
    p.add_argument("--dtype", default="bfloat16", help="default: %(default)s")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default: %(default)s)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="when a task sets none (default: %(default)s)",
    )
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own lmms-eval task YAML files")
    p.add_argument("--runner", metavar="MODULE:FUNCTION", help="your own scoring function (see below)")
    p.add_argument("--json", default="accel-eval.json", help="default: %(default)s")
    p.add_argument("--markdown", default=None, help="also write the table here")


def checked_runner(spec: str, runner: Callable) -> Callable:
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


def _runner(args) -> Callable:
    from accel.bench import evaluate

    if args.runner:
        return checked_runner(args.runner, load_user_function("--runner", args.runner))
    try:
        evaluate._require_lmms_eval()
    except ImportError as err:
        raise UsageError(str(err)) from None

    def runner(model, processor, tasks, limit):
        return evaluate.run_lmms_eval(
            model, processor, tasks, limit, max_new_tokens=args.max_new_tokens, include_path=args.include_path
        )

    return runner


def _load(args):
    import torch

    from accel.bench import evaluate

    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise UsageError(f"--dtype {args.dtype!r} is not a torch dtype; e.g. bfloat16, float16, float32")
    out(f"loading {args.model} ({args.dtype}, {args.attn}) on {args.device}")
    try:
        return evaluate.load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn)
    except (OSError, ValueError) as err:  # no such model or folder, not a VLM, unknown --attn
        raise UsageError(f"cannot load --model {args.model!r}: {str(err).strip().splitlines()[0]}") from None


def run(args) -> int:
    from accel.bench import evaluate
    from accel.bench.host import environment, write_json

    tasks = split(args.tasks)
    keep = int_list("--keep", args.keep)
    if not tasks:
        raise UsageError("--tasks names no task")
    check_positive("--limit", args.limit)
    check_positive("--max-new-tokens", args.max_new_tokens)
    check_output("--json", args.json)
    check_output("--markdown", args.markdown)
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise UsageError(f"--include-path {args.include_path!r} is not a folder")
    runner = _runner(args)
    check_device(args.device)
    model, processor = _load(args)
    start = time.perf_counter()
    result = evaluate.evaluate_pruning(
        model, processor, runner, tasks, keep=keep, prune_options={"where": args.prune_where}, limit=args.limit, log=out
    )
    table = result.to_markdown()
    out("\n" + table)
    data = {
        "command": NAME,
        "model": args.model,
        "machine": environment(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "total_time_s": round(time.perf_counter() - start, 3),
        **result.to_dict(),
    }
    write_json(args.json, data)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    out(f"\nJSON written to {args.json}" + (f", table to {args.markdown}" if args.markdown else ""))
    return 0
