#!/usr/bin/env python
"""Attention kernel benchmark: accel's INT8 attention vs PyTorch SDPA (flash, cuDNN) and sageattention.

What it measures, per shape, all in one process on the same inputs:

- speed: median time of one attention call over ``--repeats`` timed calls (after ``--warmup``), CUDA events,
  reported as TFLOP/s counting 4·N²·d per head (Q·Kᵀ and P·V, 2 FLOPs per multiply-add), halved for causal;
  the int8 kernel's time includes quantising Q and K (and V for FP8), as a caller would pay it;
- accuracy: cosine similarity and relative L1 (sum|o - ref| / sum|ref|) against fp32 SDPA on the same inputs,
  for ``--acc-queries`` evenly spaced query rows (all keys), printed beside each speed.

Inputs are random at the real shapes: Q ~ N(0, 1), K ~ N(0, 1) plus a per-channel bias ~ N(0, 3²) shared by all
tokens (real DiT keys carry one; it is what K smoothing is for), V ~ N(0, 1). Timings do not depend on the values.

Shapes (``--shapes``), B=1, d=128, ``--dtype`` bf16 by default:

- ``wan``: Wan2.1-T2V-1.3B 832x480, 81 frames: 12 heads, N = 21·30·52 = 32,760 (self-attention);
- ``hunyuan``: HunyuanVideo 1280x720, 129 frames: 24 heads, N = 33·45·80 + 256 text = 119,056;
- ``flux``: FLUX.1-dev 1024²: 24 heads, N = 4096 image + 512 text = 4,608;
- ``vlm``: VLM prefill (7B-class language model): 32 heads, N = 4,096, causal.

Variants: ``sdpa-flash`` and ``sdpa-cudnn`` (``torch.nn.attention.sdpa_kernel``), ``sageattn-triton`` (the
``sageattention`` package's Triton INT8 kernel, when importable), and accel's ``int8_attention``: ``int8`` (per-tile
scales, 16-bit P·V), ``int8-token`` (per-token scales), ``int8-fp8pv`` (FP8 P·V, compute capability >= 8.9). For each
accel variant a small sweep over (block_q, block_k, num_warps, num_stages) picks the fastest configuration first
(``--no-tune`` keeps the defaults); the table names the one used. Block sizes are also the quantisation granularity
of per-tile scales, so accuracy is reported for the configuration that was timed.

``--e2e`` adds one Wan2.1-1.3B-shaped transformer forward (random weights, bf16, 32,760 video tokens) with SDPA vs
``accel.patch(transformer, attention="int8")``. That route is wired by the model integration; until it exists the
row records the error instead of a time.

Usage::

    python benchmarks/attention.py                               # all shapes, on cuda:0
    python benchmarks/attention.py --shapes wan,flux --repeats 20
    python benchmarks/attention.py --e2e                          # plus the Wan transformer step
    python benchmarks/attention.py --shapes none --e2e            # the Wan transformer step alone
    python benchmarks/attention.py --tiny                         # tiny shapes, CPU (Triton interpreter): a check

Results: a table on stdout and JSON at ``--json`` (default ``benchmarks/results/attention-<gpu>.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Tiny stand-ins for --tiny (Triton interpreter on CPU): few heads and tokens, head dim 128 as on a GPU.
TINY_SHAPES = {"wan": (2, 70, False), "hunyuan": (2, 56, False), "flux": (2, 48, False), "vlm": (2, 48, True)}
TINY_TUNE_CONFIGS = [(16, 16, 4, None), (32, 16, 4, None)]
HEAD_DIM = 128


def shape_table(tiny: bool) -> dict[str, tuple[int, int, bool]]:
    """name -> (heads, tokens, causal)."""
    if tiny:
        return TINY_SHAPES
    from accel.bench.scenarios import ATTENTION_SHAPES

    return {name: (s.heads, s.tokens, s.causal) for name, s in ATTENTION_SHAPES.items()}


def flops(heads: int, n: int, causal: bool, batch: int = 1) -> float:
    """4·N²·d per head (Q·Kᵀ and P·V), halved for causal."""
    return 4.0 * n * n * HEAD_DIM * heads * batch / (2.0 if causal else 1.0)


def make_inputs(heads: int, n: int, dtype, device, seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, heads, n, HEAD_DIM)
    q = torch.randn(shape, generator=g, device=device, dtype=dtype)
    k = (torch.randn(shape, generator=g, device=device) + 3.0 * torch.randn(HEAD_DIM, generator=g, device=device)).to(
        dtype
    )
    v = torch.randn(shape, generator=g, device=device, dtype=dtype)
    return q, k, v


def accuracy(out, q, k, v, causal: bool, n_rows: int) -> dict[str, float]:
    """Cosine and relative L1 of `out` vs fp32 SDPA, on `n_rows` evenly spaced query rows (all keys)."""
    import torch
    import torch.nn.functional as F

    n = q.shape[2]
    rows = torch.linspace(0, n - 1, min(n_rows, n), device=q.device).round().long().unique()
    mask = None
    if causal:  # query i sees keys j <= i
        mask = torch.arange(n, device=q.device)[None, :] <= rows[:, None]
    gold = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float(), attn_mask=mask)
    o, gold = out[:, :, rows].float().flatten(), gold.flatten()
    return dict(
        cos=F.cosine_similarity(o, gold, dim=0).item(), rel_l1=((o - gold).abs().sum() / gold.abs().sum()).item()
    )


def timer(fn: Callable[[], Any], warmup: int, repeats: int, device) -> list[float]:
    from accel.bench.measure import time_calls

    return time_calls(fn, repeats, warmup, device)


def baselines(cuda: bool) -> dict[str, Callable]:
    """name -> fn(q, k, v, causal); SDPA backends on CUDA, default SDPA on CPU, sageattention if importable."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    out: dict[str, Callable] = {}
    if cuda:
        out["sdpa-flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
        out["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        try:  # SageAttention2 names its Triton kernel; SageAttention 1.x has only the Triton `sageattn`
            from sageattention import sageattn_qk_int8_pv_fp16_triton as sage
        except ImportError:
            try:
                from sageattention import sageattn as sage
            except ImportError:
                sage = None
        if sage is not None:
            out["sageattn-triton"] = lambda q, k, v, causal: sage(q, k, v, tensor_layout="HND", is_causal=causal)
    else:
        out["sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out


def accel_variants(device) -> dict[str, dict[str, Any]]:
    import torch

    out = {"int8": {}, "int8-token": {"granularity": "token"}}
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9):
        out["int8-fp8pv"] = {"pv": "fp8"}
    return out


def tune(kwargs, q, k, v, causal, configs, device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Time each (block_q, block_k, num_warps, num_stages) briefly (3 calls on a GPU); return the fastest and all."""
    from accel.attention import int8_attention

    cuda = device.type == "cuda"
    tried = []
    for bq, bk, warps, stages in configs:
        cfg = dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
        try:
            fn = functools.partial(int8_attention, q, k, v, causal=causal, **kwargs, **cfg)
            t = statistics.median(timer(fn, 1, 3, device) if cuda else timer(fn, 0, 1, device))
            tried.append(dict(cfg, median_s=t))
        except Exception as exc:  # e.g. out of shared memory for a large tile with many stages
            tried.append(dict(cfg, error=f"{type(exc).__name__}: {exc}"[:300]))
    ok = [t for t in tried if "median_s" in t]
    if not ok:
        raise RuntimeError(f"every tuning configuration failed: {tried}")
    best = min(ok, key=lambda t: t["median_s"])
    return {key: best[key] for key in ("block_q", "block_k", "num_warps", "num_stages")}, tried


def bench_shape(name, heads, n, causal, args, device, dtype) -> dict[str, Any]:
    import torch

    from accel.attention import int8_attention
    from accel.bench.scenarios import INT8_TILE_SWEEP

    q, k, v = make_inputs(heads, n, dtype, device, args.seed)
    work = flops(heads, n, causal)
    rows: list[dict[str, Any]] = []

    def record(variant, fn, **extra):
        row: dict[str, Any] = dict(variant=variant, **extra)
        try:
            times = timer(fn, args.warmup, args.repeats, device)
            row.update(median_s=statistics.median(times), times_s=times, tflops=work / statistics.median(times) / 1e12)
            row.update(accuracy(fn(), q, k, v, causal, args.acc_queries))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(name, row), flush=True)

    for variant, fn in baselines(device.type == "cuda").items():
        record(variant, lambda fn=fn: fn(q, k, v, causal))
    configs = TINY_TUNE_CONFIGS if args.tiny else INT8_TILE_SWEEP
    for variant, kwargs in accel_variants(device).items():
        try:
            cfg, tried = tune(kwargs, q, k, v, causal, configs if not args.no_tune else configs[:1], device)
        except Exception as exc:
            rows.append(dict(variant=variant, kwargs=kwargs, error=f"{type(exc).__name__}: {exc}"[:500]))
            print(format_row(name, rows[-1]), flush=True)
            continue
        record(
            variant,
            lambda kw=dict(kwargs, **cfg): int8_attention(q, k, v, causal=causal, **kw),
            kwargs=kwargs,
            config=cfg,
            tuning=tried,
        )

    ref = next((r for r in rows if r["variant"] in ("sdpa-flash", "sdpa") and "median_s" in r), None)
    for r in rows:
        if ref is not None and "median_s" in r:
            r["speedup_vs_flash"] = ref["median_s"] / r["median_s"]
    return dict(heads=heads, tokens=n, head_dim=HEAD_DIM, causal=causal, batch=1, flops=work, rows=rows)


def format_row(shape: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{shape:8s} {r['variant']:16s} ERROR {r['error'][:160]}"
    cfg = r.get("config")
    cfg_s = f"  [bq={cfg['block_q']} bk={cfg['block_k']} w={cfg['num_warps']} s={cfg['num_stages']}]" if cfg else ""
    return (
        f"{shape:8s} {r['variant']:16s} {r['median_s'] * 1e3:10.3f} ms {r['tflops']:9.1f} TFLOP/s  "
        f"cos {r['cos']:.6f}  relL1 {r['rel_l1']:.4f}{cfg_s}"
    )


def wan_transformer_step(args, device, dtype) -> dict[str, Any]:
    """One Wan2.1-1.3B-shaped transformer forward (`accel.bench.scenarios.WanScenario`), SDPA vs
    `accel.patch(transformer, attention="int8")`; a failing int8 route is recorded, not raised."""
    import torch

    import accel
    from accel.bench.scenarios import WAN21_T2V_1_3B_TRANSFORMER, WanScenario

    tiny = {}
    if args.tiny:  # head dim 64: int8_attention takes 64, 80, 96 or 128 (the zoo's tiny Wan has 16)
        config = dict(
            WAN21_T2V_1_3B_TRANSFORMER,
            num_attention_heads=2,
            attention_head_dim=64,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
        )
        tiny = dict(config=config, frames=17, height=128, width=128, text_len=8)
    scenario = WanScenario(args.tiny, device, dtype, args.seed, **tiny)
    model, inputs = scenario.build(), scenario.make_inputs()
    result: dict[str, Any] = dict(config=scenario.config, latent=scenario.latent_shape)
    repeats = max(1, args.repeats // 4)

    def step():
        return scenario.forward(model, inputs)

    base_times = timer(step, args.warmup, repeats, device)
    base = step().float()
    result["sdpa"] = dict(median_s=statistics.median(base_times), times_s=base_times)
    try:
        handle = accel.patch(model, attention="int8", cache=False)
        try:
            times = timer(step, args.warmup, repeats, device)
            out = step().float()
            result["int8"] = dict(
                median_s=statistics.median(times),
                times_s=times,
                speedup=result["sdpa"]["median_s"] / statistics.median(times),
                cos=torch.nn.functional.cosine_similarity(out.flatten(), base.flatten(), dim=0).item(),
                report=str(handle),
            )
        finally:
            accel.unpatch(model)
    except Exception as exc:
        result["int8"] = dict(error=f"{type(exc).__name__}: {exc}"[:500])
    return result


def headline(doc: dict[str, Any]) -> str:
    """One line for the budgeted run's summary: each accel variant's speed-up and cosine, and the Wan step."""
    parts = []
    for shape, sc in doc["shapes"].items():
        cells = []
        for r in sc["rows"]:
            if "error" in r:
                cells.append(f"{r['variant']} ERROR")
            elif not r["variant"].startswith("sdpa") and "speedup_vs_flash" in r:
                cells.append(f"{r['variant']} {r['speedup_vs_flash']:.2f}x (cos {r['cos']:.4f})")
        parts.append(f"{shape}: " + ", ".join(cells))
    if "e2e_wan" in doc:
        sdpa, int8 = doc["e2e_wan"]["sdpa"], doc["e2e_wan"]["int8"]
        tail = (
            f"int8 {int8['median_s'] * 1e3:.1f} ms ({int8['speedup']:.2f}x, cos {int8['cos']:.4f})"
            if "median_s" in int8
            else f"int8 ERROR {int8['error'][:80]}"
        )
        parts.append(f"Wan step: SDPA {sdpa['median_s'] * 1e3:.1f} ms, {tail}")
    return "; ".join(parts) + ((" (vs SDPA)" if doc["tiny"] else " (vs SDPA flash)") if doc["shapes"] else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default="all", help="comma list of wan,hunyuan,flux,vlm; all; or none (with --e2e)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--acc-queries", type=int, default=2048, help="query rows checked against fp32 SDPA")
    p.add_argument("--no-tune", action="store_true", help="default block sizes and launch options only")
    p.add_argument("--e2e", action="store_true", help="also time one Wan2.1-1.3B transformer step, SDPA vs int8")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = list(TINY_SHAPES)  # the same names at both sizes
    if args.shapes == "none":
        args.shape_names = []
    else:
        args.shape_names = names if args.shapes == "all" else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = set(args.shape_names) - set(names)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}; choose from {names}, all or none")
    if not args.shape_names and not args.e2e:
        p.error("nothing to run: --shapes none needs --e2e")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from accel.bench.host import default_json_path, environment, write_json

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU; use --tiny to check the script on CPU", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    env = environment(device)
    table = shape_table(args.tiny)
    path = Path(args.json or default_json_path(Path(__file__).parent / "results", "attention", env, args.tiny))
    doc: dict[str, Any] = dict(
        tiny=args.tiny,
        dtype=args.dtype,
        env=env,
        args=vars(args),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        shapes={},
    )
    print(f"# {env['gpu'] or 'CPU (Triton interpreter)'}  torch {env['torch']}  triton {env['triton']}  {args.dtype}")
    failed = False
    for name in args.shape_names:
        heads, n, causal = table[name]
        print(
            f"## {name}: B=1 H={heads} N={n} d={HEAD_DIM}{' causal' if causal else ''}  "
            f"({flops(heads, n, causal) / 1e12:.2f} TFLOP per call)"
        )
        doc["shapes"][name] = bench_shape(name, heads, n, causal, args, device, dtype)
        failed |= any("error" in r for r in doc["shapes"][name]["rows"])
        write_json(path, doc, indent=1)
    if args.e2e:
        doc["e2e_wan"] = e = wan_transformer_step(args, device, dtype)
        print(
            f"## Wan transformer step: sdpa {e['sdpa']['median_s'] * 1e3:.1f} ms; int8 "
            + (
                f"{e['int8']['median_s'] * 1e3:.1f} ms ({e['int8']['speedup']:.2f}x, cos {e['int8']['cos']:.5f})"
                if "median_s" in e["int8"]
                else f"ERROR {e['int8']['error'][:200]}"
            )
        )
    doc["headline"] = headline(doc)
    write_json(path, doc, indent=1)
    print(f"# JSON: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
