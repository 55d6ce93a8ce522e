"""`accel bench-vlm`: visual token pruning on one tiny VLM family, the unpruned baseline vs PruneConfig(keep=k)."""

from __future__ import annotations

import argparse
import time

from accel.cli._common import (
    TINY_WARNING,
    UsageError,
    add_timing_args,
    check_names,
    check_output,
    check_positive,
    int_list,
    out,
    settings,
)

NAME = "bench-vlm"
HELP = "visual token pruning on one tiny VLM family"
DESCRIPTION = (
    "On CPU, for one tiny VLM family: the unpruned baseline, then PruneConfig(keep=k) for each --keep. Prints "
    "visual tokens kept, the sequence length reaching the language model, prefill time, time to first token, "
    "decode tokens/s, peak memory, first-token KL and greedy agreement with the baseline. For your own VLM call "
    "accel.bench.vlm.compare_pruning(model, inputs, ...) or see benchmarks/pruning.py."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from accel.bench.family import VLM_NEW_TOKENS

    p.add_argument("--family", required=True, help="a tiny VLM family, e.g. llava")
    p.add_argument("--keep", required=True, metavar="K,K", help="visual tokens kept per image/video, comma-separated")
    p.add_argument(
        "--prune-where",
        choices=("before_lm", "in_lm"),
        default="before_lm",
        help="PruneConfig.where (default: %(default)s)",
    )
    p.add_argument(
        "--video",
        action="store_true",
        help="a video prompt instead of an image (llava_onevision, qwen2_vl, qwen2_5_vl)",
    )
    p.add_argument("--new-tokens", type=int, default=VLM_NEW_TOKENS, help="tokens generated (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    add_timing_args(p, repeats=3, warmup=1)


def run(args) -> int:
    from accel import zoo
    from accel.bench.host import write_json
    from accel.bench.tables import results_doc, vlm_table_lines
    from accel.bench.vlm import compare_pruning
    from accel.pruning import PruneConfig
    from accel.zoo import vlm

    keep = int_list("--keep", args.keep)
    check_positive("--new-tokens", args.new_tokens)
    check_names("family", [args.family], zoo.FAMILIES)
    if args.family not in vlm.BUILDERS:
        raise UsageError(f"visual token pruning needs a VLM family ({', '.join(vlm.BUILDERS)}), not {args.family!r}")
    check_output("--json", args.json)
    start = time.perf_counter()
    tiny = zoo.build(args.family, seed=args.seed)
    out(TINY_WARNING)
    inputs = vlm.make_inputs(tiny.obj, seed=args.seed, video=args.video)
    variants = {f"keep={k}": PruneConfig(keep=k, where=args.prune_where) for k in keep}
    rows = compare_pruning(
        tiny.obj, inputs, variants, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, device="cpu"
    )
    total = time.perf_counter() - start
    out(
        f"{args.family} ({'video' if args.video else 'image'}), pruning {args.prune_where}, {args.new_tokens} new "
        f"tokens, {args.repeats} timed run(s)\n"
    )
    for line in vlm_table_lines(rows):
        out(line)
    if args.json:
        result = {"family": args.family, "model": tiny.name, "kind": tiny.kind, "steps": args.new_tokens, "rows": rows}
        write_json(args.json, results_doc(NAME, settings(args), [result], total, "cpu", tiny=True))
        out(f"JSON written to {args.json}")
    return 0
