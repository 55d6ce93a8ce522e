"""`accel demo` / `accel bench` (accel.cli) and the side-by-side harness behind them (accel.bench.harness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import accel
from accel import zoo
from accel.bench.harness import Variant, compare
from accel.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_flux_llava(tmp_path, capsys):
    path = tmp_path / "demo.json"
    argv = ["demo", "--families", "flux,llava", "--repeats", "1", "--steps", "6", "--quiet", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT MODELS" in out and "not image or text quality" in out and "benchmarks/" in out
    assert "fidelity vs baseline" in out  # the table header
    table = [line.split() for line in out.splitlines()]
    assert [r[:2] for r in table if r and r[0] in ("flux", "llava")] == [
        [f, v] for f in ("flux", "llava") for v in ("baseline", "lossless", "balanced", "fast")
    ]

    data = json.loads(path.read_text())
    assert data["machine"]["cpu_count"] == os.cpu_count() and data["machine"]["device"] == "cpu"
    assert "torch" in data["machine"] and "Tiny random-weight" in data["warning"]
    rows = {(r["family"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(f, v) for f in ("flux", "llava") for v in ("baseline", "lossless", "balanced", "fast")}
    assert all(r["error"] is None and r["median_s"] > 0 for r in rows.values())
    assert rows["flux", "baseline"]["speedup"] == 1.0
    assert rows["flux", "lossless"]["psnr"] == "inf" and rows["flux", "lossless"]["ssim"] == 1.0
    assert rows["flux", "fast"]["applied"] and rows["flux", "fast"]["reused"] > 0
    assert rows["flux", "fast"]["computed"] + rows["flux", "fast"]["reused"] == 2 * 6  # true CFG: 2 branches
    for variant in ("lossless", "balanced", "fast"):  # no accelerator for VLMs: outputs identical
        llava = rows["llava", variant]
        assert llava["token_agreement"] == 1.0 and llava["first_token_kl"] == 0.0 and not llava["applied"]
        assert llava["psnr"] is None


def test_bench_one_family(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--family", "sd3", "--preset", "fast", "--steps", "4", "--repeats", "2", "--warmup", "0"]
    assert main(argv + ["--quiet", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT MODELS" in out and "peak memory" in out
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "fast"]
    assert len(rows[1]["times_s"]) == 2 and rows[1]["computed"] + rows[1]["reused"] == 4


def test_unknown_family_errors_clearly(capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--families", "flux,bogus", "--quiet"])
    assert err.value.code != 0 and "bogus" in str(err.value.code) and "qwen2_5_vl" in str(err.value.code)
    with pytest.raises(ValueError, match="choose one of: flux, sd3"):
        zoo.build("bogus")


def test_python_dash_m_accel_exits_nonzero_on_unknown_family():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "accel", "bench", "--family", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown family 'nope'" in proc.stderr and "flux" in proc.stderr and "llava" in proc.stderr


def test_compare_always_unpatches_and_records_errors():
    tiny = zoo.build("sd3")
    calls = []

    def run(seed):
        calls.append(accel.get_handle(tiny.obj))
        if len(calls) == 3:  # the first patched call
            raise RuntimeError("boom")
        return tiny.run(seed, num_inference_steps=3)

    rows = compare(tiny.obj, run, [Variant("bad", {"preset": "fast"}), Variant("typo", {"preset": "nope"}), "lossless"],
                   repeats=1, warmup=1, progress=False)
    assert [r.variant for r in rows] == ["baseline", "bad", "typo", "lossless"]
    assert rows[1].error == "RuntimeError: boom" and "unknown preset" in rows[2].error
    assert rows[3].error is None and rows[3].psnr == float("inf")
    assert calls[2] is not None and accel.get_handle(tiny.obj) is None  # patched during the run, unpatched after
    assert json.dumps([r.to_dict() for r in rows])


def test_bench_vlm_pruning_table(tmp_path, capsys):
    path = tmp_path / "prune.json"
    argv = ["bench", "--family", "qwen2_vl", "--keep", "8,3", "--video", "--steps", "4", "--repeats", "1",
            "--warmup", "0", "--quiet", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT MODELS" in out and "qwen2_vl (video), pruning before_lm, 4 new tokens" in out
    for column in ("visual kept/in", "seq to LM", "prefill", "TTFT", "decode", "peak memory", "first-token KL"):
        assert column in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("baseline", "keep="))}
    assert table["baseline"][1] == "all" and table["keep=8"][1] == "8/8" and table["keep=3"][1] == "3/8"
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "keep=8", "keep=3"]
    assert rows[1]["first_token_kl"] == 0.0 and rows[1]["token_agreement"] == 1.0  # keeps all 8 video tokens
    assert rows[2]["sequence_to_lm"] == rows[0]["sequence_to_lm"] - 5
    assert all(r["prefill_s"] > 0 and r["ttft_s"] > 0 and r["peak_memory_bytes"] for r in rows)


def test_bench_keep_needs_a_vlm_family():
    with pytest.raises(SystemExit, match="needs a VLM family .*llava.*not 'flux'"):
        main(["bench", "--family", "flux", "--keep", "4", "--quiet"])
    with pytest.raises(SystemExit, match="--keep works with --family"):
        main(["bench", "--pipeline", "x:y", "--keep", "4", "--quiet"])
    with pytest.raises(SystemExit, match="positive integers"):
        main(["bench", "--family", "llava", "--keep", "0", "--quiet"])


def test_bench_attention_routes(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--family", "wan", "--preset", "lossless", "--attention", "sdpa,int8", "--repeats", "1",
            "--warmup", "0", "--quiet", "--json", str(path)]
    assert main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"baseline", "lossless", "attn-sdpa", "attn-int8"}
    assert rows["attn-sdpa"]["psnr"] == "inf"  # rerouting through SDPA changes no bit
    assert rows["attn-int8"]["psnr"] != "inf" and rows["attn-int8"]["psnr"] > 50
    with pytest.raises(SystemExit, match="attention route"):
        main(["bench", "--family", "wan", "--attention", "int4"])
