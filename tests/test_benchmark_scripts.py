"""The GPU benchmark scripts under benchmarks/ run end to end in their --tiny (CPU) mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_caching_benchmark_tiny_flux(tmp_path: Path) -> None:
    out = tmp_path / "caching.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "caching.py"), "--tiny", "--repeats", "1", "--scenario", "flux",
         "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    doc = json.loads(out.read_text())
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
    assert "baseline" in proc.stdout and "accel balanced" in proc.stdout and "diffusers FBC" in proc.stdout
