"""The `accel` command (accel.cli: demo, bench, bench-vlm, eval) and the side-by-side harness behind it
(accel.bench.harness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import accel
from accel import zoo
from accel.bench.harness import Variant, compare
from accel.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def usage_error(capsys, argv: list[str]) -> str:
    """The one `accel: error: ...` line that main(argv) prints on stderr before exiting with status 2."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accel: error: "), lines
    return lines[0]


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
    lossless = rows["llava", "lossless"]  # changes nothing on a VLM
    assert lossless["token_agreement"] == 1.0 and lossless["first_token_kl"] == 0.0 and not lossless["applied"]
    for variant in ("balanced", "fast"):  # these prune visual tokens
        applied = rows["llava", variant]["applied"]
        assert applied[0].startswith("prune: keep") and rows["llava", variant]["psnr"] is None


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
    line = usage_error(capsys, ["demo", "--families", "flux,bogus", "--quiet"])
    assert "bogus" in line and "qwen2_5_vl" in line
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
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown family 'nope'" in proc.stderr and "flux" in proc.stderr and "llava" in proc.stderr


def test_compare_always_unpatches_and_records_errors():
    tiny = zoo.build("sd3")
    calls = []

    def run(seed):
        calls.append(accel.get_handle(tiny.obj))
        if len(calls) == 3:  # the first patched call
            raise RuntimeError("boom")
        return tiny.run(seed, num_inference_steps=3)

    rows = compare(
        tiny.obj,
        run,
        [Variant("bad", {"preset": "fast"}), Variant("typo", {"preset": "nope"}), "lossless"],
        repeats=1,
        warmup=1,
        progress=False,
    )
    assert [r.variant for r in rows] == ["baseline", "bad", "typo", "lossless"]
    assert rows[1].error == "RuntimeError: boom" and "unknown preset" in rows[2].error
    assert rows[3].error is None and rows[3].psnr == float("inf")
    assert calls[2] is not None and accel.get_handle(tiny.obj) is None  # patched during the run, unpatched after
    assert json.dumps([r.to_dict() for r in rows])


def test_bench_vlm_pruning_table(tmp_path, capsys):
    path = tmp_path / "prune.json"
    argv = [
        "bench-vlm",
        "--family",
        "qwen2_vl",
        "--keep",
        "8,3",
        "--video",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--quiet",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT MODELS" in out and "qwen2_vl (video), pruning before_lm, 4 new tokens" in out
    for column in ("visual kept/in", "seq to LM", "prefill", "TTFT", "decode", "peak memory", "first-token KL"):
        assert column in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("baseline", "keep="))}
    assert table["baseline"][1] == "all" and table["keep=8"][1] == "8/8" and table["keep=3"][1] == "3/8"
    data = json.loads(path.read_text())
    assert data["command"] == "bench-vlm" and data["settings"]["keep"] == "8,3"
    rows = data["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "keep=8", "keep=3"] and rows[0]["steps"] == 4
    assert rows[1]["first_token_kl"] == 0.0 and rows[1]["token_agreement"] == 1.0  # keeps all 8 video tokens
    assert rows[2]["sequence_to_lm"] == rows[0]["sequence_to_lm"] - 5
    assert all(r["prefill_s"] > 0 and r["ttft_s"] > 0 and r["peak_memory_bytes"] for r in rows)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench-vlm", "--family", "flux", "--keep", "4"], "needs a VLM family (llava, "),
        (["bench-vlm", "--family", "llava", "--keep", "0"], "--keep takes positive integers, got '0'"),
        (["bench-vlm", "--family", "llava", "--keep", "4,x"], "--keep takes comma-separated integers"),
        (["bench-vlm", "--family", "llava", "--keep", "4", "--new-tokens", "0"], "--new-tokens must be >= 1"),
        (["bench-vlm", "--family", "nope", "--keep", "4"], "unknown family 'nope'"),
        # the pruning flags that `accel bench` had point to the command that has them now
        (
            ["bench", "--family", "llava", "--keep", "4"],
            "--keep: visual token pruning has its own command now: accel bench-vlm",
        ),
        (["bench", "--family", "llava", "--video", "--prune-where", "in_lm"], "--video, --prune-where: visual token"),
    ],
)
def test_bench_vlm_mistakes_are_one_line_errors(capsys, argv, message):
    assert message in usage_error(capsys, argv + ["--quiet"])
    assert capsys.readouterr().out == ""  # nothing ran


@pytest.mark.parametrize(
    "argv",
    [
        ["bench-vlm", "--family", "llava", "--keep", "4", "--attention", "int8"],
        ["bench-vlm", "--family", "llava", "--keep", "4", "--preset", "fast"],
        ["bench-vlm", "--family", "llava"],
    ],
)
def test_bench_vlm_refuses_flags_that_do_not_apply(capsys, argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "bench", "bench-vlm", "eval"):
        assert f"    {command} " in text, command


