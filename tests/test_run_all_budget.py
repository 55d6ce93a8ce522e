"""benchmarks/run_budget.py (behind benchmarks/run_all.sh): the budget, the order, the records, with stand-in items.

The real plan at tiny shapes runs in tests/test_benchmark_scripts.py; here small scripts stand in for the
benchmarks so that skipping, the hard timeout and crash handling are checked in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("run_budget", REPO / "benchmarks" / "run_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_budget"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


rb = _load()

STAND_IN = """
import json, subprocess, sys, time
args = sys.argv[1:]
out = args[args.index("--json") + 1]
if args[0] == "ok":
    json.dump({"value": int(args[1]), "headline": f"value {args[1]}"}, open(out, "w"))
elif args[0] == "crash":
    raise RuntimeError("boom")
elif args[0] == "hang":  # writes part of its result, starts a child, never ends
    json.dump({"partial": True}, open(out, "w"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(args[1], "w").write(str(child.pid))
    time.sleep(300)
"""
ENV = dict(python="3", versions={"torch": "x"}, tiny=False, gpu="stand-in GPU")


def _items(script: Path, pidfile: Path) -> list:
    def item(name, phase, args, estimate):
        return rb.Item(name, phase, f"stand-in {name}", str(script), tuple(args), tuple(args), estimate, estimate)

    return [
        item("first", 1, ["ok", "1"], 1),
        item("crash", 1, ["crash"], 1),
        item("second", 2, ["ok", "2"], 1),
        item("too-big", 2, ["ok", "3"], 1000),
        item("hang", 3, ["hang", str(pidfile)], 1),
        item("after", 3, ["ok", "4"], 1),
    ]


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left for init to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_budget_order_timeout_crash_and_skips(tmp_path: Path) -> None:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    out, pidfile = tmp_path / "out", tmp_path / "child.pid"
    budget = 10.0
    t0 = time.monotonic()
    summary = rb.run_plan(_items(script, pidfile), budget, out, tiny=False, env=ENV)
    wall = time.monotonic() - t0
    assert wall < budget + rb.KILL_GRACE_S + 2, wall  # the hanging item was stopped at the budget

    status = {r["item"]: r["status"] for r in summary["items"]}
    assert status == {
        "first": "ok",
        "crash": "failed",
        "second": "ok",
        "too-big": "skipped",
        "hang": "timeout",
        "after": "skipped",
    }
    notes = {r["item"]: r.get("note", "") for r in summary["items"]}
    assert re.fullmatch(r"skipped: \d+ s left, needs ~1000 s", notes["too-big"]), notes
    assert re.fullmatch(r"skipped: [01] s left, needs ~1 s", notes["after"]), notes  # the hang used the rest

    # one file per item that ran, with the script's JSON; none for skipped items; no temporary files left
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "crash.json",
            "crash.log",
            "first.json",
            "first.log",
            "hang.json",
            "hang.log",
            "second.json",
            "second.log",
            "summary.json",
            "summary.md",
        ]
    ), names
    first = json.loads((out / "first.json").read_text())
    assert first["result"] == {"value": 1, "headline": "value 1"} and first["headline"] == "value 1"
    assert first["exit_code"] == 0
    crash = json.loads((out / "crash.json").read_text())
    assert crash["result"] is None and crash["exit_code"] == 1 and "RuntimeError: boom" in crash["log_tail"]
    hang = json.loads((out / "hang.json").read_text())
    assert hang["result"] == {"partial": True} and hang["exit_code"] is None  # partial result kept
    assert hang["timeout_s"] < budget and "stopped by the budget" in hang["note"]
    assert hang["headline"] == "(no summary line)"  # a partial result has no headline

    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), "the hanging item's child outlived it: the process group was not ended"

    saved = json.loads((out / "summary.json").read_text())
    assert [r["item"] for r in saved["items"]] == [r["item"] for r in summary["items"]]
    assert saved["budget_s"] == budget and saved["elapsed_s"] <= budget + rb.KILL_GRACE_S + 2
    md = (out / "summary.md").read_text()
    assert "| 2 end-to-end step | too-big | skipped |" in md and "needs ~1000 s" in md
    assert "| 1 kernels | first | ok |" in md and "value 1" in md


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    for argv, message in (
        ([], "--budget SECONDS is required"),
        (["--budget", "0"], "positive number"),
        (["--budget", "nan"], "positive number"),
        (["--budget", "9", "--only", "nope"], "unknown item(s) ['nope']"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            rb.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_cli_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(rb, "REQUIRED", (*rb.REQUIRED, "no_such_module_for_accel"))
    assert rb.main(["--budget", "9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing Python package(s): no_such_module_for_accel" in err and "pip install" in err
    monkeypatch.undo()
    monkeypatch.setattr(rb, "environment", lambda tiny: dict(ENV, gpu=None))
    assert rb.main(["--budget", "9", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_plan_is_in_priority_order_and_lists_commands(capsys: pytest.CaptureFixture) -> None:
    phases = [item.phase for item in rb.PLAN]
    assert phases == sorted(phases) and set(phases) == {1, 2, 3, 4}
    assert [i.name for i in rb.PLAN if i.phase == 1] == ["attention-int8", "sparse-attention", "w4-gemm"]
    assert len({i.name for i in rb.PLAN}) == len(rb.PLAN)
    assert rb.main(["--plan", "--only", "w4-gemm,caching-wan"]) == 0
    text = capsys.readouterr().out
    assert "benchmarks/quant.py --part gemm --gemm-shapes results" in text and "caching.py --scenario wan" in text
    assert "attention.py" not in text


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                if not _gone(int(proc.name)):
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_sigterm_to_the_driver_ends_the_running_item(tmp_path: Path) -> None:
    """run_all.sh under `timeout` or a killed session: the item (its own session) must not outlive the driver."""
    import os
    import signal
    import subprocess

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    driver = subprocess.Popen(
        ["bash", str(REPO / "benchmarks" / "run_all.sh"), "--budget", "300", "--tiny", "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        items = lambda: [pid for pid in _processes_mentioning(str(out)) if pid != driver.pid]  # noqa: E731
        while not items() or not (out / "attention-int8.log").exists():
            assert time.monotonic() < deadline and driver.poll() is None, "the first item never started"
            time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)  # run_all.sh execs the driver: this is its pid
        assert driver.wait(30) == 128 + signal.SIGTERM
    finally:
        if driver.poll() is None:
            driver.kill()
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(out)), "the item outlived the driver"


def test_every_gpu_command_passes_its_scripts_argument_parsing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """CI never runs the GPU arguments (the tiny run uses `tiny_args`): each item's GPU command must get as far
    as its script's GPU check, so a renamed flag cannot first show up on a lent GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scripts = {}
    for item in rb.PLAN:
        if item.script not in scripts:
            spec = importlib.util.spec_from_file_location(f"bench_{Path(item.script).stem}", REPO / item.script)
            scripts[item.script] = module = importlib.util.module_from_spec(spec)
            monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
            spec.loader.exec_module(module)
        try:
            code = scripts[item.script].main([*item.args, "--json", "unused.json"])
        except SystemExit as exit_info:
            code = exit_info.code
        message = f"{code} {capsys.readouterr().err}"
        assert "needs a CUDA GPU" in message and "unrecognized arguments" not in message, (item.name, message)
