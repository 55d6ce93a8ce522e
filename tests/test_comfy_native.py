"""The ComfyUI nodes on tiny native ComfyUI models, in-process: tests/comfy_native_checks.py (step cache) and
tests/comfy_attention_checks.py (attention) and tests/comfy_w4_checks.py (W4 weights), run in a Python process of their own (ComfyUI needs a stand-in torchvision that the rest of the suite must not see). Skips when
ComfyUI or its requirements are missing, except in CI (CI=true), where it fails."""

from __future__ import annotations

import os
import subprocess
import sys

from comfy_tiny import REPO, comfy_env, require_comfyui


def test_nodes_on_native_comfyui_models():
    require_comfyui()
    checks = [
        str(REPO / "tests" / name)
        for name in ("comfy_native_checks.py", "comfy_attention_checks.py", "comfy_w4_checks.py")
    ]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "comfy_fixtures", *checks]
    env = comfy_env()
    env["PYTHONPATH"] = os.pathsep.join((str(REPO / "tests"), env["PYTHONPATH"]))  # where -p finds the fixtures
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
