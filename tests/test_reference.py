"""The reference pipelines (accel.zoo.reference) and their trainer (accel.zoo.train): real FluxPipeline /
WanPipeline classes, the compact-padding identity the trainer relies on, a few-step training run that saves,
resumes and loads, and the shipped weights."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from accel.bench.prompt_eval import eval_prompts, outputs
from accel.zoo import reference as references
from accel.zoo import shapes, train
from accel.zoo._base import UnknownModelError
from accel.zoo._train_data import PromptFeatures, all_prompts, compact_text, prompt_features
from accel.zoo._train_steps import CountedPads, foreground, reconstruction_loss, sample_sigmas

PROMPT = {"image": "a red circle on a navy background", "video": "a red circle on a navy background moving left"}


def _full_and_compact(pipe, ref, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's output on a prompt padded to `length` the way the pipeline pads it, and on the compact
    form the trainer uses (real tokens, one pad weighted by log N, one masked filler)."""
    prompt = PROMPT[ref.kind]
    features = prompt_features(pipe, ref, [prompt])
    n = len(features.tokens[0])
    text = torch.cat([features.tokens[0], features.pad[None], features.pad[None]])[None]
    bias = torch.tensor([[0.0] * n + [math.log(length - n), float("-inf")]])
    gen = torch.Generator().manual_seed(0)
    transformer = pipe.transformer
    if ref.kind == "image":
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=length)
        latents = FluxPipeline._pack_latents(torch.randn(1, 4, 16, 16, generator=gen), 1, 4, 16, 16)
        ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
        common = dict(hidden_states=latents, pooled_projections=pooled, timestep=torch.tensor([0.5]), img_ids=ids)
        full = transformer(encoder_hidden_states=embeds, txt_ids=torch.zeros(length, 3), **common).sample
        joint = torch.cat([bias, torch.zeros(1, latents.shape[1])], 1)[:, None, None, :]
        compact = transformer(
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3),
            joint_attention_kwargs={"attention_mask": joint},
            **common,
        ).sample
        return full, compact
    embeds, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=length)
    latents = torch.randn(1, 8, 5, 16, 16, generator=gen)
    full = transformer(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds).sample
    originals = [block.attn2.processor for block in transformer.blocks]
    for block in transformer.blocks:
        block.attn2.set_processor(CountedPads(block.attn2.processor))
        block.attn2.processor.bias = bias[:, None, None, :]
    compact = transformer(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
    for block, processor in zip(transformer.blocks, originals):
        block.attn2.set_processor(processor)
    return full, compact


@pytest.mark.parametrize("name", references.NAMES)
@pytest.mark.parametrize("length", [16, 77, 512])
def test_compact_padding_is_exact(name, length):
    ref = references.reference(name)
    full, compact = _full_and_compact(references.untrained(name), ref, length)
    assert torch.allclose(full, compact, atol=1e-5), (full - compact).abs().max()


def test_compact_padding_would_differ_without_the_pad_weight():
    """The log N weight is what makes the compact form exact: with N = 1 the output moves."""
    ref = references.reference("ref-flux")
    pipe = references.untrained("ref-flux")
    full, _ = _full_and_compact(pipe, ref, 512)
    other, _ = _full_and_compact(pipe, ref, 16)
    assert (full - other).abs().max() > 1e-3


def test_compact_text_layout():
    dim = 4
    features = PromptFeatures(
        tokens=[torch.ones(3, dim), torch.ones(1, dim)], pooled=None, pad=torch.zeros(dim), index={"x": 0, "": 1}
    )
    text, bias = compact_text(features, [0, 1], random.Random(0))
    assert text.shape == (2, 4, dim)
    assert bias[0, :3].eq(0).all() and bias[1, 0] == 0
    assert math.log(16 - 3) <= bias[0, 3] <= math.log(512 - 3)
    assert bias[1, 2:].eq(float("-inf")).all() and bias[1, 1] > 0


def test_short_share_pads_prompts_as_the_pipeline_call_does():
    features = PromptFeatures(tokens=[torch.ones(3, 4)], pooled=None, pad=torch.zeros(4), index={"x": 0})
    short = references.reference("ref-wan").call_kwargs()["max_sequence_length"]
    _, bias = compact_text(features, [0] * 64, random.Random(0), short_share=1.0)
    assert torch.allclose(bias[:, 3], torch.full((64,), math.log(short - 3)))
    _, bias = compact_text(features, [0] * 64, random.Random(0), short_share=0.5)
    shares = (bias[:, 3] == math.log(short - 3)).float().mean()
    assert 0.3 < shares < 0.7


def test_foreground_finds_the_shape_on_a_gradient_background():
    scene = shapes.Scene("yellow", "cross", "beige", gradient=True, cx=0.4, cy=0.6, size=0.4)
    x = shapes.render(scene, 64)[None] * 2 - 1
    plain = shapes.render(shapes.Scene("yellow", "cross", "beige", gradient=True, cx=0.4, cy=0.6, size=1e-3), 64)
    difference = (shapes.render(scene, 64) - plain).abs().sum(0)  # anti-aliased edges are small but not zero
    mask = foreground(x)[0, 0].bool()
    assert mask[difference > 0.1].all() and not mask[difference == 0].any() and mask.sum() > 300


def test_shape_weight_makes_errors_on_the_shape_cost_more():
    scene = shapes.Scene("red", "circle", "navy", cx=0.5, cy=0.5, size=0.3)
    x = shapes.render(scene, 32)[None] * 2 - 1
    wrong_shape = x.clone()
    wrong_shape[:, :, foreground(x)[0, 0].bool()] = 0.0  # the shape greyed out, background exact
    assert reconstruction_loss(wrong_shape, x, shape_weight=8.0) > 3 * reconstruction_loss(wrong_shape, x)
    assert reconstruction_loss(x, x, shape_weight=8.0) == 0


def test_sigma_mean_moves_the_training_noise_levels():
    gen = torch.Generator().manual_seed(0)
    assert sample_sigmas(4000, gen).median() == pytest.approx(0.5, abs=0.02)
    noisier = sample_sigmas(4000, gen, mean=0.5)
    assert (
        noisier.median() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.02) and 0 < noisier.min() < noisier.max() < 1
    )
    assert train.PLANS["ref-wan"].sigma_mean == 0.5 and train.PLANS["ref-flux"].sigma_mean == 0.0


