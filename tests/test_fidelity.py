"""The fidelity benchmark (accel.bench.fidelity), reduced: ref-wan with random weights, one prompt, 6 steps, a few
methods, and one method that breaks on purpose. The full run is `python benchmarks/fidelity.py`."""

from __future__ import annotations

import json

import pytest
import torch

from accel.bench import fidelity
from accel.bench.fidelity import markdown, pipeline_for, plot, run_fidelity
from accel.bench.fidelity_methods import Method, all_methods, select
from accel.cli import main
from accel.errors import AccelError

STEPS = 6
PASSES = 2 * STEPS  # CFG: a cond and an uncond call per step
CHOSEN = [
    "baseline",
    "accel thr 0.3",
    "diffusers FBC 0.2",
    "diffusers MagCache 0.06",
    "diffusers FasterCache CFG",
    "cache-dit DBCache+TS 0.2",
]


def _broken(pipe, setup):
    """Installs a hook that changes every output, then fails before it can return its undo."""
    pipe.transformer.register_forward_hook(lambda module, args, out: (out[0] * 2,))
    raise RuntimeError("boom")


BROKEN = Method("broken", "test", _broken)


@pytest.fixture(scope="module")
def result():
    methods = {m.name: m for m in all_methods()}
    chosen = [BROKEN] + [methods[name] for name in CHOSEN]
    return run_fidelity(models=("ref-wan",), seeds=1, steps=STEPS, methods=chosen, weights="random", progress=False)


@pytest.fixture(scope="module")
def rows(result):
    return {r["method"]: r for r in result["rows"]}


def test_every_method_has_a_row_in_the_json_and_the_table(result, rows):
    assert list(rows) == ["broken", *CHOSEN]
    json.dumps(result, allow_nan=False)  # plain JSON: no inf/nan, no tensors
    table = markdown(result)
    assert "RANDOM weights" in table and f"{PASSES} transformer passes" in table
    for name in rows:
        assert f"| {name} |" in table


def test_the_baseline_against_itself_is_identical_with_every_pass_computed(rows):
    base = rows["baseline"]
    assert base["status"] == "ok" and base["weights"] == "random"
    assert base["passes"] == PASSES and base["computed"] == PASSES and base["attention_computed"] == 1.0
    assert base["psnr_db"] is None and base["psnr_db_per_seed"] == [None] and base["ssim"] == pytest.approx(1.0)
    assert 0.0 <= base["prompt_score"] <= 1.0 and base["cpu_s_per_run"] > 0


def test_caches_compute_fewer_passes_and_stay_close(rows):
    accel_row = rows["accel thr 0.3"]
    assert accel_row["status"] == "ok" and accel_row["counted_by"] == "accel"
    assert accel_row["computed"] < PASSES and accel_row["attention_computed"] < 1.0
    assert not [n for n in accel_row["notes"] if "report says" in n]  # accel's report agrees with the probe
    assert accel_row["psnr_db"] is not None and accel_row["psnr_db"] > 20 and 0 < accel_row["ssim"] <= 1
    for name in ("diffusers FBC 0.2", "diffusers MagCache 0.06"):
        assert rows[name]["status"] == "ok" and rows[name]["computed"] <= PASSES, rows[name]


def test_magcache_is_calibrated_once_for_the_step_count(rows):
    assert rows["diffusers MagCache 0.06"]["settings"].endswith("calibrated")
    # the calibration run is not an evaluation prompt: the row still has exactly one generation per seed
    assert len(rows["diffusers MagCache 0.06"]["computed_per_seed"]) == 1


def test_a_failing_method_is_a_row_and_leaves_nothing_behind(rows):
    broken = rows["broken"]
    assert broken["status"] == "unsupported: RuntimeError: boom" and "psnr_db" not in broken
    assert any("rebuilt" in n for n in broken["notes"])
    # the hook it left on the transformer died with the rebuilt pipeline: the baseline after it is still identical
    assert rows["baseline"]["psnr_db"] is None
    faster = rows["diffusers FasterCache CFG"]  # CFG as two calls: diffusers' FasterCache raises on these pipelines
    assert faster["status"] == "ok" or faster["status"].startswith("unsupported: ")
    assert "batched" in faster["note"]
    cache_dit = rows["cache-dit DBCache+TS 0.2"]  # an unsupported row names why (not installed) when it cannot run
    assert cache_dit["status"] == "ok" or "cache-dit" in cache_dit["status"], cache_dit["status"]


def test_removing_each_method_restores_the_pipeline():
    methods = select(all_methods(), ["baseline", "accel thr 0.3", "diffusers FBC 0.2"])
    result = run_fidelity(models=("ref-wan",), seeds=1, steps=4, methods=methods, weights="random", check_undo=True)
    assert [r["undo_restores"] for r in result["rows"]] == [True, True, True]


def test_plot_is_a_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot(result, str(tmp_path / "fidelity.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_ladder_covers_every_peer_and_selection_names_the_families():
    methods = all_methods()
    assert len({m.name for m in methods}) == len(methods)
    families = {m.family for m in methods}
    for family in ("accel preset", "accel threshold", "accel target", "accel sparse", "accel sparse+cache"):
        assert family in families
    for peer in ("FBC", "TaylorSeer", "MagCache", "FasterCache", "PAB"):
        assert f"diffusers {peer}" in families
    assert {"cache-dit DBCache", "cache-dit DBCache+TaylorSeer"} <= families
    assert [m.name for m in select(methods, ["diffusers PAB"])] == ["diffusers PAB 2", "diffusers PAB 3"]
    with pytest.raises(AccelError, match="unknown method or family.*families: baseline, accel preset"):
        select(methods, ["nope"])


def test_random_weights_are_announced(monkeypatch, tmp_path):
    monkeypatch.setattr(fidelity.references, "WEIGHTS", tmp_path)  # no trained weights there
    with pytest.warns(UserWarning, match="RANDOM weights"):
        pipe, weights = pipeline_for("ref-wan")
    assert weights == "random" and isinstance(pipe.transformer, torch.nn.Module)
    with pytest.raises(AccelError, match="weights='best'"):
        pipeline_for("ref-wan", "best")


def test_cli_suite_fidelity(tmp_path, capsys):
    path = tmp_path / "fidelity.json"
    argv = ["bench", "--suite", "fidelity", "--models", "ref-wan", "--seeds", "1", "--steps", "3", "--quiet"]
    argv += ["--methods", "baseline,accel threshold", "--weights", "random", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| accel thr 0.3 | accel threshold |" in out and "RANDOM weights" in out
    doc = json.loads(path.read_text())
    assert doc["suite"] == "fidelity" and len(doc["rows"]) == 5 and doc["settings"]["steps"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--suite", "fidelity", "--models", "ref-sd"], "unknown reference model 'ref-sd'"),
        (["bench", "--suite", "fidelity", "--methods", "teacache"], "unknown method or family 'teacache'"),
        (["bench", "--suite", "fidelity", "--seeds", "0"], "--seeds must be >= 1"),
        (["bench", "--suite", "fidelity", "--family", "flux"], "drop --family/--pipeline/--attention"),
        (["bench", "--family", "flux", "--seeds", "2"], "--seeds: only with --suite fidelity"),
    ],
)
def test_cli_fidelity_mistakes_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accel: error: ") and message in err and "\n" not in err
