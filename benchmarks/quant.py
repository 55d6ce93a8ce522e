#!/usr/bin/env python
"""W4 weight quantization benchmark: GEMM throughput and transformer latency/memory, one CUDA GPU.

GEMMs (`--part gemm`): y = x @ W^T for x [M, K] bf16 and W [N, K], at
- diffusion shapes: M = 4096, 16384, 32768 tokens; (K, N) = FLUX (3072, 3072), (3072, 12288), (12288, 3072),
  Wan2.1-1.3B (1536, 1536), (1536, 8960), Wan2.1-14B (5120, 5120);
- VLM decode shapes: M = 1, 4, 16; (K, N) = (4096, 4096), (4096, 11008), (11008, 4096).
Variants: bf16 `torch.matmul` (baseline), accel `W4Linear` with kernel "auto", "triton" (fused W4A16 GEMM)
and "dequant" (Triton dequantize + cuBLAS), "w4a8" (per-token int8 activations, Triton W4A8 GEMM on INT8 tensor
cores; the time includes quantizing the activations) and "auto int8" (`activations="int8"`: what kernel "auto"
picks with int8 activations opted in), and torchao int4 weight-only when torchao is installed (else the row says
so). Median over `--repeats` of CUDA-event-timed calls after warm-up; `rel_err` is against the bf16 product.

Transformers (`--part model`): one denoiser forward of a FLUX.1-dev-shaped transformer (1024px: 4096 image + 512
text tokens) and a Wan2.1-1.3B-shaped one (480p, 81 frames: 32,760 tokens), random weights, bf16, before and
after `accel.quant.quantize` (QuantConfig defaults, no calibration): latency, bytes of the module, peak memory of
the forward, relative error of the output, quantization time; then the same quantized model with
`activations="int8"` ("w4a8": kernel "auto" runs W4A8 for calls of 1024+ tokens on GPUs with fast INT8).

Usage::

    python benchmarks/quant.py                          # everything, on cuda:0
    python benchmarks/quant.py --part gemm --repeats 20
    python benchmarks/quant.py --part gemm --gemm-shapes results   # only the rows of the RESULTS.md table
    python benchmarks/quant.py --part model --models wan          # one model's forward
    python benchmarks/quant.py --tiny                   # tiny shapes on CPU (Triton interpreter): checks the script

--tiny measures nothing: it runs every code path at toy sizes so tests can check the script (the model part's
"w4a8" there forces the PyTorch W4A8 reference, since kernel "auto" picks no int8 path on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DIFFUSION_M = (4096, 16384, 32768)
DIFFUSION_KN = ((3072, 3072), (3072, 12288), (12288, 3072), (1536, 1536), (1536, 8960), (5120, 5120))
DECODE_M = (1, 4, 16)
DECODE_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
TINY_SHAPES = [(1, 64, 96), (33, 128, 64)]  # (M, K, N)
# The rows of the GEMM table in benchmarks/RESULTS.md (--gemm-shapes results): a short run that fills it.
RESULTS_SHAPES = [
    (1, 4096, 4096),
    (1, 4096, 11008),
    (16, 11008, 4096),
    (4096, 3072, 3072),
    (4096, 3072, 12288),
    (16384, 3072, 3072),
    (32768, 1536, 1536),
    (32768, 5120, 5120),
]
MODELS = ("flux", "wan")
# (label, QuantConfig.kernel, QuantConfig.activations); --tiny: the interpreter runs the Triton kernels on CPU
GEMM_VARIANTS = [
    ("auto", "auto", "16bit"),
    ("triton", "triton", "16bit"),
    ("dequant", "dequant", "16bit"),
    ("w4a8", "w4a8", "int8"),
    ("auto int8", "auto", "int8"),
]


def _timer(device, repeats: int, warmup: int) -> Callable[[Callable[[], Any]], float]:
    from accel.bench.measure import median, time_calls

    return lambda fn: median(time_calls(fn, repeats, warmup, device))


def _torchao_int4(k: int, n: int, group: int, device, dtype) -> tuple[Any, str]:
    from torch import nn

    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError:
        return None, "torchao not installed"
    model = nn.Sequential(nn.Linear(k, n, bias=False, device=device, dtype=dtype))
    try:
        quantize_(model, Int4WeightOnlyConfig(group_size=group))
    except Exception as err:  # report, do not hide: torchao's int4 needs CUDA and specific dtypes
        return None, f"torchao failed: {type(err).__name__}: {err}"
    return model, ""


def gemm_row(m: int, k: int, n: int, args, device, dtype, variants) -> dict:
    """bf16 matmul, then each W4Linear kernel and torchao's int4 on the same [m, k] x [k, n] product."""
    import torch
    from torch import nn

    from accel.quant import QuantConfig, quantize

    time_it = _timer(device, args.repeats, args.warmup)
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    ref = linear(x)
    base = time_it(lambda: torch.matmul(x, linear.weight.T))
    row = {"M": m, "K": k, "N": n, "bf16_s": base, "variants": {}}
    holder = nn.Sequential(nn.Linear(k, n, bias=False, device=device, dtype=dtype))
    holder[0].weight.copy_(linear.weight)
    quantize(holder, QuantConfig(group_size=args.group_size, min_features=0, search=False))
    w4 = holder[0]
    for label, kernel, activations in variants:
        w4.kernel, w4.activations = kernel, activations
        y = w4(x)
        t = time_it(lambda: w4(x))
        rel = float((y.float() - ref.float()).norm() / ref.float().norm())
        row["variants"][f"accel {label}"] = {"s": t, "vs_bf16": base / t, "rel_err": rel}
    ao, why = (None, "skipped in --tiny") if args.tiny else _torchao_int4(k, n, args.group_size, device, dtype)
    if ao is not None:
        t = time_it(lambda: ao(x))
        row["variants"]["torchao int4wo"] = {"s": t, "vs_bf16": base / t}
    else:
        row["variants"]["torchao int4wo"] = {"note": why}
    return row


