"""`accel comfy-install`: the loader into a ComfyUI folder or base directory and out again; accel.comfy itself imports
nothing of ComfyUI. No ComfyUI needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import accel.comfy
from accel.cli import main
from accel.comfy import LOADER_DIR
from accel.errors import UnsupportedModelError
from accel.pipelines.comfy_native import find_comfy_adapter


def test_install_and_uninstall_in_a_base_directory(tmp_path, capsys):
    (tmp_path / "custom_nodes").mkdir()
    assert main(["comfy-install", str(tmp_path)]) == 0
    loader = tmp_path / "custom_nodes" / LOADER_DIR / "__init__.py"
    assert "from accel.comfy.nodes import *" in loader.read_text()
    assert "wrote" in capsys.readouterr().out
    assert main(["comfy-install", str(tmp_path / "custom_nodes")]) == 0  # again, or given custom_nodes itself
    (loader.parent / "__pycache__").mkdir()  # what ComfyUI leaves after loading it
    (loader.parent / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"")
    assert main(["comfy-install", "--uninstall", str(tmp_path)]) == 0
    assert not loader.parent.exists() and (tmp_path / "custom_nodes").is_dir()
    assert main(["comfy-install", "--uninstall", str(tmp_path)]) == 0
    assert "nothing to remove" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "no custom_nodes", "foreign loader"])
def test_mistakes_are_one_line_errors(tmp_path, capsys, case):
    target = tmp_path / "nowhere" if case == "missing" else tmp_path
    if case == "foreign loader":
        (tmp_path / "custom_nodes" / LOADER_DIR).mkdir(parents=True)
        (tmp_path / "custom_nodes" / LOADER_DIR / "__init__.py").write_text("print('someone else')\n")
    with pytest.raises(SystemExit) as exit_:
        main(["comfy-install", str(target)] + (["--uninstall"] if case == "foreign loader" else []))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accel: error:") and "\n" not in err
    expected = {"missing": "is not a folder", "no custom_nodes": "mkdir", "foreign loader": "move it away"}[case]
    assert expected in err
    if case == "foreign loader":
        assert (tmp_path / "custom_nodes" / LOADER_DIR / "__init__.py").read_text() == "print('someone else')\n"


def test_accel_comfy_imports_no_comfyui():
    code = "import sys, accel.comfy, accel.pipelines.comfy_native; print(any(m.split('.')[0] in ('comfy', 'comfy_api') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_an_unsupported_model_is_named():
    with pytest.raises(UnsupportedModelError, match="torch.nn.modules.linear.Linear.*Supported: FLUX"):
        import torch

        find_comfy_adapter(torch.nn.Linear(2, 2))


def test_the_example_workflows_agree():
    """The UI-format example is the API-format one laid out: same nodes, same links, same Accel settings."""
    folder = Path(accel.comfy.__file__).parent / "examples"
    api = json.loads((folder / "flux_step_cache_api.json").read_text())
    ui = json.loads((folder / "flux_step_cache_ui.json").read_text())
    assert {int(i): n["class_type"] for i, n in api.items()} == {n["id"]: n["type"] for n in ui["nodes"]}
    api_links = {
        (int(v[0]), v[1], int(i), name)
        for i, n in api.items()
        for name, v in n["inputs"].items()
        if isinstance(v, list)
    }
    inputs = {n["id"]: n["inputs"] for n in ui["nodes"]}
    ui_links = {(src, slot, dst, inputs[dst][dst_slot]["name"]) for _, src, slot, dst, dst_slot, _ in ui["links"]}
    assert api_links == ui_links
    cache = next(n for n in ui["nodes"] if n["type"] == "AccelStepCache")
    settings = [v for k, v in api["7"]["inputs"].items() if k != "model"]
    assert cache["widgets_values"] == settings
