"""`accel demo` on the reference models (accel.cli.demo, accel.bench.reference_demo, accel.bench.gallery): the
side-by-side PNG/GIF, the JSON's fields, the table's column order, prompt errors, the FLOPs estimate. Runs on
`untrained` pipelines with few steps, so it does not depend on the trained weights being shipped."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from PIL import Image

from accel.bench import reference_demo
from accel.bench.gallery import GAP, LABEL_HEIGHT, write_clip_row, write_image_row
from accel.bench.reference_demo import FlopProfile, flops_saved, profiling
from accel.cli import main
from accel.zoo import reference
from accel.zoo._base import UnsupportedInputError

ROW_FIELDS = {
    "model", "family", "kind", "prompt", "steps", "variant", "passes_computed", "passes_reused",
    "attention_blocks_kept", "flops_saved", "psnr", "ssim", "prompt_score", "prompt_attributes", "cpu_s",
    "cpu_times_s", "cpu_speedup", "applied", "skipped", "report", "error",
}  # fmt: skip
VARIANTS = ["baseline", "lossless", "balanced", "fast"]
SCALE = 3  # the gallery's default enlargement


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """The reference models as if no trained weights were shipped: `build` falls back to `untrained`."""
    monkeypatch.setattr(reference, "path", lambda name: tmp_path / "weights" / name)


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accel: error: "), lines
    assert captured.out == ""  # nothing ran
    return lines[0]


def panels(picture: Image.Image, n: int, side: int) -> list[Image.Image]:
    """The n panels of a gallery picture, each `side` pixels square."""
    assert picture.size == (n * side + (n - 1) * GAP, LABEL_HEIGHT + side)
    return [
        picture.crop((i * (side + GAP), LABEL_HEIGHT, i * (side + GAP) + side, LABEL_HEIGHT + side)) for i in range(n)
    ]


def test_demo_writes_gallery_json_and_table(tmp_path, capsys, no_weights):
    path = tmp_path / "run.json"
    argv = ["demo", "--models", "ref-flux,ref-wan", "--steps", "2", "--warmup", "0", "--quiet", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2 and all("random weights" in w and "noise" in w for w in warnings)

    # The table leads with the device-independent columns, then quality, then CPU time.
    header = next(line for line in out.splitlines() if line.startswith("model"))
    order = ["passes comp/reuse", "attn kept", "FLOPs saved", "PSNR dB", "SSIM", "prompt", "CPU s", "applied"]
    positions = [header.index(name) for name in order]
    assert positions == sorted(positions)
    table = [line.split() for line in out.splitlines()]
    assert [r[:2] for r in table if len(r) > 1 and r[0] in reference.NAMES and r[1] in VARIANTS] == [
        [m, v] for m in reference.NAMES for v in VARIANTS
    ]

    data = json.loads(path.read_text())
    assert data["command"] == "demo" and "Random weights" in data["warning"] and data["machine"]["device"] == "cpu"
    models = {m["model"]: m for m in data["models"]}
    assert models["ref-flux"]["gallery"] == str(tmp_path / "run-ref-flux.png")
    assert models["ref-wan"]["gallery"] == str(tmp_path / "run-ref-wan.gif")
    assert not models["ref-flux"]["trained"] and models["ref-wan"]["prompt"].endswith("moving right")
    for model in models.values():
        assert (
            model["gallery"] in out and sum(model["flop_profile"]["block_flops"]) < model["flop_profile"]["pass_flops"]
        )
    rows = {(r["model"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(m, v) for m in reference.NAMES for v in VARIANTS}
    for row in rows.values():
        assert set(row) == ROW_FIELDS and row["error"] is None and row["cpu_s"] > 0
        assert row["passes_computed"] + row["passes_reused"] == 2 * 2  # true CFG: two passes a step
        assert row["attention_blocks_kept"] is None  # no preset runs sparse attention
        assert 0 <= row["prompt_score"] <= 1 and row["prompt_attributes"]
    assert "motion" in rows["ref-wan", "fast"]["prompt_attributes"]
    assert rows["ref-flux", "baseline"]["flops_saved"] == 0.0 and rows["ref-flux", "baseline"]["report"] is None
    assert rows["ref-wan", "lossless"]["psnr"] == "inf" and rows["ref-wan", "lossless"]["ssim"] == 1.0
    assert rows["ref-flux", "fast"]["applied"] and rows["ref-flux", "fast"]["report"]["preset"] == "fast"

    picture = Image.open(tmp_path / "run-ref-flux.png")
    assert picture.format == "PNG"
    flux = panels(picture.convert("RGB"), len(VARIANTS), 64 * SCALE)
    assert flux[1].tobytes() == flux[0].tobytes()  # lossless changes no bit: the same panel as the baseline
    assert len(set(flux[0].getdata())) > 10  # a picture, not a blank panel
    clip = Image.open(tmp_path / "run-ref-wan.gif")
    assert clip.format == "GIF" and clip.n_frames == reference.reference("ref-wan").frames
    clip.seek(clip.n_frames - 1)
    panels(clip.convert("RGB"), len(VARIANTS), 64 * SCALE)


def test_demo_on_the_reference_vlm(tmp_path, capsys):
    """ref-vlm in the demo: lossless leaves every token (same answers), fast prunes by its preset's budget."""
    path = tmp_path / "vlm.json"
    argv = ["demo", "--models", "ref-vlm", "--presets", "lossless,fast", "--warmup", "0", "--quiet"]
    assert main(argv + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ref-vlm (" in out and "held-out questions" in out
    vlm = json.loads(path.read_text())["vlm"]
    rows = {r["variant"]: r for r in vlm["rows"]}
    assert list(rows) == ["baseline", "lossless", "fast"] and vlm["questions"] == 48
    assert rows["lossless"]["applied"] == "nothing" and rows["fast"]["applied"] == "prune"
    assert rows["lossless"]["accuracy"] == rows["baseline"]["accuracy"]
    assert rows["lossless"]["tokens_kept_per_image"] == rows["baseline"]["tokens_kept_per_image"] == 256
    assert rows["fast"]["tokens_kept_per_image"] < 256 and rows["fast"]["tokens_kept_per_video"] < 512
    assert rows["fast"]["prefill_gflops_image"] < rows["baseline"]["prefill_gflops_image"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_over_the_runs_unless_quiet(tmp_path, monkeypatch, no_weights, quiet):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["demo", "--models", "ref-flux", "--presets", "fast", "--steps", "1", "--warmup", "0"]
    assert main(argv + ["--json", str(tmp_path / "d.json")] + (["--quiet"] if quiet else [])) == 0
    bars = [line for line in terminal.getvalue().replace("\r", "\n").splitlines() if line.startswith("accel demo")]
    assert not bars if quiet else "2/2" in bars[-1]  # baseline and fast


def test_families_flux_keeps_the_tiny_demo(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    argv = ["demo", "--families", "flux", "--presets", "fast", "--steps", "2", "--warmup", "0", "--quiet"]
    assert main(argv + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT MODELS" in out and "fidelity vs baseline" in out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["family"], r["variant"]) for r in rows] == [("flux", "baseline"), ("flux", "fast")]
    assert not list(tmp_path.glob("tiny-*"))  # no gallery for the tiny families


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt", "a purple circle on a navy background"], "--prompt: unknown colour 'purple'"),
        (["--prompt", "a cat"], "--prompt: prompt 'a cat' is outside the shapes domain; write 'a {colour}"),
        (["--prompt", "a red ring on a gray background moving up"], "ref-flux makes still images; drop ' moving up'"),
        (["--video-prompt", "a red ring on a gray background"], "ref-wan makes clips; append ' moving left|right"),
        (["--video-prompt", "a red ring on a gray background moving sideways"], "unknown motion 'sideways'"),
        (["--models", "ref-sd"], "unknown reference model 'ref-sd'; choose from: ref-flux, ref-wan"),
        (
            ["--families", "flux", "--prompt", "a red ring on a gray background"],
            "the tiny families, which take no --prompt; drop it",
        ),
        (["--presets", "turbo"], "unknown preset 'turbo'"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    assert message in usage_error(capsys, ["demo", *argv, "--quiet"])


def test_build_loads_shipped_weights(tmp_path, monkeypatch):
    folder = tmp_path / "ref-wan"
    monkeypatch.setattr(reference, "path", lambda name: tmp_path / name)
    loaded = []
    monkeypatch.setattr(reference, "load", lambda name: loaded.append(name) or reference.untrained(name))
    assert reference_demo.build("ref-wan")[1] is False and not loaded
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    pipe, trained = reference_demo.build("ref-wan")
    assert trained and loaded == ["ref-wan"] and type(pipe).__name__ == "WanPipeline"


def test_profile_counts_one_pass_and_only_self_attention():
    pipe = reference.untrained("ref-wan")
    kwargs = reference.reference("ref-wan").call_kwargs(steps=1)
    with profiling(pipe) as profile:
        pipe("a red ring on a gray background moving up", generator=torch.Generator().manual_seed(0), **kwargs)
    result = profile()
    assert result.passes == 2  # one step, cond and uncond
    cfg = pipe.transformer.config
    tokens = 5 * 8 * 8  # 9 frames -> 5 latent frames of 16x16, patches 1x2x2
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    # QKᵀ and PV of each block's self-attention, batch 1; cross-attention to the text is not counted.
    assert result.attention_flops == cfg.num_layers * 2 * heads * tokens * tokens * 2 * dim
    assert len(result.block_flops) == cfg.num_layers and len(set(result.block_flops)) == 1
    assert result.attention_flops < sum(result.block_flops) < result.pass_flops


def test_flops_saved_estimate():
    profile = FlopProfile(pass_flops=100, block_flops=[20, 20, 20, 20], attention_flops=40, passes=8)
    cache = {"cache": {"calls": [{"computed": 4, "reused": 4}]}}
    sparse = {"sparse": {"mean_sparsity": 0.5, "sparse_calls": 6, "dense_warmup_calls": 2, "calls_left_dense": {}}}
    assert flops_saved(profile, None, 1) == 0.0
    assert flops_saved(profile, {"stats": {}}, 0) == 0.0
    # half the passes reused, each still running the 20 FLOPs outside the blocks and 1 head block of 20
    assert flops_saved(profile, {"stats": cache}, 1) == pytest.approx(0.5 * 0.6)
    # 40% of a pass is self-attention; 6 of 8 calls sparse at 50% skipped
    assert flops_saved(profile, {"stats": sparse}, 1) == pytest.approx(0.4 * 0.5 * 6 / 8)
    assert flops_saved(profile, {"stats": {**cache, **sparse}}, 1) == pytest.approx(0.3 + 0.5 * 0.15)


def test_gallery_panels_and_frames(tmp_path):
    images = [torch.full((3, 8, 6), v) for v in (0.0, 0.5, 1.0)]
    picture = Image.open(write_image_row(tmp_path / "a.png", images, ["x", "y", "a label far too long for it"], 2))
    assert picture.size == (3 * 6 * 2 + 2 * GAP, LABEL_HEIGHT + 8 * 2)
    for i, v in enumerate((0, 128, 255)):
        assert picture.getpixel((i * (12 + GAP) + 5, LABEL_HEIGHT + 7)) == (v, v, v)
    clips = [torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert Image.open(write_clip_row(tmp_path / "a.gif", clips, ["x", "y"])).n_frames == 5
    with pytest.raises(UnsupportedInputError, match="one label per panel"):
        write_image_row(tmp_path / "b.png", images, ["x"])
    with pytest.raises(UnsupportedInputError, match=r"\[F, 3, H, W\]"):
        write_clip_row(tmp_path / "b.gif", images, ["x", "y", "z"])