def test_bench_attention_routes(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = [
        "bench",
        "--family",
        "wan",
        "--preset",
        "lossless",
        "--attention",
        "sdpa,int8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--quiet",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"baseline", "lossless", "attn-sdpa", "attn-int8"}
    assert rows["attn-sdpa"]["psnr"] == "inf"  # rerouting through SDPA changes no bit
    assert rows["attn-int8"]["psnr"] != "inf" and rows["attn-int8"]["psnr"] > 50
    with pytest.raises(SystemExit, match="attention route"):
        main(["bench", "--family", "wan", "--attention", "int4"])


# ---- user mistakes: one line on stderr, exit status 2, no traceback, before any work

USER_PIPELINES = """
import torch

def returns_a_number():
    return 5

def returns_three():
    return 1, 2, 3

def returns_an_unpatchable_object():
    return object(), lambda seed: torch.zeros(1, 3, 4, 4)

def run_returns_text():
    return torch.nn.Linear(2, 2), lambda seed: "an image"
"""


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["bench", "--family", "sd3", "--steps", "-3"], "--steps must be >= 1, got -3"),
        (["bench", "--family", "sd3", "--repeats", "0"], "--repeats must be >= 1"),
        (["bench", "--family", "sd3", "--warmup", "-1"], "--warmup must be >= 0"),
        (["demo", "--json", "{tmp}/no/such/folder/demo.json"], "folder '{tmp}/no/such/folder' does not exist"),
        (["bench", "--family", "sd3", "--json", "{tmp}"], "is a folder; give a file name"),
        (["bench", "--pipeline", "accel_no_such_module:make"], "no module named 'accel_no_such_module'"),
        (["bench", "--pipeline", "json:no_such_function"], "'json' has no 'no_such_function'"),
        (["bench", "--pipeline", "json:__name__"], "'__name__' is a str, not a function"),
        (["bench", "--pipeline", "make"], "takes MODULE:FUNCTION or path/to/file.py:FUNCTION"),
        (["bench", "--pipeline", "{tmp}/missing.py:make"], "no such file"),
        (["bench", "--pipeline", "{tmp}/needs_dep.py:make"], "importing '{tmp}/needs_dep.py' failed: No module named"),
        (
            ["bench", "--pipeline", "{tmp}/pipes.py:returns_a_number"],
            "must return (obj, run_fn) with run_fn(seed) callable, got int",
        ),
        (["bench", "--pipeline", "{tmp}/pipes.py:returns_three"], "got a tuple of 3"),
        (["bench", "--pipeline", "{tmp}/pipes.py:returns_an_unpatchable_object"], "accel.patch takes a diffusers"),
        (["bench", "--pipeline", "{tmp}/pipes.py:run_returns_text"], "cannot compare outputs of type str"),
        (["bench", "--pipeline", "{tmp}/pipes.py:returns_three", "--steps", "4"], "with --pipeline, your run_fn"),
        (["bench", "--pipeline", "{tmp}/pipes.py:run_returns_text", "--device", "cdua"], "not a torch device"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "pipes.py").write_text(USER_PIPELINES)
    (tmp_path / "needs_dep.py").write_text("import accel_no_such_dependency\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--quiet"]
    assert message.replace("{tmp}", str(tmp_path)) in usage_error(capsys, argv)
    assert capsys.readouterr().out == ""  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_refused_before_the_users_function_runs(capsys):
    line = usage_error(capsys, ["bench", "--pipeline", "json:dumps", "--device", "cuda"])
    assert "no CUDA GPU is visible here" in line


def test_demo_json_folder_is_checked_before_the_run(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("ran before checking --json")

    monkeypatch.setattr("accel.bench.family.bench_family", never)
    line = usage_error(capsys, ["demo", "--families", "sd3", "--json", str(tmp_path / "gone" / "demo.json")])
    assert "does not exist; create it first" in line


RUNNERS = """
def number(model, processor, tasks, limit):
    return 5

def missing_task(model, processor, tasks, limit):
    return {"a": {"score": 1.0}}

def text_metric(model, processor, tasks, limit):
    return {t: {"score": "high"} for t in tasks}
"""


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--json", "{tmp}/no/eval.json"], "does not exist"),
        (["--markdown", "{tmp}/no/eval.md"], "does not exist"),
        (["--include-path", "{tmp}/no_tasks"], "--include-path '{tmp}/no_tasks' is not a folder"),
        (["--runner", "accel_no_such_module:run"], "no module named 'accel_no_such_module'"),
        (["--dtype", "float33"], "--dtype 'float33' is not a torch dtype"),
        (["--device", "cdua"], "not a torch device"),
        (["--model", "{tmp}"], "cannot load --model '{tmp}'"),
    ],
)
def test_eval_mistakes_are_one_line_errors(tmp_path, capsys, extra, message):
    argv = [
        "eval",
        "--model",
        str(tmp_path),
        "--tasks",
        "a,b",
        "--keep",
        "4",
        "--device",
        "cpu",
        "--runner",
        "json:dumps",
        "--json",
        str(tmp_path / "eval.json"),
    ]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert message.replace("{tmp}", str(tmp_path)) in usage_error(capsys, argv)


@pytest.mark.parametrize(
    "runner,message",
    [
        ("number", "must return {task: {metric: value}}, got int"),
        ("missing_task", "returned no metrics for task 'b' (got None)"),
        ("text_metric", "metrics of task 'a' must be numbers, got {'score': 'high'}"),
    ],
)
def test_eval_runner_returning_the_wrong_shape_is_a_usage_error(tmp_path, capsys, monkeypatch, runner, message):
    from accel.bench import evaluate

    monkeypatch.setattr(evaluate, "load_model", lambda *args, **kwargs: (torch.nn.Linear(1, 1), None))
    (tmp_path / "runners.py").write_text(RUNNERS)
    argv = [
        "eval",
        "--model",
        "m",
        "--tasks",
        "a,b",
        "--keep",
        "4",
        "--device",
        "cpu",
        "--runner",
        f"{tmp_path / 'runners.py'}:{runner}",
        "--json",
        str(tmp_path / "eval.json"),
    ]
    assert message in usage_error(capsys, argv)
    assert not (tmp_path / "eval.json").exists()