def test_the_plans_budget_caps_the_transformer_by_what_the_vae_stages_left():
    plan = train.PLANS["ref-wan"]
    assert plan.minutes == 60.0 and train.PLANS["ref-flux"].minutes is None
    quiet = argparse.Namespace(minutes=None, quiet=True)
    left = plan.minutes - train.OVERHEAD_MINUTES - 20
    assert train.transformer_minutes(plan, quiet, spent=20 * 60) == pytest.approx(left)
    assert train.transformer_minutes(plan, quiet, spent=70 * 60) == train.MIN_TRANSFORMER_MINUTES
    assert train.transformer_minutes(plan, argparse.Namespace(minutes=7.0, quiet=True), spent=20 * 60) == 7.0
    assert train.transformer_minutes(train.PLANS["ref-flux"], quiet, spent=20 * 60) is None


def test_every_domain_prompt_is_in_vocabulary():
    pipe = references.untrained("ref-wan")
    for prompt in all_prompts(video=True)[:50]:
        assert pipe.tokenizer.unk_token_id not in pipe.tokenizer(prompt).input_ids
    assert len(all_prompts(video=False)) == 140 and len(all_prompts(video=True)) == 560


@pytest.mark.parametrize("name", references.NAMES)
def test_untrained_pipeline_runs_at_the_trained_size(name):
    ref = references.reference(name)
    pipe = references.untrained(name)
    result = outputs(pipe, ref, eval_prompts(ref, 2), steps=2)
    if ref.kind == "image":
        assert result.shape == (2, 3, 64, 64)
        assert pipe.default_sample_size * pipe.vae_scale_factor == 64  # a bare pipe("...") call makes 64x64
    else:
        assert result.shape == (2, 9, 3, 64, 64)
    assert 0 <= result.min() and result.max() <= 1


