"""Every Triton kernel family in accel compiles for the GPUs we target, ahead of time, without a GPU.

One subprocess (TRITON_INTERPRET unset, fresh Triton cache) runs benchmarks/compile_report.py on the variants
that matter, at the wrappers' GPU launch configs; this checks its JSON: each compiles, fits the target's
shared memory, spills no registers, and runs INT8 / FP8 / 16-bit products on the tensor cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# variant@compute capability: the defaults of each wrapper on A100 (80), L40/RTX 4090 (89), H100 (90), plus the
# variants closest to a limit (attn-int8-token: most registers on sm_89; sparse-bf16: 96 of 99 KiB on sm_89;
# attn-fp8pv-token-bias and w4a16-m64-awq: 254-255 registers).
JOBS = [
    "attn-int8@80",
    "attn-int8@90",
    "attn-int8-token@89",
    "attn-int8-causal@90",
    "attn-fp8pv@89",
    "attn-fp8pv@90",
    "attn-fp8pv-token-bias@90",
    "quant-int8-token@90",
    "sparse-bf16@89",
    "sparse-int8@80",
    "sparse-int8@90",
    "sparse-int8-remainder@89",
    "sparse-int8-remainder@90",
    "sparse-bf16-remainder@89",
    "w4a16-m64-awq@80",
    "w4a16-m64-awq@90",
    "w4-dequant@90",
    "w4a8-quant-act@90",
    "w4a8-gemm@80",
    "w4a8-gemm@90",
]
SHARED_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per block, CUDA programming guide


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    from accel._triton_aot import ptxas

    missing = [cc for cc in SHARED_LIMIT if ptxas(cc) is None]
    if missing:
        pytest.skip(f"Triton's bundled ptxas is missing for sm_{missing}: cannot compile for NVIDIA GPUs here")
    tmp = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    out = tmp / "compile.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compile_report.py"), "--only", ",".join(JOBS), "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    doc["stdout"] = proc.stdout
    return doc


def _rows(report):
    return {f"{r['variant']}@{r['cc']}": r for r in report["rows"]}


def test_every_job_compiled_within_limits(report):
    rows = _rows(report)
    assert sorted(rows) == sorted(JOBS)
    for job, r in rows.items():
        assert "error" not in r, f"{job} does not compile:\n{r['error']}"
        assert r["cubin_bytes"] > 0, job
        assert 0 < r["shared"] <= SHARED_LIMIT[r["cc"]], (job, r["shared"])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (job, r["spill_stores"], r["spill_loads"])
        assert r["registers"] <= 255, job
        assert r["problems"] == [], (job, r["problems"])
    assert "0 with problems" in report["stdout"]


def test_tensor_core_instructions(report):
    rows = _rows(report)
    for job, r in rows.items():
        ops = {kind.split()[1] for kind in r["mma"]}
        assert set(r["expect_mma"]) <= ops, (job, r["mma"])
    # INT8 Q·Kᵀ on INT8 tensor cores everywhere; Triton 3.9 picks Hopper's warpgroup MMA on sm_90.
    assert "mma s8" in rows["attn-int8@80"]["mma"] and "wgmma s8" in rows["attn-int8@90"]["mma"]
    assert "wgmma s8" in rows["w4a8-gemm@90"]["mma"] and "mma s8" in rows["w4a8-gemm@80"]["mma"]
    # FP8 P·V on FP8 tensor cores: mma on Ada, wgmma on Hopper.
    assert rows["attn-fp8pv@89"]["mma"] == ["mma e4m3", "mma s8"]
    assert rows["attn-fp8pv@90"]["mma"] == ["wgmma e4m3", "wgmma s8"]
    # Elementwise kernels use no tensor cores.
    assert rows["w4-dequant@90"]["mma"] == [] and rows["quant-int8-token@90"]["mma"] == []


def test_fp8_pv_is_not_claimed_for_sm80(report):
    # int8_attention(pv="fp8") raises on compute capability < 8.9, so the report must not list sm_80 for it.
    for name, targets in report["claimed"].items():
        assert (80 in targets) == ("fp8" not in name), (name, targets)
    assert {89, 90} <= set(report["claimed"]["attn-fp8pv"])
