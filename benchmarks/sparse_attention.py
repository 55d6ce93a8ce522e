#!/usr/bin/env python
"""Block-sparse video attention at real shapes, random data, one CUDA GPU.

What it measures, per scenario:

- attention time (median over ``--repeats`` after ``--warmup``, CUDA events) of dense SDPA (torch picks its
  fastest backend, flash on H100 for bf16), of accel's dense INT8 kernel (``int8_attention``), and of accel's
  block-sparse kernel at each ``--sparsity`` (50/75/90% of the key blocks skipped), float and INT8 Q·Kᵀ,
  from a prebuilt ``BlockIndex`` as the patched model runs it. Speed of a block-sparse kernel depends only
  on how many blocks it visits, so the masks are random with exactly that share skipped per query block
  (the diagonal block always kept, like the real search); the pattern memory per module is printed beside;
- the per-call cost of per-head token orders (gather q/k/v into each head's order, put the output back);
- the search step as the patched model runs it (per-head order probe, reordering, block scores, the kept
  blocks, building the index), each method (and the probe alone), as a share of one dense SDPA call, raw and
  amortised over a 50-step generation with the defaults of ``SparseConfig`` (first 25% of steps dense, a search
  every 10 steps: 4 searches for 38 sparse steps; the default method and target, with V for the remainder).
  Expected at Wan 480p before any GPU run: the default "rows" step (a bf16 matmul of every 8th query row against
  all keys, 1/8 of Q·Kᵀ, ~0.4 TFLOP, plus an fp32 softmax over 12 x 4095 x 32760 scores) at 10-20% of a dense
  call, about 1-2% amortised. Measured on an H200 (2026-12-04, benchmarks/RESULTS.md): 114.5 ms, 11.0 dense calls,
  87.9% amortised (the issue's target: under 5%); "pooled" 1.6 calls, 12.8% amortised;
- ``wan-step``: one Wan2.1-T2V-1.3B-shaped transformer forward (random weights, 30 blocks) at 480p, dense vs
  ``accel.patch(transformer, sparse=SparseConfig(target=t, dense_fraction=0))``: the first call (which
  searches) and the following calls (which reuse the patterns), with the sparsity the search reached.
  Random weights make attention diffuse, so the sparsity reached at a target says little about a trained
  model: read it as "time at that sparsity", not as what Wan would get.

Scenarios (``--scenario``):

- ``wan``: Wan2.1-1.3B 480p self-attention, 81 frames -> 21 x 30 x 52 = 32,760 tokens, 12 heads, d=128, bf16;
- ``hunyuan``: HunyuanVideo 720p, 129 frames -> 33 x 45 x 80 = 118,800 video + 256 text tokens, 24 heads, d=128;
- ``wan-step``: the transformer step above.

Usage::

    python benchmarks/sparse_attention.py                         # all scenarios on cuda:0
    python benchmarks/sparse_attention.py --scenario wan --repeats 10
    python benchmarks/sparse_attention.py --tiny                   # tiny shapes, CPU, Triton interpreter: a check

Results: a table on stdout and JSON at ``--json`` (default ``benchmarks/results/sparse-<gpu>.json``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS, DENSE_FRACTION, SEARCH_INTERVAL = 50, 0.25, 10  # SparseConfig defaults over a 50-step generation


def shapes(tiny: bool) -> dict:
    from accel.bench.scenarios import ATTENTION_SHAPES, AttentionShape

    if tiny:
        return {
            "wan": AttentionShape("tiny wan-like", 2, (2, 4, 16), head_dim=64),
            "hunyuan": AttentionShape("tiny hunyuan-like", 2, (2, 4, 12), text=32, head_dim=64),
        }
    return {key: ATTENTION_SHAPES[key] for key in ("wan", "hunyuan")}


def timed(fn: Callable[[], Any], device, warmup: int, repeats: int) -> list[float]:
    from accel.bench.measure import time_calls

    return time_calls(fn, repeats, warmup, device)


def random_block_mask(b, h, nbq, nbk, sparsity, block_q, block_k, device, seed=0):
    """Exactly round((1 - sparsity) * nbk) key blocks per query block, the diagonal one among them."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = max(1, round((1.0 - sparsity) * nbk))
    scores = torch.rand(b, h, nbq, nbk, generator=g)
    diag = (torch.arange(nbq) * block_q + block_q // 2).clamp_max(nbk * block_k - 1) // block_k
    scores[:, :, torch.arange(nbq), diag] = 2.0  # always in the top `keep`
    top = scores.topk(keep, dim=-1).indices
    return torch.zeros(b, h, nbq, nbk, dtype=torch.bool).scatter_(-1, top, True).to(device)


def kernel_rows(q, k, v, args, device) -> list[dict]:
    """Dense SDPA, dense INT8 and the block-sparse kernel at each sparsity, then the per-head reorder."""
    import torch.nn.functional as F

    from accel.attention.int8 import int8_attention
    from accel.attention.sparse_kernel import BlockIndex, block_sparse_attention, num_blocks

    heads, n = q.shape[1], q.shape[2]
    bq, bk = args.block_q, args.block_k
    rows = []

    def add(name, fn, sparsity=None, **extra):
        times = timed(fn, device, args.warmup, args.repeats)
        rows.append(dict(name=name, sparsity=sparsity, median_s=statistics.median(times), times_s=times, **extra))

    add("dense SDPA", lambda: F.scaled_dot_product_attention(q, k, v))
    add("dense INT8 (accel)", lambda: int8_attention(q, k, v, block_q=bq, block_k=bk))
    for sparsity in args.sparsity:
        mask = random_block_mask(1, heads, num_blocks(n, bq), num_blocks(n, bk), sparsity, bq, bk, device)
        real = 1.0 - mask.float().mean().item()
        blocks = BlockIndex.from_mask(mask)  # built once per search in the patched model
        memory = dict(pattern_mb=blocks.nbytes / 1e6, bool_mask_mb=mask.numel() / 1e6)
        del mask
        add(
            f"sparse {sparsity:.0%}",
            lambda b=blocks: block_sparse_attention(q, k, v, b, block_q=bq, block_k=bk),
            real,
            **memory,
        )
        add(
            f"sparse {sparsity:.0%} + INT8",
            lambda b=blocks: block_sparse_attention(q, k, v, b, int8=True, block_q=bq, block_k=bk),
            real,
            **memory,
        )
    return rows


def bench_attention(shape, args, device, dtype) -> dict:
    import torch

    from accel.attention.pattern import candidate_orders, choose_orders, search_pattern
    from accel.attention.sparse import SparseConfig, apply_orders
    from accel.attention.sparse_kernel import BlockIndex
    from accel.pipelines.base import LatentGrid

    text, n, heads, dim = shape.text, shape.tokens, shape.heads, shape.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device, dtype) for _ in range(3))
    bq, bk = args.block_q, args.block_k
    rows = kernel_rows(q, k, v, args, device)
    dense = rows[0]["median_s"]
    orders = candidate_orders(LatentGrid(*shape.grid), bq, "suffix" if text else "none", text, device=device)
    per_head = torch.arange(heads, device=device)[None] % len(orders.names)  # a mix of orders: the gather path

    def reorder():
        qq, kk, vv, _, undo = apply_orders(orders, per_head, q, k, v, None)
        return undo(qq)

    times = timed(reorder, device, args.warmup, args.repeats)
    rows.append(dict(name="reorder per head + undo", sparsity=None, median_s=statistics.median(times), times_s=times))
    for row in rows:
        row["speedup_vs_sdpa"] = dense / row["median_s"]
        row["share_of_dense_call"] = row["median_s"] / dense

    searches = math.ceil((STEPS - math.ceil(DENSE_FRACTION * STEPS)) / SEARCH_INTERVAL)

    default = SparseConfig()
    value = v if default.remainder else None

    def probe():
        return choose_orders(
            q, k, orders, block_q=bq, block_k=bk, target=default.target, sm_scale=dim**-0.5, value=value
        )

    def search(method):  # what SparseAttention runs at a search step
        qq, kk, _, _, _ = apply_orders(orders, probe(), q, k, v, None)
        mask = search_pattern(
            qq,
            kk,
            target=default.target,
            block_q=bq,
            block_k=bk,
            sm_scale=dim**-0.5,
            method=method,
            stride=args.stride,
            text_position="suffix" if text else "none",
            text_tokens=text,
            value=value if method == "rows" else None,
        )
        return BlockIndex.from_mask(mask)

    def overhead(method, fn):
        t = statistics.median(timed(fn, device, min(args.warmup, 1), max(1, args.repeats // 2)))
        return dict(
            method=method,
            median_s=t,
            share_of_dense_call=t / dense,
            amortised_share=searches * t / (STEPS * dense),
            searches_per_generation=searches,
        )

    search_rows = [overhead(m, lambda m=m: search(m)) for m in args.methods]
    return dict(
        name=shape.title,
        tokens=n,
        heads=heads,
        head_dim=dim,
        block_q=bq,
        block_k=bk,
        rows=rows,
        search=search_rows,
        probe=overhead("order probe", probe),
        orders=list(orders.names),
        default_method=default.method,  # the search the summary lines report
    )


def bench_wan_step(args, device, dtype) -> dict:
    import accel
    from accel.attention.sparse import SparseConfig
    from accel.bench.scenarios import WanScenario

    size = dict(frames=5, height=64, width=128) if args.tiny else {}  # tiny: latent [1, 16, 2, 8, 16]
    scenario = WanScenario(args.tiny, device, dtype, 0, **size)
    model, inputs = scenario.build(), scenario.make_inputs()

    def step():
        return scenario.forward(model, inputs)

    rows = []
    dense_times = timed(step, device, args.warmup, args.repeats)
    reference = step().float()
    rows.append(dict(name="dense", median_s=statistics.median(dense_times), times_s=dense_times))
    for target in args.targets:
        cfg = SparseConfig(
            target=target,
            dense_fraction=0.0,
            search_interval=10**9,
            block_q=args.block_q,
            block_k=args.block_k,
            stride=args.stride,
        )
        handle = accel.patch(model, cache=False, sparse=cfg)
        try:
            first = timed(step, device, 0, 1)[0]  # searches every attention module
            times = timed(step, device, args.warmup, args.repeats)  # reuses the patterns
            out = step().float()
            stats = handle.report().stats["sparse"]
        finally:
            accel.unpatch(model)
        rows.append(
            dict(
                name=f"sparse target {target}",
                target=target,
                first_call_s=first,
                median_s=statistics.median(times),
                times_s=times,
                mean_sparsity=stats["mean_sparsity"],
                search_s=stats["search_s"],
                rel_l1=((out - reference).abs().sum() / reference.abs().sum()).item(),
            )
        )
    for row in rows:
        row["speedup"] = rows[0]["median_s"] / row["median_s"]
    return dict(
        name="Wan2.1-1.3B-shaped transformer step, 480p" if not args.tiny else "tiny Wan step",
        latent=scenario.latent_shape,
        rows=rows,
    )


def _print_kernels(sc: dict) -> None:
    print(f"   {sc['tokens']} tokens, {sc['heads']} heads, d={sc['head_dim']}, blocks {sc['block_q']}x{sc['block_k']}")
    print(f"   {'variant':<24} {'sparsity':>8} {'median ms':>10} {'vs SDPA':>8} {'pattern MB/module':>18}")
    for r in sc["rows"]:
        sp = "" if r["sparsity"] is None else f"{r['sparsity']:.1%}"
        mem = f"{r['pattern_mb']:.2f} (mask {r['bool_mask_mb']:.2f})" if "pattern_mb" in r else ""
        print(f"   {r['name']:<24} {sp:>8} {r['median_s'] * 1e3:>10.3f} {r['speedup_vs_sdpa']:>7.2f}x {mem:>18}")
    for s in [sc["probe"]] + sc["search"]:
        label = s["method"] if s is sc["probe"] else f"search {s['method']}"
        print(
            f"   {label:<20} {s['median_s'] * 1e3:>10.3f} ms = {s['share_of_dense_call']:.1%} of a dense "
            f"call, {s['amortised_share']:.2%} amortised ({s['searches_per_generation']} per {STEPS} steps)"
        )
    main = next((s for s in sc["search"] if s["method"] == sc["default_method"]), None)
    if main is not None:
        print(
            f"   => search overhead ({main['method']}, per-head orders, {main['searches_per_generation']} searches over "
            f"{STEPS} steps): {main['amortised_share']:.2%} of dense attention time (target: under 5%)"
        )


def print_tables(doc: dict) -> None:
    for key, sc in doc["scenarios"].items():
        print(f"\n== {sc['name']} ({key})")
        if "search" in sc:
            _print_kernels(sc)
            continue
        print(f"   {'variant':<24} {'median ms':>10} {'speedup':>8} {'sparsity':>9} {'rel L1':>8}")
        for r in sc["rows"]:
            extra = "" if "mean_sparsity" not in r else f"{r['mean_sparsity']:>9.1%} {r['rel_l1']:>8.4f}"
            print(f"   {r['name']:<24} {r['median_s'] * 1e3:>10.3f} {r['speedup']:>7.2f}x {extra}")


def headline(doc: dict) -> str:
    """One line for the budgeted run's summary: speed-up per sparsity and search cost, or the step times."""
    parts = []
    for key, sc in doc["scenarios"].items():
        if "search" in sc:
            cells = [
                f"{r['name'].removeprefix('sparse ')} {r['speedup_vs_sdpa']:.2f}x"
                for r in sc["rows"]
                if r["name"].startswith("sparse")
            ]
            main = next((s for s in sc["search"] if s["method"] == sc["default_method"]), None)
            search = f"; search {main['amortised_share']:.1%} amortised" if main else ""
            parts.append(f"{key}: " + ", ".join(cells) + " vs SDPA" + search)
        else:
            dense, *rest = sc["rows"]
            cells = [
                f"target {r['target']}: {r['median_s'] * 1e3:.1f} ms ({r['speedup']:.2f}x, "
                f"sparsity {r['mean_sparsity']:.0%})"
                for r in rest
            ]
            parts.append(f"{key}: dense {dense['median_s'] * 1e3:.1f} ms, " + ", ".join(cells))
    return "; ".join(parts)


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("wan", "hunyuan", "wan-step", "all"), default="all")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.8])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="search methods to time (default: all of accel.attention.pattern.METHODS)",
    )
    parser.add_argument("--block-q", type=int, default=None, help="default 128 (GPU), 32 (--tiny)")
    parser.add_argument("--block-k", type=int, default=None, help="default 64 (GPU), 16 (--tiny)")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes on CPU (Triton interpreter): checks the script"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.block_q = args.block_q or (32 if args.tiny else 128)
    args.block_k = args.block_k or (16 if args.tiny else 64)
    return parser, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.tiny:  # the Triton kernels then run in the interpreter on CPU; must precede importing triton
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from accel.attention.pattern import METHODS
    from accel.bench.host import default_json_path, environment, write_json

    args.methods = args.methods or list(METHODS)
    if set(args.methods) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}, got {' '.join(args.methods)}")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float16
        torch.set_num_threads(1)
        args.warmup = min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU; use --tiny to check the script on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    wanted = ["wan", "hunyuan", "wan-step"] if args.scenario == "all" else [args.scenario]
    doc = dict(tiny=args.tiny, env=environment(device), date=time.strftime("%Y-%m-%d %H:%M:%S"), scenarios={})
    for key in wanted:
        if key == "wan-step":
            doc["scenarios"][key] = bench_wan_step(args, device, torch.float32 if args.tiny else dtype)
        else:
            doc["scenarios"][key] = bench_attention(shapes(args.tiny)[key], args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_tables(doc)
    doc["headline"] = headline(doc)
    out = write_json(
        args.json or default_json_path(Path(__file__).parent / "results", "sparse", doc["env"], args.tiny), doc
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