def test_unknown_reference_names_the_known_ones():
    with pytest.raises(UnknownModelError, match="ref-flux"):
        references.reference("ref-sdxl")


@pytest.mark.parametrize("name", references.NAMES)
def test_training_smoke_saves_resumes_and_loads(name, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    common = [name, "--work", str(work), "--out", str(out), "--dataset", "8", "--batch", "2", "--vae-batch", "2"]
    common += ["--decoder-steps", "1", "--quiet"]
    assert train.main([*common, "--vae-steps", "2", "--steps", "2"]) == 0
    first = torch.load(work / "transformer.pt", weights_only=False)
    assert first["step"] == 2
    assert train.main([*common, "--vae-steps", "2", "--steps", "3"]) == 0  # resumes: one more step, VAE kept
    assert torch.load(work / "transformer.pt", weights_only=False)["step"] == 3
    assert torch.load(work / "vae.pt", weights_only=False)["step"] == 2
    assert torch.load(work / "decoder.pt", weights_only=False)["step"] == 1
    stages = [json.loads(line)["stage"] for line in (work / "log.jsonl").read_text().splitlines()]
    assert stages == ["vae", "decoder", "transformer", "transformer"]
    pipe = DiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    assert type(pipe).__name__ == ("FluxPipeline" if name == "ref-flux" else "WanPipeline")
    weights = list(out.glob("transformer/*.safetensors"))
    assert weights and all(w.stat().st_size < 25 * 2**20 for w in weights)
    assert next(iter(pipe.transformer.state_dict().values())).dtype == torch.float32


def _shipped(name: str) -> bool:
    return (references.path(name) / "model_index.json").exists()


@pytest.mark.parametrize("name", references.NAMES)
def test_shipped_weights_load_offline_and_are_small(name):
    if not _shipped(name):
        pytest.skip(f"{name} has no shipped weights in this checkout")
    total = sum(p.stat().st_size for p in references.path(name).rglob("*.safetensors"))
    assert total < 25 * 2**20
    pipe = references.load(name)
    assert pipe.transformer.dtype == torch.float32


def test_stages_run_alone_and_later_runs_pick_them_up(tmp_path):
    """A stage run by itself (e.g. decoder fine-tuning beside a running transformer stage) is loaded by the next
    full run, which then only saves."""
    work, out = tmp_path / "work", tmp_path / "out"
    common = ["ref-flux", "--work", str(work), "--out", str(out), "--vae-batch", "2", "--vae-steps", "1", "--quiet"]
    assert train.main([*common, "--decoder-steps", "2", "--stages", "vae,decoder"]) == 0
    assert not out.exists()
    decoder = torch.load(work / "decoder.pt", weights_only=False)
    assert decoder["step"] == 2
    common += ["--decoder-steps", "2", "--dataset", "4", "--batch", "2", "--steps", "1"]
    assert train.main(common) == 0
    assert torch.load(work / "decoder.pt", weights_only=False)["step"] == 2  # not trained again
    pipe = DiffusionPipeline.from_pretrained(str(out))
    saved = pipe.vae.decoder.conv_out.weight.float()
    assert torch.allclose(saved, decoder["ema"]["decoder.conv_out.weight"].float().half().float())
    with pytest.raises(SystemExit, match="--stages"):
        train.main([*common, "--stages", "decoder"])


def test_load_without_weights_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(references, "WEIGHTS", tmp_path)
    with pytest.raises(UnknownModelError, match="python -m accel.zoo.train ref-flux"):
        references.load("ref-flux")


def test_shipped_ref_flux_follows_colour_and_background():
    """The trained ref-flux reads its prompts (measured on 100 prompts: colour 98%, background 100%)."""
    if not _shipped("ref-flux"):
        pytest.skip("ref-flux has no shipped weights in this checkout")
    from accel.bench.prompt_eval import prompt_following

    result = prompt_following(references.load("ref-flux"), references.reference("ref-flux"), n=10, progress=False)
    assert result["colour"] >= 0.8 and result["background"] >= 0.9, result


def test_fidelity_on_the_shipped_weights_reduced():
    """The fidelity benchmark's CI form on trained weights: one prompt, accel's default preset and a peer."""
    if not _shipped("ref-flux"):
        pytest.skip("ref-flux has no shipped weights in this checkout")
    from accel.bench.fidelity import run_fidelity

    methods = ["baseline", "accel balanced", "diffusers TaylorSeer 2"]
    result = run_fidelity(["ref-flux"], seeds=1, methods=methods, weights="trained", progress=False)
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == set(methods) and all(row["weights"] == "trained" for row in rows.values())
    balanced = rows["accel balanced"]
    assert balanced["computed"] < rows["baseline"]["computed"] == 40
    assert balanced["psnr_db"] >= 30, balanced


def test_snapshots_score_how_the_model_grew(tmp_path):
    """--snapshot-every saves the transformer's EMA weights along the way; prompt_eval's growth scores each,
    loaded into the trained pipeline, with its step and training minutes."""
    from accel.bench import prompt_eval

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["ref-flux", "--work", str(work), "--out", str(out), "--vae-batch", "2", "--vae-steps", "1"]
    args += ["--dataset", "4", "--batch", "2", "--steps", "2", "--snapshot-every", "1", "--quiet"]
    assert train.main(args) == 0
    snapshots = sorted((work / "snapshots").glob("transformer-*.pt"))
    assert [s.name for s in snapshots] == ["transformer-000001.pt", "transformer-000002.pt"]
    first, last = (torch.load(s, weights_only=True) for s in snapshots)
    assert all(v.dtype == torch.float16 for v in first.values() if v.is_floating_point())
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the EMA moved between them
    ref = references.reference("ref-flux")
    pipe = references.configured(DiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32), ref)
    rows = prompt_eval.growth(pipe, ref, work, n=2, steps=1, progress=False)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["n"] == 2 and 0 <= r["colour"] <= 1 for r in rows)
    assert 0 <= rows[0]["minutes"] <= rows[1]["minutes"]
    plain = tmp_path / "plain"
    assert train.main([*args[:-3], "--work", str(plain), "--quiet"]) == 0  # no --snapshot-every
    with pytest.raises(FileNotFoundError, match="snapshot-every"):
        prompt_eval.growth(pipe, ref, plain)


