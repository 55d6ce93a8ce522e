#!/usr/bin/env python
"""Kernel compile check: every Triton kernel in accel, at the launch configuration its wrapper uses on a
GPU, compiled ahead of time for sm_80 / sm_89 / sm_90 without a GPU (`accel._triton_aot`).

Per variant x target it prints shared memory per block (and the target's limit), registers per thread,
spilled bytes, and the tensor-core instructions in the PTX ("wgmma s8" = Hopper INT8 warpgroup MMA,
"mma e4m3" = FP8, ...). This is not a speed measurement. The variants reproduce the wrappers' GPU path
(never their interpreter workarounds: PV_FP32, EMULATE_FP8, UPCAST, DOT_FP32 are False) at real shapes
(Wan2.1 480p attention: 12 heads x 32,760 tokens, d=128; 3072x3072 linear layers, group 128); the
`tune-*` rows are the sweep of benchmarks/attention.py.

Usage::

    python benchmarks/compile_report.py                      # every variant x target (~3 min on 2 CPU cores)
    python benchmarks/compile_report.py --only attn-int8,attn-fp8pv --targets 89,90 --json out.json
    python benchmarks/compile_report.py --only attn-int8@80,w4a8-gemm@90          # variant@compute capability

Runs with TRITON_INTERPRET unset (it unsets it for itself). Exit status 1 if any variant fails to
compile, spills, or exceeds the target's shared memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import torch  # noqa: E402

from accel import _triton  # noqa: E402
from accel import _triton_aot as aot  # noqa: E402
from accel._triton import cdiv  # noqa: E402
from accel.bench.scenarios import INT8_TILE_SWEEP  # noqa: E402

B, H, N, D = 1, 12, 32760, 128  # Wan2.1-1.3B 480p self-attention
M_DECODE, M_PREFILL, NK = 64, 4096, 3072  # W4 GEMMs: tokens per call (fused <= 64; W4A8 >= 1024), 3072x3072
GROUP = 128  # QuantConfig.group_size default
ALL_TARGETS = (80, 89, 90)


@dataclass
class KernelVariant:
    name: str
    kernel: Callable[[], Any]  # returns the JITFunction (imported lazily, after TRITON_INTERPRET is unset)
    args: tuple
    grid: tuple
    kwargs: dict
    mma: tuple[str, ...]  # operand types the tensor cores must run (e.g. ("s8", "bf16")); () = none expected
    targets: tuple[int, ...] = ALL_TARGETS
    note: str = ""


def _kernel(module: str, name: str):
    """A `@triton.jit` kernel from its kernel module (imported here, after TRITON_INTERPRET is unset)."""
    return getattr(_triton.load(module), name)


def strides(*shape):
    out = [1]
    for s in reversed(shape[1:]):
        out.insert(0, out[0] * s)
    return tuple(out)


def int8_attention(
    name,
    *,
    per_token=False,
    bias=False,
    fp8=False,
    causal=False,
    d=D,
    block_q=128,
    block_k=64,
    num_warps=None,
    num_stages=None,
    note="",
):
    """`accel.attention.int8.int8_attention` on bf16 [B, H, N, d] inputs, as launched on a GPU."""
    from accel.attention import int8

    block_d = int8._block_d(d)
    qk = strides(B, H, N, d)  # q8/k8 from the fused quantiser: contiguous
    v_dtype, vs = (torch.float8_e4m3fn, (H * d * N, d * N, 1, N)) if fp8 else (torch.bfloat16, qk)  # fp8 V: transposed
    nbq, nbk = (N, N) if per_token else (cdiv(N, block_q), cdiv(N, block_k))
    f32 = torch.float32
    args = (
        torch.int8,
        torch.int8,
        v_dtype,
        f32,
        f32,
        f32,
        f32,
        f32,
        torch.bfloat16,
        *qk,
        *qk,
        *vs,
        *qk,
        *((N, 0) if bias else (0, 0)),
        H,
        H,
        1,
        N,
        N,
        d,
        nbq,
        nbk,
        0,
    )
    opts = dict(num_warps=num_warps or (8 if block_q * block_d >= 128 * 128 else 4))
    if num_stages is not None:
        opts["num_stages"] = num_stages
    kwargs = dict(
        CAUSAL=causal,
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        BLOCK_D=block_d,
        PER_TOKEN=per_token,
        HAS_BIAS=bias,
        PV_FP8=fp8,
        PV_FP32=False,
        EMULATE_FP8=False,
        **opts,
    )
    return KernelVariant(
        name,
        lambda: _kernel("accel.attention.int8_kernel", "int8_attention_kernel"),
        args,
        (cdiv(N, block_q), B * H),
        kwargs,
        ("s8", "e4m3" if fp8 else "bf16"),
        (89, 90) if fp8 else ALL_TARGETS,
        note,
    )


def quant_int8(name, per_row):
    """`_quantize_per_block_triton`: Q/K (bf16, contiguous) -> int8, block 128 or per token (tile 32)."""

    tile = 32 if per_row else 128
    args = (
        torch.bfloat16,
        torch.float32,
        torch.int8,
        torch.float32,
        *strides(B, H, N, D),
        H,
        N,
        D,
        N if per_row else cdiv(N, tile),
        1.0,
    )
    kwargs = dict(HAS_MEAN=True, PER_ROW=per_row, BLOCK=tile, BLOCK_D=D, num_warps=4)
    return KernelVariant(
        name,
        lambda: _kernel("accel.attention.int8_quant_kernel", "quantize_int8_kernel"),
        args,
        (cdiv(N, tile), B * H),
        kwargs,
        (),
    )


def block_sparse(name, *, int8=False, valid=False, remainder=False, dtype=torch.bfloat16, note=""):
    """`accel.attention.sparse_kernel.block_sparse_attention` with 128x64 blocks, as launched on a GPU."""
    from accel.attention import sparse_kernel

    s = strides(B, H, N, D)
    qk_dtype = torch.int8 if int8 else dtype
    v_dtype = sparse_kernel._pv_dtype(dtype) if int8 or dtype != torch.float32 else dtype  # as the wrapper casts V
    nbq, nbk = cdiv(N, 128), cdiv(N, 64)
    args = (
        qk_dtype,
        qk_dtype,
        v_dtype,
        dtype,
        torch.int16,
        torch.int32,
        torch.int8,
        torch.float32,
        torch.float32,
        *s,
        *s,
        *s,
        *s,
        0,
        *((N, 0) if valid else (0, 0)),
        H,
        1,
        N,
        N,
        D,
        nbq,
        nbk,
        D**-0.5 * 1.4426950408889634,
    )
    kwargs = dict(
        INT8=int8,
        HAS_VALID=valid,
        UPCAST=False,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_M=128,
        BLOCK_N=64,
        BLOCK_D=128,
        num_warps=8,
    )
    if remainder:  # the skipped blocks' stand-ins, in the P·V type, as `_remainder_inputs` passes them
        kwargs.update(KM=v_dtype, VM=v_dtype, LC=torch.float32, KEPT=torch.uint8, REMAINDER=True, REST_N=32)
    mma = ("s8", "bf16") if int8 else () if dtype == torch.float32 else ("bf16",)
    return KernelVariant(
        name,
        lambda: _kernel("accel.attention.block_sparse_kernel", "block_sparse_attention_kernel"),
        args,
        (nbq, B * H),
        kwargs,
        mma,
        note=note,
    )


def w4a16(name, m, ins=False, note=""):
    """`accel.quant.kernels.w4a16_matmul` (fused W4A16 GEMM, <= 64 tokens), bf16, blocks from `_blocks`."""
    from accel.quant import kernels

    bm, bn, bk = kernels._blocks(m, GROUP)  # the GPU branch: TRITON_INTERPRET is unset here
    bf = torch.bfloat16
    args = (bf, torch.uint8, bf, bf, bf, bf, bf, m, NK, NK, NK, 1, NK, 1)
    kwargs = dict(
        GROUP=GROUP, HAS_INS=ins, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SWIZZLE=8, DOT_FP32=False
    )
    return KernelVariant(
        name,
        lambda: _kernel("accel.quant.w4a16_kernel", "w4a16_gemm_kernel"),
        args,
        (cdiv(m, bm) * cdiv(NK, bn),),
        kwargs,
        ("bf16",),
        note=note,
    )


def dequant(name):

    bf = torch.bfloat16
    args = (torch.uint8, bf, bf, bf, bf, NK, NK)
    kwargs = dict(GROUP=GROUP, HAS_INS=True, BLOCK_N=32, BLOCK_K=128)
    return KernelVariant(
        name,
        lambda: _kernel("accel.quant.w4_dequant_kernel", "w4_dequantize_kernel"),
        args,
        (cdiv(NK, 32), cdiv(NK, 128)),
        kwargs,
        (),
    )


def quant_rows(name):
    from accel.quant import kernels

    args = (torch.bfloat16, torch.bfloat16, torch.int8, torch.float32, torch.float32, M_PREFILL, NK, NK, 1)
    kwargs = dict(HAS_INS=True, GROUP=GROUP, BLOCK_M=8, AMAX_MIN=kernels._AMAX_MIN)
    return KernelVariant(
        name,
        lambda: _kernel("accel.quant.int8_rows_kernel", "quantize_rows_int8_kernel"),
        args,
        (cdiv(M_PREFILL, 8),),
        kwargs,
        (),
    )


def w4a8(name, m):
    """`accel.quant.kernels.w4a8_matmul`: BLOCK_M as the wrapper picks it (32 up to 32 tokens, else 64), 128x128
    N x K tiles, 8 warps, 3 stages."""
    from accel.quant import kernels

    bm = 32 if m <= 32 else 64
    bf = torch.bfloat16
    args = (torch.int8, torch.float32, torch.float32, torch.uint8, bf, bf, bf, bf, m, NK, NK, NK, 1)
    kwargs = dict(
        GROUP=GROUP,
        HAS_BIAS=True,
        BLOCK_M=bm,
        BLOCK_N=128,
        BLOCK_K=min(GROUP, kernels._W4A8_BLOCK_K_MAX),
        SWIZZLE=8,
        num_warps=8,
        num_stages=3,
    )
    return KernelVariant(
        name,
        lambda: _kernel("accel.quant.w4a8_kernel", "w4a8_gemm_kernel"),
        args,
        (cdiv(m, bm) * cdiv(NK, 128),),
        kwargs,
        ("s8",),
    )


def variants() -> list[KernelVariant]:
    out = [
        int8_attention("attn-int8", note="int8_attention defaults: per-tile scales, bf16 P.V, 128x64 tiles"),
        int8_attention("attn-int8-token", per_token=True, note='granularity="token"'),
        int8_attention("attn-int8-bias", bias=True, note="key padding mask / smooth_q"),
        int8_attention("attn-int8-causal", causal=True, note="VLM prefill"),
        int8_attention("attn-int8-d64", d=64, note="head dim 64: 128x64 tile, 4 warps"),
        int8_attention("attn-fp8pv", fp8=True, note='pv="fp8" (sm_89+ only: the wrapper refuses sm_80)'),
        int8_attention("attn-fp8pv-token-bias", fp8=True, per_token=True, bias=True),
        quant_int8("quant-int8-block", per_row=False),
        quant_int8("quant-int8-token", per_row=True),
        block_sparse("sparse-bf16", note="block_sparse_attention, 128x64 blocks"),
        block_sparse("sparse-bf16-valid", valid=True, note="with key_valid (HunyuanVideo text mask)"),
        block_sparse("sparse-int8", int8=True),
        block_sparse("sparse-bf16-remainder", remainder=True, note="remainder=True: one stand-in per skipped block"),
        block_sparse("sparse-int8-remainder", int8=True, remainder=True),
        w4a16("w4a16-m16", 16),
        w4a16("w4a16-m64-awq", M_DECODE, ins=True),
        w4a16("w4a16-m4096", M_PREFILL, note='kernel="triton" forced at many tokens (auto uses dequant + cuBLAS)'),
        dequant("w4-dequant"),
        quant_rows("w4a8-quant-act"),
        w4a8("w4a8-gemm", M_PREFILL),
        w4a8("w4a8-gemm-m32", 32),
    ]
    for bq, bk, warps, stages in INT8_TILE_SWEEP[1:]:  # [0] is attn-int8
        out.append(
            int8_attention(
                f"tune-{bq}x{bk}-w{warps}-s{stages}",
                block_q=bq,
                block_k=bk,
                num_warps=warps,
                num_stages=stages,
                note="benchmarks/attention.py sweep",
            )
        )
    return out


def check(v: KernelVariant, target: int) -> dict[str, Any]:
    """Compile one variant for one target; the row for the table and JSON (problems listed in "problems")."""
    row: dict[str, Any] = dict(variant=v.name, cc=target, target=f"sm_{target}", expect_mma=list(v.mma), note=v.note)
    t0 = time.perf_counter()
    try:
        info = aot.compile_kernel(v.kernel(), v.args, v.grid, target, **v.kwargs)
    except Exception as exc:
        row.update(error=f"{type(exc).__name__}: {exc}"[-2000:], problems=["does not compile"])
        traceback.print_exc()
        return row
    row.update(asdict(info), compile_s=round(time.perf_counter() - t0, 2), shared_limit=aot.SHARED_LIMIT[target])
    problems = []
    if info.shared > aot.SHARED_LIMIT[target]:
        problems.append(f"shared {info.shared} B > {aot.SHARED_LIMIT[target]} B")
    if info.spill_stores or info.spill_loads:
        problems.append(f"spills {info.spill_stores} B stores / {info.spill_loads} B loads")
    for t in v.mma:
        if not any(kind.split()[1].split("x")[0] == t for kind in info.mma):
            problems.append(f"no {t} tensor-core MMA (found {info.mma or 'none'})")
    row["problems"] = problems
    return row


def fmt(row: dict[str, Any]) -> str:
    t = row["target"]
    if "error" in row:
        return f"| {row['variant']} | {t} | | | | | | FAILS TO COMPILE: {row['error'].strip().splitlines()[-1][:160]} |"
    shared = f"{row['shared'] / 1024:.1f} / {row['shared_limit'] // 1024}"
    spill = f"{row['spill_stores']}/{row['spill_loads']}"
    status = "ok" if not row["problems"] else "; ".join(row["problems"])
    cfg = f"w{row['num_warps']} s{row['num_stages']}"
    return (
        f"| {row['variant']} | {t} | {cfg} | {shared} | {row['registers']} | {spill} | "
        f"{', '.join(row['mma']) or '-'} | {status} |"
    )


HEADER = (
    "| variant | target | warps, stages | shared KiB / limit | regs/thread | spill B st/ld | MMA instructions | check |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", help="comma-separated variant names (default: all)")
    p.add_argument("--targets", default=",".join(map(str, ALL_TARGETS)), help="compute capabilities, e.g. 80,90")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    missing = [t for t in targets if aot.ptxas(t) is None]
    if missing:
        print(f"Triton's ptxas is missing for {missing}: cannot compile for NVIDIA targets here", file=sys.stderr)
        return 2
    chosen = variants()
    jobs = [(v, t) for v in chosen for t in targets if t in v.targets]
    if args.only:
        known = {v.name: v for v in chosen}
        jobs = []
        for item in args.only.split(","):
            name, _, cc = item.partition("@")
            if name not in known:
                p.error(f"unknown variant {name!r}; known: {sorted(known)}")
            v = known[name]
            wanted = [int(cc)] if cc else [t for t in targets if t in v.targets]
            if any(t not in v.targets for t in wanted):
                p.error(f"{name} does not run on sm_{cc} (it is for {[f'sm_{t}' for t in v.targets]})")
            jobs += [(v, t) for t in wanted]
    import triton

    print(f"Triton {triton.__version__}, ahead-of-time compile (no GPU); B={B}, H={H}, N={N}, d={D}")
    print(HEADER)
    rows = []
    for v, target in jobs:
        rows.append(check(v, target))
        print(fmt(rows[-1]), flush=True)
    if args.json:
        claimed = {v.name: list(v.targets) for v in chosen}  # which targets each variant is meant for
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(triton=triton.__version__, claimed=claimed, rows=rows), indent=1))
    bad = [r for r in rows if r["problems"]]
    print(f"{len(rows)} compiles, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
