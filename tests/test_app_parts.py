"""The web app's parts without a server: `accel app` on the command line (also without gradio), the limits,
which controls a model leaves usable, and the page's own handlers called in-process."""

from __future__ import annotations

import sys

import pytest

from accel.app import Limits
from accel.app.limits import IMAGE_SUFFIXES, AppInputError
from accel.cli import main


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accel: error: "), lines
    return lines[0]


def test_app_without_gradio(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    line = usage_error(capsys, ["app"])
    assert 'pip install -e ".[app]"' in line and 'pip install "accel[app]"' in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--max-models", "0"], "--max-models must be >= 1, got 0"),
        (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--max-size", "16"], "Limits.max_size=16: must be >= 32"),
        (["--device", "tpu9"], "--device 'tpu9' is not a torch device"),
    ],
)
def test_app_arguments(capsys, argv, message):
    assert message in usage_error(capsys, ["app", *argv])


def test_import_is_lazy(monkeypatch):
    """Neither `import accel.app` nor building the CLI imports gradio: they are imported afresh here with
    `import gradio` failing (monkeypatch puts the modules back afterwards)."""
    import importlib

    import accel
    import accel.cli

    monkeypatch.setattr(accel, "app", sys.modules["accel.app"])  # the package attributes come back too
    if "accel.cli.app" in sys.modules:
        monkeypatch.setattr(accel.cli, "app", sys.modules["accel.cli.app"])
    for name in [n for n in sys.modules if n.startswith("accel.app") or n == "accel.cli.app"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gradio", None)
    importlib.import_module("accel.app")
    from accel.cli import build_parser

    build_parser()
    assert "accel.app.ui" not in sys.modules


def test_limits(tmp_path):
    limits = Limits(max_upload_mb=1)
    big = tmp_path / "big.png"
    big.write_bytes(bytes(int(1.5 * 2**20)))
    with pytest.raises(AppInputError, match=r"the upload is 1.5 MB; the limit is 1 MB"):
        limits.check_upload(str(big), IMAGE_SUFFIXES, "an image")
    with pytest.raises(AppInputError, match=r"the upload 'x.exe' is not an image \(PNG, JPG, WEBP, BMP, GIF\)"):
        limits.check_upload(str(tmp_path / "x.exe"), IMAGE_SUFFIXES, "an image")
    with pytest.raises(AppInputError, match="steps must be between 1 and 5, got 6"):
        Limits(max_steps=5).check_steps(6)
    assert limits.check_size(64) == 64 and limits.check_steps(12.0) == 12


gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def demo():
    from accel.app import build_app

    return build_app(preload="tiny-random-flux", max_models=2, device="cpu")


def test_nothing_loads_until_asked():
    from accel.app import build_app

    assert build_app(max_models=1).accel.service.pool.loaded() == []


def test_capabilities(demo, monkeypatch):
    from accel.app.capabilities import capabilities

    service = demo.accel.service
    flux, llava = service.model("tiny-random-flux"), service.model("tiny-random-llava")
    assert "visual token pruning applies to vision-language models" in flux.capabilities["prune"]
    assert "step caching applies to diffusion denoisers" in llava.capabilities["cache"]
    assert flux.capabilities["cache"] is None and llava.capabilities["prune"] is None
    assert flux.capabilities["attention:sdpa"] is None and llava.capabilities["quant"] is None
    monkeypatch.delenv("TRITON_INTERPRET")  # the CPU without Triton's interpreter: no INT8 or sparse kernel
    found = capabilities(flux)
    assert "INT8 attention needs a CUDA GPU" in found["attention:int8"]
    assert "sparse attention needs a CUDA GPU" in found["sparse"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    found = capabilities(flux)
    assert found["attention:int8"] is None and found["sparse"] is None


def test_controls_follow_the_model(demo):
    from accel.app.ui_tab import control_updates, dependent_outputs

    tab, model = demo.accel.tabs["image"], demo.accel.service.model("tiny-random-flux")
    model.capabilities["attention:int8"] = "INT8 attention needs a CUDA GPU (as without one)"
    try:
        updates = dict(zip(dependent_outputs(tab), control_updates(tab, model)))
    finally:
        model.capabilities["attention:int8"] = None
    assert "random weights" in updates[tab.note]["value"]
    assert "- INT8 attention needs a CUDA GPU (as without one)" in updates[tab.why]["value"]
    choices = [value for _, value in updates[tab.controls["attention"]]["choices"]]
    assert "int8" not in choices and "sdpa" in choices and "default" in choices
    assert updates[tab.controls["cache"]]["interactive"] is True
    assert "PyTorch reference" in updates[tab.controls["quant"]]["info"]  # the CPU's W4 path, in accel's words


def test_page_handler(demo):
    """The Image tab's Compare handler, called as gradio calls it (a dict of input values)."""
    from accel.app.ui_tab import _on_compare

    tab, service = demo.accel.tabs["image"], demo.accel.service
    data = {tab.model: "tiny-random-flux", tab.prompt: "", demo.accel.history: []}
    defaults = {"preset": "fast", "cache": "preset", "cache_value": 0.4, "attention": "default", "sparse": False}
    defaults.update(sparse_target=0.85, quant=False, steps=4, size=32, seed=0)
    data.update({component: defaults[key] for key, component in tab.controls.items()})
    slider, summary, table, report, details, plot, history = _on_compare(tab, service, demo.accel.history)(data)
    assert slider[0].size == slider[1].size == (256, 256)  # 32 px enlarged 8x for the page
    assert summary.startswith("**") and "denoiser passes computed" in summary
    assert table[0][0] == "wall time (s)" and "cache" in report
    assert details["settings"] == "fast" and len(history) == 1 and list(plot["speedup"]) == [history[0]["speedup"]]
    with pytest.raises(gr.Error, match="steps must be between 1 and 50, got 99"):
        _on_compare(tab, service, demo.accel.history)({**data, tab.controls["steps"]: 99})


def test_page_handler_vlm(demo):
    """The VLM tab's handler shows the scene ref-vlm was asked about (no upload) and both answers."""
    from accel.app.ui_tab import _on_compare

    tab, service = demo.accel.tabs["vlm"], demo.accel.service
    data = {tab.model: "ref-vlm", tab.prompt: "how many shapes are there ?", demo.accel.history: []}
    data.update({upload: None for upload in tab.uploads})
    values = {"preset": "lossless", "attention": "default", "prune": False, "prune_keep": 64, "quant": False}
    values.update(new_tokens=2, seed=3)
    data.update({component: values[key] for key, component in tab.controls.items()})
    picture, baseline, accelerated, summary, *_ = _on_compare(tab, service, demo.accel.history)(data)
    assert picture.size == (128, 128) and baseline == accelerated  # "lossless" changes nothing
    assert "token agreement **1.000**" in summary


def test_sparse_default_follows_sparse_config():
    from accel.app.settings import Settings
    from accel.attention.sparse import SparseConfig

    assert Settings().sparse_target == SparseConfig().target