def test_vae_from_a_saved_pipeline_retrains_the_transformer_alone(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    common = ["ref-flux", "--vae-batch", "2", "--vae-steps", "1", "--dataset", "4", "--batch", "2", "--quiet"]
    assert train.main([*common, "--work", str(first / "work"), "--out", str(first / "out"), "--steps", "1"]) == 0
    args = [*common, "--work", str(again / "work"), "--out", str(again / "out"), "--steps", "2"]
    assert train.main([*args, "--vae-from", str(first / "out")]) == 0
    assert not (again / "work" / "vae.pt").exists()  # no VAE stage ran
    vaes = [DiffusionPipeline.from_pretrained(str(f / "out"), torch_dtype=torch.float32).vae for f in (first, again)]
    for (name, a), b in zip(vaes[0].state_dict().items(), vaes[1].state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.load(again / "work" / "transformer.pt", weights_only=False)["step"] == 2


def test_the_gpu_training_script_trains_and_scores_both_models(tmp_path):
    """benchmarks/train_reference_gpu.sh end to end, made a CPU smoke run by trainer arguments after `--`."""
    script = Path(__file__).parents[1] / "benchmarks" / "train_reference_gpu.sh"
    smoke = ["--device", "cpu", "--threads", "1", "--vae-steps", "1", "--decoder-steps", "1", "--steps", "1"]
    smoke += ["--vae-batch", "2", "--batch", "2", "--dataset", "4"]
    command = ["bash", str(script), "--budget", "60", "--out", str(tmp_path), "--score-prompts", "2", "--", *smoke]
    done = subprocess.run(command, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in references.NAMES:
        assert (tmp_path / name / "model_index.json").exists()
        scores = json.loads((tmp_path / f"{name}-scores.json").read_text())
        assert scores["n"] == 2 and 0 <= scores["colour"] <= 1
