"""The node pack in a real ComfyUI server: ComfyUI 0.8.0 from ../shared/comfyui started on 127.0.0.1 (a free port,
CPU) with a temporary base directory into which `accel comfy-install` put the loader. The test checks the nodes and
their inputs in /object_info, posts a workflow that samples a tiny FLUX through Accel W4 Weights, Accel Attention,
Accel Step Cache and Accel Report to /prompt, and reads the saved latent and the report from /history. The server
is always stopped.

The tiny model and its conditioning come from a test-only node module written into the same base directory
(ComfyUI's checkpoint loaders cannot make a tiny FLUX: its detection fixes the width). Skips when ComfyUI or its
requirements are missing, except in CI (CI=true), where it fails."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from comfy_tiny import COMFYUI, REPO, comfy_env, require_comfyui

from accel.cli import main

START_TIMEOUT = 240  # seconds: ComfyUI imports all its nodes first, about 20 s on an idle 2-core CPU
RUN_TIMEOUT = 240

TEST_NODES = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
import comfy_tiny


class AccelTestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"family": (["flux", "wan"],)}}}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, family):
        return (comfy_tiny.tiny_model(family),)


class AccelTestConditioning(AccelTestTinyModel):
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")

    def run(self, family):
        return tuple(comfy_tiny.conds(family))


NODE_CLASS_MAPPINGS = {{"AccelTestTinyModel": AccelTestTinyModel, "AccelTestConditioning": AccelTestConditioning}}
"""

WORKFLOW = {
    "1": {"class_type": "AccelTestTinyModel", "inputs": {"family": "flux"}},
    "2": {"class_type": "AccelTestConditioning", "inputs": {"family": "flux"}},
    "8": {"class_type": "AccelQuantizeW4", "inputs": {"model": ["1", 0], "group_size": 16, "min_features": 16}},
    "9": {
        "class_type": "AccelAttention",
        "inputs": {
            "model": ["8", 0],
            "route": "sdpa",
            "dense_first_steps": 1,
            "dense_last_steps": 0,
            "sparse_target": 0.85,
            "sparse_block_q": 128,
            "sparse_block_k": 64,
        },
    },
    "3": {
        "class_type": "AccelStepCache",
        "inputs": {
            "model": ["9", 0],
            "mode": "threshold",
            "value": 2.0,
            "start_percent": 0.1,
            "end_percent": 1.0,
            "taylor_order": 2,
            "max_consecutive": 3,
        },
    },
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["3", 0],
            "positive": ["2", 0],
            "negative": ["2", 1],
            "latent_image": ["4", 0],
            "seed": 7,
            "steps": 8,
            "cfg": 2.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1.0,
        },
    },
    "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "accel_test"}},
    "7": {"class_type": "AccelReport", "inputs": {"model": ["3", 0], "after": ["5", 0]}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, payload: dict):
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait(what: str, poll, timeout: float, server: subprocess.Popen, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"ComfyUI exited ({server.returncode}) while waiting for {what}:\n{_tail(log)}")
        try:
            value = poll()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout} s:\n{_tail(log)}")


def _tail(log) -> str:
    log.flush()
    with open(log.name, errors="replace") as f:
        return f.read()[-6000:]


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)


def test_nodes_in_a_real_comfyui_server(tmp_path):
    require_comfyui()
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    assert main(["comfy-install", str(base)]) == 0
    (base / "custom_nodes" / "accel_test_nodes.py").write_text(TEST_NODES)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(COMFYUI / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    command += ["--base-directory", str(base), "--dont-print-server", "--disable-auto-launch"]
    with open(tmp_path / "comfyui.log", "w+") as log:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=comfy_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            info = _wait("/object_info", lambda: _get(f"{url}/object_info"), START_TIMEOUT, server, log)
            for node, inputs in {
                "AccelStepCache": ["model", "mode", "value", "start_percent", "end_percent", "taylor_order"],
                "AccelAttention": ["model", "route", "dense_first_steps", "dense_last_steps", "sparse_target"],
                "AccelQuantizeW4": ["model", "group_size", "min_features"],
                "AccelReport": ["model", "after"],
            }.items():
                assert node in info, f"{node} not loaded:\n{_tail(log)}"
                assert all(name in info[node]["input"]["required"] for name in inputs), info[node]["input"]
            example = json.loads((REPO / "accel" / "comfy" / "examples" / "flux_step_cache_api.json").read_text())
            for node in example.values():  # the example names nodes and inputs this ComfyUI has
                known = info[node["class_type"]]["input"]
                assert set(node["inputs"]) <= {**known["required"], **known.get("optional", {})}.keys(), node
            assert info["AccelStepCache"]["display_name"] == "Accel Step Cache"
            assert info["AccelStepCache"]["output"] == ["MODEL"] and info["AccelReport"]["output_node"]

            prompt_id = _post(f"{url}/prompt", {"prompt": WORKFLOW, "client_id": "accel-test"})["prompt_id"]
            history = _wait(
                "the prompt's /history",
                lambda: _get(f"{url}/history/{prompt_id}").get(prompt_id),
                RUN_TIMEOUT,
                server,
                log,
            )
            assert history["status"]["status_str"] == "success", json.dumps(history["status"]["messages"])[-3000:]
            saved = history["outputs"]["6"]["latents"][0]
            assert (base / "output" / saved["subfolder"] / saved["filename"]).is_file()
            report = history["outputs"]["7"]["text"][0]
            assert "step cache on FLUX (ComfyUI)" in report and "threshold=2.0" in report
            assert "W4 weights on FLUX (ComfyUI)" in report and "sdpa attention on FLUX (ComfyUI)" in report
            assert "run 1: 8 steps" in report and "reused 0 " not in report, report
        finally:
            _stop(server)
    assert server.returncode is not None
