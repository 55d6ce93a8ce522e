#!/usr/bin/env python
"""How long `accel app` takes from launch until its page answers, as a new user first sees it: a fresh home
folder (no caches of gradio, matplotlib or Hugging Face), on a free port of 127.0.0.1, no model loaded at start.

    python benchmarks/app_startup.py --runs 3

Prints each run's seconds and their median; the server is stopped after each run, always."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(accel: str, timeout: float) -> float:
    home, port = tempfile.mkdtemp(prefix="accel-app-home-"), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPLCONFIGDIR", "HF_", "GRADIO_", "XDG_"))}
    env["HOME"] = home
    start = time.perf_counter()
    server = subprocess.Popen(
        [accel, "app", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while time.perf_counter() - start < timeout:
            if server.poll() is not None:
                raise RuntimeError(
                    f"accel app exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"accel app did not answer within {timeout:.0f} s")
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(home, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the page (default: 120)")
    default = Path(sys.executable).with_name("accel")
    p.add_argument("--accel", default=str(default), help=f"the accel command (default: {default})")
    args = p.parse_args(argv)
    times = []
    for i in range(args.runs):
        times.append(one_start(args.accel, args.timeout))
        print(f"run {i + 1}: page answered after {times[-1]:.1f} s")
    print(f"median {statistics.median(times):.1f} s over {len(times)} runs (target: under 20 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
