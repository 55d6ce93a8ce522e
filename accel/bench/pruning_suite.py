"""`accel bench --suite pruning`: the pruning accuracy benchmark of `accel.bench.pruning_accuracy` on `ref-vlm`,
its tables printed and its JSON, markdown and plot written to `--out` (see `accel.bench.pruning_report`)."""

from __future__ import annotations

import time

DEFAULT_OUT = "accel-bench-pruning"
_FIDELITY_ONLY = ("models", "seeds", "guidance", "plot", "json")


def run_suite(args) -> int:
    from accel.bench.pruning_accuracy import WEIGHTS, methods, run_pruning
    from accel.bench.pruning_report import markdown, write
    from accel.cli._common import UsageError, check_names, check_positive, out, split

    if args.family or args.pipeline or args.attention:
        raise UsageError("--suite pruning runs ref-vlm with its own methods; drop --family/--pipeline/--attention")
    given = [f"--{name}" for name in _FIDELITY_ONLY if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --suite fidelity (--suite pruning writes its files to --out)")
    names = split(args.methods) or None
    check_names("pruning method", names or [], [m.name for m in methods()])
    check_names("--weights", [args.weights or "auto"], WEIGHTS)
    questions = 300 if args.questions is None else args.questions
    check_positive("--questions", questions)
    if questions < 4:
        raise UsageError(f"--questions {questions}: give at least 4 (a quarter of them are videos)")
    if args.device != "cpu":
        raise UsageError("the pruning suite runs on CPU (ref-vlm is small)")
    start = time.perf_counter()
    result = run_pruning(
        questions=questions,
        weights=args.weights or "auto",
        names=names,
        seed=args.seed,
        repeats=args.repeats,
        progress=not args.quiet,
    )
    result["total_time_s"] = round(time.perf_counter() - start, 1)
    for line in markdown(result).splitlines():
        out(line)
    for kind, path in write(result, args.out or DEFAULT_OUT).items():
        out(f"{kind}: {path}")
    return 0
