#!/usr/bin/env python
"""Every GPU benchmark once within a time budget, most important first (``benchmarks/run_all.sh`` runs this).

The plan (``--plan`` prints it with each item's estimate and command) runs in this order:

1. kernels: INT8 attention vs SDPA (and sageattention when installed), block-sparse attention at 50/75/90%
   sparsity, W4 GEMM vs bf16;
2. one end-to-end step per accelerator at the released models' shapes (random weights): a Wan2.1-1.3B forward
   with INT8 attention, with sparse attention, with W4 weights, and a LLaVA-1.5-7B prefill/decode with pruning;
3. step caching with fewer steps and variants (FLUX.1-dev 14 steps, Wan2.1-1.3B 8 steps);
4. extras, when time is left: the attention tile sweep, HunyuanVideo shapes, the FLUX W4 forward, Qwen2-VL pruning.

Each item is one run of a script beside this one (``attention.py``, ``sparse_attention.py``, ``quant.py``,
``pruning.py``, ``caching.py``) with smaller settings, in its own process group. An item starts only if its
estimate fits in the time left, and runs under a hard timeout of the time left, so the whole command ends within
the budget plus a few seconds. A crash is recorded and the next item runs. As soon as an item ends,
``<out>/<item>.json`` is written atomically (status, time, command, the script's own JSON under ``result``;
partial when the budget stopped it), its output is in ``<out>/<item>.log``, and ``summary.json`` /
``summary.md`` are rewritten; a summary table is printed at the end, one line per item (the ``headline`` of the
script's JSON). Items that no longer fit are skipped with a note.

GPU estimates are guesses until a GPU run measures them (``summary.json`` has each item's time: copy them into
PLAN); all 14 are times measured once on an H200 on 2026-12-04 (results/gpu-h200-2026-12-04/ and -04b/).
``--tiny`` runs the same plan on CPU at tiny shapes (Triton interpreter): it checks it, measures nothing.

Exit status: 0 when every item that ran succeeded (skipped and budget-stopped items included), 1 when an item
failed, 2 when a required package (the message says what to install) or the GPU is missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHASES = {1: "kernels", 2: "end-to-end step", 3: "caching", 4: "extras"}
# accel's own dependencies (pyproject.toml): without any of them every item fails at import.
REQUIRED = ("torch", "triton", "diffusers", "transformers", "accelerate", "safetensors", "psutil", "numpy", "tqdm")
# name: what is missing without it
OPTIONAL = {
    "sageattention": "the sageattn-triton rows of the attention items",
    "torchao": "the torchao int4wo column of w4-gemm",
}
VERSIONS = ("torch", "triton", "diffusers", "transformers", "accelerate", "sageattention", "torchao")
INSTALL_HINT = """\
Install what is missing before the run, e.g. `pip install -e .` from the repository root (accel's dependencies),
plus `pip install sageattention==1.0.6` for the sageattention rows. On a GPU machine without a package registry,
carry wheels downloaded elsewhere and install them with
`python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`
(benchmarks/README.md, "Budgeted run", lists the wheels)."""
KILL_GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long
RESERVE_S = 1.0  # kept back from each item's timeout for writing its JSON and the summary


# The plan


@dataclass(frozen=True)
class Item:
    name: str  # file stem in --out
    phase: int
    what: str
    script: str  # relative to the repository root (the items' working directory), or absolute
    args: tuple[str, ...]  # on a GPU
    tiny_args: tuple[str, ...]  # with --tiny (tiny shapes on CPU); "--tiny" is added
    estimate_s: float  # on one H100/H200-class GPU, process start included: a guess until measured
    tiny_estimate_s: float  # with --tiny on 2 CPU cores

    def command(self, python: str, tiny: bool, json_path: Path) -> list[str]:
        args = ("--tiny", *self.tiny_args) if tiny else self.args
        return [python, self.script, *args, "--json", str(json_path)]  # run in the repository root

    def estimate(self, tiny: bool) -> float:
        return self.tiny_estimate_s if tiny else self.estimate_s

    def record(self, tiny: bool, **fields: Any) -> dict[str, Any]:
        """The item's entry in the summary: who it is, then what happened to it."""
        return dict(item=self.name, phase=self.phase, what=self.what, estimate_s=self.estimate(tiny), **fields)


def _item(name, phase, what, script, args, tiny_args, estimate_s, tiny_estimate_s) -> Item:
    return Item(name, phase, what, f"benchmarks/{script}", tuple(args), tuple(tiny_args), estimate_s, tiny_estimate_s)


# A table: one item per row reads better than one argument per line.
# fmt: off
PLAN: list[Item] = [
    _item("attention-int8", 1, "INT8 attention vs SDPA flash/cuDNN (+ sageattention), Wan/FLUX/VLM shapes, default tiles",
          "attention.py", ["--shapes", "wan,flux,vlm", "--no-tune", "--repeats", "10", "--warmup", "3"],
          ["--shapes", "vlm", "--no-tune", "--repeats", "1", "--warmup", "0"], 39.4, 30),
    _item("sparse-attention", 1, "block-sparse attention at 50/75/90% vs SDPA and dense INT8, search cost, Wan 480p",
          "sparse_attention.py", ["--scenario", "wan", "--repeats", "5", "--warmup", "2"],
          ["--scenario", "wan", "--repeats", "1"], 23.9, 30),
    _item("w4-gemm", 1, "W4 GEMM (W4A16, W4A8) vs bf16 matmul, the RESULTS.md shapes",
          "quant.py", ["--part", "gemm", "--gemm-shapes", "results", "--repeats", "10", "--warmup", "3"],
          ["--part", "gemm", "--repeats", "1", "--warmup", "0"], 32.4, 20),
    _item("attention-e2e", 2, "one Wan2.1-1.3B 480p transformer forward, SDPA vs INT8 attention",
          "attention.py", ["--shapes", "none", "--e2e", "--repeats", "4", "--warmup", "1"],
          ["--shapes", "none", "--e2e", "--repeats", "1", "--warmup", "0"], 23.6, 15),
    _item("sparse-e2e", 2, "one Wan2.1-1.3B 480p transformer forward, dense vs sparse target 0.8",
          "sparse_attention.py", ["--scenario", "wan-step", "--targets", "0.8", "--repeats", "3", "--warmup", "1"],
          ["--scenario", "wan-step", "--targets", "0.8", "--repeats", "1"], 29.3, 25),
    _item("quant-e2e", 2, "one Wan2.1-1.3B 480p transformer forward, bf16 vs W4 and W4A8",
          "quant.py", ["--part", "model", "--models", "wan", "--repeats", "3", "--warmup", "1"],
          ["--part", "model", "--models", "wan", "--repeats", "1", "--warmup", "0"], 49.6, 20),
    _item("pruning-e2e", 2, "LLaVA-1.5-7B prefill, TTFT and decode, baseline vs 64 kept visual tokens",
          "pruning.py",
          ["--scenario", "llava", "--keep", "64", "--repeats", "2", "--warmup", "1", "--new-tokens", "16"],
          ["--scenario", "llava", "--repeats", "1"], 26.7, 25),
    _item("caching-flux", 3, "FLUX.1-dev 1024px, 14 steps: baseline, diffusers FBC 0.1, accel balanced, accel fast",
          "caching.py", ["--scenario", "flux", "--steps", "14", "--repeats", "1", "--warmup", "1",
                         "--variants", "diffusers FBC 0.1,accel balanced,accel fast"],
          ["--scenario", "flux", "--steps", "14", "--repeats", "1", "--warmup", "1",
           "--variants", "diffusers FBC 0.1,accel balanced,accel fast"], 37.5, 25),
    _item("caching-wan", 3, "Wan2.1-1.3B 480p 81 frames, 8 steps with CFG: baseline, diffusers FBC 0.1, accel balanced",
          "caching.py", ["--scenario", "wan", "--steps", "8", "--repeats", "1", "--warmup", "1",
                         "--variants", "diffusers FBC 0.1,accel balanced", "--no-rerun"],
          ["--scenario", "wan", "--steps", "8", "--repeats", "1", "--warmup", "1",
           "--variants", "diffusers FBC 0.1,accel balanced", "--no-rerun"], 75.0, 20),
    _item("attention-tuning", 4, "INT8 attention tile sweep (fastest of 6 configurations per variant), Wan shape",
          "attention.py", ["--shapes", "wan", "--repeats", "10", "--warmup", "3"],
          ["--shapes", "vlm", "--repeats", "1", "--warmup", "0"], 50.9, 15),
    _item("attention-hunyuan", 4, "INT8 attention vs SDPA at HunyuanVideo 720p (119,056 tokens), default tiles",
          "attention.py", ["--shapes", "hunyuan", "--no-tune", "--repeats", "5", "--warmup", "1"],
          ["--shapes", "hunyuan", "--no-tune", "--repeats", "1", "--warmup", "0"], 40.9, 20),
    _item("sparse-hunyuan", 4, "block-sparse attention at 50/75/90%, HunyuanVideo 720p",
          "sparse_attention.py", ["--scenario", "hunyuan", "--repeats", "3", "--warmup", "1"],
          ["--scenario", "hunyuan", "--repeats", "1"], 49.9, 25),
    _item("quant-e2e-flux", 4, "one FLUX.1-dev 1024px transformer forward, bf16 vs W4 and W4A8",
          "quant.py", ["--part", "model", "--models", "flux", "--repeats", "3", "--warmup", "1"],
          ["--part", "model", "--models", "flux", "--repeats", "1", "--warmup", "0"], 76.3, 20),
    _item("pruning-qwen2-vl", 4, "Qwen2-VL-7B image and video prefill/decode, baseline vs 64 kept visual tokens",
          "pruning.py", ["--scenario", "qwen2_vl_image", "qwen2_vl_video", "--keep", "64", "--repeats", "2",
                         "--warmup", "1", "--new-tokens", "16"],
          ["--scenario", "qwen2_vl_image", "qwen2_vl_video", "--repeats", "1"], 34.9, 25),
]
# fmt: on


# Running


# The driver imports nothing of accel (whose accel.bench.host.write_json does the same): it checks the
# dependencies before anything imports them, and `import accel` would cost the budget ~10 s.
def _write_text(path: Path, text: str) -> None:
    """Write `text` so that a reader (or a kill) never sees half a file: a temporary file, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, doc: Any) -> None:
    _write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def _kill_group(proc: subprocess.Popen) -> None:
    """End the item's process group (the script and anything it started): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_item(item: Item, out: Path, tiny: bool, python: str, timeout_s: float) -> dict[str, Any]:
    """Run one item under `timeout_s`; return its record (also written to <out>/<name>.json)."""
    raw = out / f"{item.name}.raw.json"
    log = out / f"{item.name}.log"
    raw.unlink(missing_ok=True)
    cmd = item.command(python, tiny, raw)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if tiny:
        env["TRITON_INTERPRET"] = "1"
    record = item.record(tiny, timeout_s=round(timeout_s, 1), command=shlex.join(cmd), log=log.name)
    t0 = time.monotonic()
    # A SIGTERM between the fork and `proc` being set would orphan the item (its own session): hold it till then.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    proc = None
    with log.open("w") as log_file:
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, held),  # the item gets SIGTERM
            )
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a SIGTERM held until now is handled here
            code = proc.wait(timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out, code = True, None
        finally:  # also on Ctrl-C, and for children the script left behind
            if proc is not None:
                _kill_group(proc)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    record["elapsed_s"] = round(time.monotonic() - t0, 1)
    record["exit_code"] = code
    if timed_out:
        record["status"] = "timeout"
        record["note"] = (
            f"stopped by the budget after {record['elapsed_s']:.0f} s (estimate {item.estimate(tiny):.0f} s)"
        )
    elif code == 0:
        record["status"] = "ok"
    else:
        record["status"] = "failed"
        record["note"] = f"exit status {code}"
    result = None
    if raw.exists():
        try:
            result = json.loads(raw.read_text())
        except ValueError as err:  # cut off mid-write by the timeout
            record["note"] = (record.get("note", "") + f"; its JSON is unreadable ({err})").lstrip("; ")
        raw.unlink()
    elif record["status"] == "ok":
        record["status"], record["note"] = "failed", "exit status 0 but the script wrote no JSON"
    if record["status"] != "ok":
        record["log_tail"] = _tail(log)
    if result is not None:  # a partial result (cut off by the budget) has no headline yet
        record["headline"] = (result.get("headline") if isinstance(result, dict) else None) or "(no summary line)"
    write_json(out / f"{item.name}.json", dict(record, result=result))
    return record


def environment(tiny: bool) -> dict[str, Any]:
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = dict(python=sys.version.split()[0], versions=versions, tiny=tiny, gpu=None)
    smi = shutil.which("nvidia-smi")
    if smi and not tiny:
        try:
            query = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            env["gpu"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def missing_modules() -> tuple[list[str], dict[str, str]]:
    required = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    optional = {m: why for m, why in OPTIONAL.items() if importlib.util.find_spec(m) is None}
    return required, optional


def _summary_md(summary: dict[str, Any]) -> str:
    env = summary["env"]
    mode = "TINY shapes on CPU: checks the plan, measures nothing" if summary["tiny"] else (env["gpu"] or "GPU")
    lines = [
        f"# Budgeted benchmark run: {mode}",
        "",
        f"- started {summary['started']}, budget {summary['budget_s']:.0f} s, used {summary['elapsed_s']:.0f} s",
        "- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + f", python {env['python']}",
    ]
    for name, why in summary["optional_missing"].items():
        lines.append(f"- {name} not installed: no {why}")
    lines += ["", "| phase | item | status | s | est. s | result / note |", "|---|---|---|---|---|---|"]
    for r in summary["items"]:
        text = " ".join(x for x in (r.get("headline"), r.get("note")) if x).replace("|", "/")
        elapsed = f"{r['elapsed_s']:.0f}" if "elapsed_s" in r else ""
        lines.append(
            f"| {r['phase']} {PHASES.get(r['phase'], '')} | {r['item']} | {r['status']} | {elapsed} "
            f"| {r['estimate_s']:.0f} | {text} |"
        )
    lines += [
        "",
        "Per item: `<item>.json` (`result` is the script's JSON), `<item>.log`. How the JSON maps into the "
        'tables: benchmarks/RESULTS.md, "Budgeted GPU run".',
    ]
    return "\n".join(lines) + "\n"


def run_plan(
    items: list[Item],
    budget_s: float,
    out: Path,
    tiny: bool,
    python: str = sys.executable,
    env: dict[str, Any] | None = None,
    optional_missing: dict[str, str] | None = None,
    clock_start: float | None = None,
) -> dict[str, Any]:
    """Run `items` in order within `budget_s` seconds from `clock_start` (default: now); return the summary."""
    start = time.monotonic() if clock_start is None else clock_start
    deadline = start + budget_s
    out = out.resolve()  # the items run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = dict(
        started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        budget_s=budget_s,
        tiny=tiny,
        env=env or environment(tiny),
        optional_missing=optional_missing or {},
        items=[],
        elapsed_s=0.0,
    )

    def save() -> None:
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        write_json(out / "summary.json", summary)
        _write_text(out / "summary.md", _summary_md(summary))

    for item in items:
        left = deadline - time.monotonic()
        need = item.estimate(tiny)
        stamp = f"[{time.monotonic() - start:6.0f} s | {max(left, 0):4.0f} s left]"
        if need > left:
            note = f"skipped: {max(left, 0):.0f} s left, needs ~{need:.0f} s"
            record = item.record(tiny, status="skipped", note=note)
            print(f"{stamp} {item.name}: {record['note']}", flush=True)
        else:
            print(f"{stamp} {item.name}: {item.what} (estimate {need:.0f} s) ...", flush=True)
            record = run_item(item, out, tiny, python, timeout_s=max(left - RESERVE_S, 1.0))
            print(
                f"{' ' * len(stamp)} {item.name}: {record['status']} in {record['elapsed_s']:.0f} s"
                + (f": {record['note']}" if record.get("note") else ""),
                flush=True,
            )
            if record.get("headline"):
                print(f"{' ' * len(stamp)}   {record['headline']}", flush=True)
            if record["status"] == "failed":
                print(record["log_tail"], flush=True)
        summary["items"].append(record)
        save()
    save()
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print()
    print(f"{'item':<18} {'status':<8} {'s':>5} {'est':>5}  result / note")
    for r in summary["items"]:
        elapsed = f"{r['elapsed_s']:.0f}" if "elapsed_s" in r else "-"
        text = " ".join(x for x in (r.get("headline"), r.get("note")) if x)
        print(f"{r['item']:<18} {r['status']:<8} {elapsed:>5} {r['estimate_s']:>5.0f}  {text}")
    counts = {s: sum(r["status"] == s for r in summary["items"]) for s in ("ok", "failed", "timeout", "skipped")}
    print(
        f"{summary['elapsed_s']:.0f} of {summary['budget_s']:.0f} s used; "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=INSTALL_HINT
    )
    p.add_argument("--budget", type=float, help="seconds for the whole run (required unless --plan)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for <item>.json, <item>.log and summary.*; default benchmarks/results/budget-<time>",
    )
    p.add_argument(
        "--tiny", action="store_true", help="the same plan at tiny shapes on CPU: checks it, measures nothing"
    )
    p.add_argument("--only", default=None, help="comma list of item names: run these, in plan order")
    p.add_argument("--plan", action="store_true", help="print the plan (estimates, commands) and exit")
    args = p.parse_args(argv)
    names = [i.name for i in PLAN]
    if args.only is not None:
        args.only = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = sorted(set(args.only) - set(names))
        if unknown or not args.only:
            p.error(f"--only: unknown item(s) {unknown or '(none given)'}; the plan has {', '.join(names)}")
    if not args.plan:
        if args.budget is None:
            p.error("--budget SECONDS is required (e.g. --budget 480); --plan shows what it would run")
        if not args.budget > 0:  # also refuses NaN
            p.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    clock_start = time.monotonic()
    args = parse_args(argv)
    items = [i for i in PLAN if args.only is None or i.name in args.only]
    if args.plan:
        for i in items:
            print(
                f"{i.phase} {PHASES[i.phase]:<16} {i.name:<18} ~{i.estimate(args.tiny):4.0f} s  {i.what}\n"
                f"    {shlex.join(i.command('python', args.tiny, Path(f'<out>/{i.name}.raw.json')))}"
            )
        total = sum(i.estimate(args.tiny) for i in items)
        print(f"total estimate {total:.0f} s ({'tiny, CPU' if args.tiny else 'GPU, a guess until measured'})")
        return 0
    required, optional = missing_modules()
    if args.tiny:  # both only add GPU rows
        optional = {}
    if required:
        print(
            f"run_budget.py: missing Python package(s): {', '.join(required)}; every item needs them.\n{INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    env = environment(args.tiny)
    if not args.tiny and env["gpu"] is None:
        print(
            "run_budget.py needs a CUDA GPU (nvidia-smi lists none); use --tiny to check the plan on CPU",
            file=sys.stderr,
        )
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "benchmarks" / "results" / f"budget-{stamp}{'-tiny' if args.tiny else ''}"
    print(f"budgeted run: {args.budget:.0f} s, {len(items)} items, {env['gpu'] or 'CPU (tiny)'}; JSON into {out}")
    for name, why in optional.items():
        print(f"note: {name} is not installed, so there will be no {why} (pip install {name})")
    summary = run_plan(items, args.budget, out, args.tiny, env=env, optional_missing=optional, clock_start=clock_start)
    print_table(summary)
    print(f"summary: {out / 'summary.md'}")
    return 1 if any(r["status"] == "failed" for r in summary["items"]) else 0


if __name__ == "__main__":
    # Items run in their own sessions: SIGTERM (e.g. from `timeout`) becomes an exception that ends the running one.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