def bench_gemm(args, device, dtype) -> list[dict]:
    import torch

    variants = GEMM_VARIANTS
    if device.type != "cuda" and not args.tiny:
        variants = [("auto", "auto", "16bit"), ("reference", "reference", "16bit")]
    rows = []
    for m, k, n in args.gemm_shapes:
        with torch.no_grad():
            row = gemm_row(m, k, n, args, device, dtype, variants)
        rows.append(row)
        cells = "  ".join(
            f"{name} {v['vs_bf16']:.2f}x" if "s" in v else f"{name}: {v['note']}" for name, v in row["variants"].items()
        )
        print(f"M={m:>6} K={k:>5} N={n:>5}  bf16 {row['bf16_s'] * 1e3:8.3f} ms  {cells}", flush=True)
    return rows


def _module_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _opt_in_w4a8(model, tiny: bool) -> None:
    """The same 4-bit weights with int8 activations opted in."""
    from accel.quant import W4Linear

    for layer in model.modules():
        if isinstance(layer, W4Linear):
            layer.activations = "int8"
            layer.kernel = "w4a8-reference" if tiny else "auto"


def _quantize(entry: dict, model, args, device) -> None:
    import torch

    from accel.quant import QuantConfig, quantize

    t0 = time.perf_counter()
    result = quantize(model, QuantConfig(group_size=args.group_size, min_features=0 if args.tiny else 256))
    if device.type == "cuda":
        torch.cuda.synchronize()
    entry["quantize_s"] = time.perf_counter() - t0
    stats = result.stats()  # without the per-layer errors, which the model's size makes long
    for key in ("error", "w4a8_error"):
        if stats[key] is not None:
            stats[key] = {k: v for k, v in stats[key].items() if k != "per_layer"}
    entry["quant_stats"] = stats


def bench_model(scenario, args, device) -> dict:
    """One denoiser forward in bf16, with W4 weights, then with W4A8 (the same quantized model)."""
    import torch

    from accel.bench.measure import PeakMemory

    time_it = _timer(device, args.repeats, args.warmup)
    model, inputs = scenario.build(), scenario.make_inputs()
    entry: dict[str, Any] = {"config": scenario.describe()}
    for variant in ("bf16", "w4", "w4a8"):
        if variant == "w4":
            _quantize(entry, model, args, device)
        if variant == "w4a8":
            _opt_in_w4a8(model, args.tiny)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with PeakMemory(device) as mem:
            out = scenario.forward(model, inputs).float()
            median_s = time_it(lambda: scenario.forward(model, inputs))
        entry[variant] = {
            "median_s": median_s,
            "module_bytes": _module_bytes(model),
            "peak_bytes": mem.peak_bytes if mem.device_kind == "cuda" else None,
        }
        if variant == "bf16":
            ref = out
        else:
            entry[variant]["rel_err_vs_bf16"] = float((out - ref).norm() / ref.norm())
    entry["speedup"] = entry["bf16"]["median_s"] / entry["w4"]["median_s"]
    entry["speedup_w4a8"] = entry["bf16"]["median_s"] / entry["w4a8"]["median_s"]
    entry["memory_ratio"] = entry["bf16"]["module_bytes"] / entry["w4"]["module_bytes"]
    return entry


