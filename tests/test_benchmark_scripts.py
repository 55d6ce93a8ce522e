"""The GPU benchmark scripts under benchmarks/ run end to end in their --tiny (CPU) mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tiny(script: str, tmp_path: Path, *args: str, timeout: int = 180) -> tuple[dict, str]:
    """Run benchmarks/<script> with `args` (including --tiny) as a user would; return its JSON and stdout."""
    out = tmp_path / f"{script}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_caching_benchmark_tiny_flux(tmp_path: Path) -> None:
    doc, stdout = run_tiny("caching.py", tmp_path, "--tiny", "--repeats", "1", "--scenario", "flux")
    assert doc["tiny"] is True
    assert set(doc["scenarios"]) == {"flux"}
    scenario = doc["scenarios"]["flux"]
    rows = scenario["rows"]
    kinds = {row["kind"] for row in rows}
    assert {"baseline", "accel", "diffusers-fbc"} <= kinds, kinds
    passes = scenario["passes_per_run"]
    assert passes == 28  # FLUX.1-dev default: 28 steps, one call per step

    baseline = rows[0]
    assert baseline["kind"] == "baseline" and baseline["speedup"] == 1.0
    assert baseline["computed"] == passes and baseline["reused"] == 0 and baseline["identical"]
    for row in rows:
        assert row["median_s"] > 0 and len(row["times_s"]) == 1
        assert row["computed"] + row["reused"] == passes, row["name"]
        assert row["finite"], row["name"]
        assert not row["notes"], (row["name"], row["notes"])  # one accel call per run, report == probe count
    for row in (r for r in rows if r["kind"] == "accel"):
        assert row["accel_report"]["calls_recorded"] == 2  # warm-up + 1 timed run, each its own call
    rerun = [r for r in rows if r["kind"] == "baseline-rerun"]
    assert rerun and rerun[0]["identical"]  # disable_cache() / accel.unpatch left the model as it was
    assert "baseline" in stdout and "accel balanced" in stdout and "diffusers FBC" in stdout


def test_sparse_attention_benchmark_tiny(tmp_path: Path) -> None:
    doc, stdout = run_tiny("sparse_attention.py", tmp_path, "--tiny", "--repeats", "1")
    assert doc["tiny"] is True and set(doc["scenarios"]) == {"wan", "hunyuan", "wan-step"}
    for key in ("wan", "hunyuan"):
        scenario = doc["scenarios"][key]
        names = [row["name"] for row in scenario["rows"]]
        assert names[:2] == ["dense SDPA", "dense INT8 (accel)"]
        assert {"sparse 50%", "sparse 75% + INT8", "sparse 90%"} <= set(names)
        for row in scenario["rows"]:
            assert row["median_s"] > 0 and len(row["times_s"]) == 1
        sparsities = [row["sparsity"] for row in scenario["rows"] if row["sparsity"] is not None]
        assert sparsities == sorted(sparsities) and sparsities[0] == 0.5  # exact share of blocks skipped
        assert {s["method"] for s in scenario["search"]} == {"antidiagonal", "pooled", "exact"}
        assert all(s["amortised_share"] < s["share_of_dense_call"] for s in scenario["search"])
    step = doc["scenarios"]["wan-step"]["rows"]
    assert [r["name"] for r in step] == ["dense", "sparse target 0.95", "sparse target 0.8"]
    assert all(r["rel_l1"] < 0.1 and 0.0 <= r["mean_sparsity"] <= 1.0 for r in step[1:])
    assert "dense SDPA" in stdout and "search antidiagonal" in stdout


def test_attention_benchmark_tiny(tmp_path: Path) -> None:
    """benchmarks/attention.py --tiny: every variant runs (Triton interpreter), accuracy is filled in, the
    tuning sweep ran, and the end-to-end Wan step produced either a timing or a recorded error."""
    doc, stdout = run_tiny(
        "attention.py", tmp_path, "--tiny", "--shapes", "vlm", "--repeats", "1", "--warmup", "0", "--e2e", timeout=300
    )
    assert doc["tiny"] is True and set(doc["shapes"]) == {"vlm"}  # causal; non-causal: tests/test_attention_int8.py
    assert doc["shapes"]["vlm"]["causal"] and doc["shapes"]["vlm"]["flops"] == 4.0 * 48 * 48 * 128 * 2 / 2  # halved: causal
    for shape in doc["shapes"].values():
        rows = {r["variant"]: r for r in shape["rows"]}
        assert {"sdpa", "int8", "int8-token", "int8-fp8pv"} <= set(rows), set(rows)
        for r in rows.values():
            assert "error" not in r and r["median_s"] > 0 and r["tflops"] > 0, r
            assert r["cos"] >= (0.998 if r["variant"] == "int8-fp8pv" else 0.9995), r
        assert len(rows["int8"]["tuning"]) == 2 and rows["int8"]["config"]["block_q"] in (16, 32)
    e2e = doc["e2e_wan"]
    assert e2e["sdpa"]["median_s"] > 0 and ("median_s" in e2e["int8"] or "error" in e2e["int8"])
    assert "int8-token" in stdout and "TFLOP/s" in stdout


def test_quant_benchmark_tiny(tmp_path: Path) -> None:
    doc, stdout = run_tiny("quant.py", tmp_path, "--tiny", "--repeats", "1", "--warmup", "0")
    assert doc["tiny"] is True and doc["gemm"] and set(doc["models"]) == {"flux", "wan"}
    for row in doc["gemm"]:
        for name in ("accel auto", "accel triton", "accel dequant", "accel w4a8", "accel auto int8"):
            assert row["variants"][name]["s"] > 0 and row["variants"][name]["rel_err"] < 0.1, (name, row)
    for entry in doc["models"].values():
        assert entry["memory_ratio"] > 1.5 and entry["w4"]["rel_err_vs_bf16"] < 0.1
        assert entry["w4a8"]["rel_err_vs_bf16"] < 0.1
        assert entry["quant_stats"]["layers quantized"] > 0


def test_pruning_benchmark_tiny(tmp_path: Path) -> None:
    doc, stdout = run_tiny("pruning.py", tmp_path, "--tiny", "--repeats", "1")
    assert doc["tiny"] is True
    assert set(doc["scenarios"]) == {"llava", "qwen2_vl_image", "qwen2_vl_video"}
    for name, scenario in doc["scenarios"].items():
        rows = scenario["rows"]
        assert [r["variant"] for r in rows] == ["baseline", "keep 3", "keep 2", "in_lm keep 2 (layer 1)"]
        base = rows[0]
        assert base["sequence_to_lm"] == scenario["prompt_tokens"] and base["token_agreement"] == 1.0
        for row in rows:
            for key in ("prefill_s", "ttft_s", "first_token_kl", "token_agreement", "peak_memory_bytes"):
                assert row[key] is not None, (name, row["variant"], key)
            assert "decode_tokens_per_s" in row  # None when CPU noise makes generate(4) no slower than generate(1)
        for row in rows[1:]:
            kept = int(row["variant"].split()[-1] if "in_lm" not in row["variant"] else row["variant"].split()[2])
            assert row["visual_tokens_kept"] == kept < row["visual_tokens_in"], (name, row)
            assert row["sequence_to_lm"] < base["sequence_to_lm"]
            assert row["report"]["calls (prefills with visual tokens)"] >= 3  # prefill, TTFT and full runs
    assert "prefill ms" in stdout