def bench_models(args, device, dtype) -> dict:
    import torch

    from accel.bench.scenarios import SCENARIOS

    results = {}
    for key in (m for m in MODELS if m in args.models):
        with torch.no_grad():
            results[key] = e = bench_model(SCENARIOS[key](args.tiny, device, dtype, args.seed), args, device)
        print(
            f"{key}: bf16 {e['bf16']['median_s'] * 1e3:.1f} ms, w4 {e['w4']['median_s'] * 1e3:.1f} ms "
            f"({e['speedup']:.2f}x), module {e['memory_ratio']:.2f}x smaller, "
            f"rel err {e['w4']['rel_err_vs_bf16']:.4f}, quantized in {e['quantize_s']:.1f} s; "
            f"w4a8 {e['w4a8']['median_s'] * 1e3:.1f} ms ({e['speedup_w4a8']:.2f}x), "
            f"rel err {e['w4a8']['rel_err_vs_bf16']:.4f}",
            flush=True,
        )
    return results


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}x" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f}x"


def headline(doc: dict) -> str:
    """One line for the budgeted run's summary: W4 and W4A8 GEMM speed-ups, decode and diffusion shapes, and
    each model's speed-up, size and error."""
    parts = []
    for label in ("accel auto", "accel w4a8"):
        for kind, rows in (
            ("decode", [r for r in doc.get("gemm", []) if r["M"] <= 16]),
            ("diffusion", [r for r in doc.get("gemm", []) if r["M"] > 16]),
        ):
            values = [r["variants"][label]["vs_bf16"] for r in rows if "vs_bf16" in r["variants"].get(label, {})]
            if values:
                parts.append(f"{label.removeprefix('accel ')} {kind} {_span(values)}")
    if parts:
        parts[-1] += " vs bf16"
    for key, e in doc.get("models", {}).items():
        parts.append(
            f"{key}: W4 {e['speedup']:.2f}x, W4A8 {e['speedup_w4a8']:.2f}x vs bf16, "
            f"{e['memory_ratio']:.2f}x smaller, rel err {e['w4']['rel_err_vs_bf16']:.3f}"
        )
    return "; ".join(parts)


def _gemm_shapes(p: argparse.ArgumentParser, text: str, tiny: bool) -> list[tuple[int, int, int]]:
    if text in ("all", "results"):
        if tiny:
            return TINY_SHAPES
        if text == "results":
            return RESULTS_SHAPES
        decode = [(m, k, n) for m in DECODE_M for k, n in DECODE_KN]
        return decode + [(m, k, n) for m in DIFFUSION_M for k, n in DIFFUSION_KN]
    shapes = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
            p.error(f"--gemm-shapes: {item!r} is not MxKxN with positive integers (e.g. 4096x3072x3072)")
        shapes.append(tuple(int(x) for x in parts))
    if not shapes:
        p.error("--gemm-shapes: no shape given; use all, results or MxKxN,...")
    return shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["gemm", "model", "all"], default="all")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gemm-shapes",
        default="all",
        help="all (decode and diffusion sets), results (the RESULTS.md table rows), or MxKxN,... "
        "(--tiny: its toy shapes unless MxKxN are given)",
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"--part model: comma list of {', '.join(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU (Triton interpreter): checks the script")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/quant-<gpu>.json")
    args = p.parse_args(argv)
    args.gemm_shapes = _gemm_shapes(p, args.gemm_shapes, args.tiny)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - set(MODELS):
        p.error(f"--models {','.join(args.models) or '(empty)'}: choose from {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    from accel.bench.host import default_json_path, environment, write_json

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.group_size = 32  # divides every tiny layer, and W4A8 needs groups of 32+
        torch.set_num_threads(1)  # toy sizes: threads only thrash
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/quant.py needs a CUDA GPU; use --tiny to check the script on CPU")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    doc = {"tiny": args.tiny, "env": environment(device), "group_size": args.group_size}
    if args.part in ("gemm", "all"):
        doc["gemm"] = bench_gemm(args, device, dtype)
    if args.part in ("model", "all"):
        doc["models"] = bench_models(args, device, dtype)
    doc["headline"] = headline(doc)
    out = write_json(
        args.json or default_json_path(Path(__file__).parent / "results", "quant", doc["env"], args.tiny), doc
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
