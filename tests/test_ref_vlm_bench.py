"""ref-vlm's trainer (a few tiny steps that save, resume and load) and the pruning accuracy benchmark on a few
held-out questions with random weights (what CI runs before trained weights exist): rows for every method and
budget, the baselines' token counts, FLOPs falling with the budget, the files and the CLI."""

import json
import re

import pytest
import torch

from accel.bench import pruning_accuracy as pa
from accel.bench.pruning_baselines import Baseline
from accel.bench.pruning_report import markdown, write
from accel.cli import main as cli_main
from accel.zoo import reference_vlm, scenes_multi, train_vlm
from accel.zoo._vlm_train_data import make_batch
from accel.zoo._vlm_vision_stage import WORD_NORM, even_word_norms, vision_batch, vision_features


def test_training_smoke_saves_resumes_and_loads(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    common = ["--work", str(work), "--out", str(out), "--scenes", "2", "--questions", "2", "--validation", "3"]
    common += ["--no-held-out", "--quiet", "--vision-steps", "0", "--finish-steps", "0"]
    assert train_vlm.main([*common, "--steps", "2", "--eval-minutes", "0"]) == 0  # validates, so logs, every step
    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 2
    assert train_vlm.main([*common, "--steps", "3"]) == 0  # resumes: one more step
    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 3
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    finals = [r["final"] for r in records if "final" in r]
    assert [f["step"] for f in finals] == [2, 3] and finals[-1]["validation"]["n"] == 3
    steps = [r for r in records if "lookup_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["lookup_loss"] > 0 for r in steps)  # on by default
    model, processor = reference_vlm.load(out)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert len(reference_vlm.predict(model, processor, scenes_multi.held_out(1, 0))) == 1

    # --init --steps 0: the last stage alone on saved weights (here the run above), from step 0 of its schedule
    more, again = tmp_path / "more", tmp_path / "again"
    args = [*common[4:], "--work", str(more), "--out", str(again), "--init", str(out), "--steps", "0"]
    args += ["--finish-steps", "1", "--finish-lr", "0"]
    assert train_vlm.main(args) == 0
    start = torch.load(more / "checkpoint.pt", weights_only=False)
    assert start["step"] == 1 and start["finish_from"] == 0
    for name, value in model.state_dict().items():  # lr 0: still the weights it started from
        torch.testing.assert_close(start["model"][name], value, msg=name)


def test_the_vision_stage_trains_the_tower_alone_first_and_resumes(tmp_path, monkeypatch):
    """--vision-steps: the vision tower (and the word embeddings the token loss scores against) train alone, the
    language model's layers do not move and no question is drawn; then the language model's stages run from step
    0 of their schedule, on an optimiser of their own; a run stopped inside the stage resumes in it."""
    work = tmp_path / "work"
    common = ["--work", str(work), "--out", str(tmp_path / "out"), "--scenes", "2", "--questions", "2"]
    common += ["--validation", "3", "--no-held-out", "--quiet", "--finish-steps", "0", "--video-share", "0.5"]
    drawn = []
    monkeypatch.setattr(train_vlm, "make_batch", lambda *a, **k: drawn.append(a[1]) or make_batch(*a, **k))
    untrained = reference_vlm.untrained(seed=0)[0].state_dict()
    assert train_vlm.main([*common, "--vision-steps", "2", "--steps", "0"]) == 0
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    assert (state["vision_step"], state["step"], drawn) == (2, 0, [])
    for name, value in untrained.items():
        trains = name.startswith("model.visual.") or "embed_tokens" in name or name == "lm_head.weight"
        assert torch.equal(state["model"][name], value) != trains, name
    assert not state["optimizer"]["state"]  # the language model's stages start from a new optimiser
    words = next(value for name, value in state["model"].items() if "embed_tokens" in name)
    lengths = words.norm(dim=1)
    torch.testing.assert_close(lengths[lengths > 0], torch.full_like(lengths[lengths > 0], WORD_NORM))
    assert train_vlm.main([*common, "--vision-steps", "3", "--steps", "1"]) == 0  # resumes: one more, then the LM
    again = torch.load(work / "checkpoint.pt", weights_only=False)
    assert (again["vision_step"], again["step"], again["lm_from"], drawn) == (3, 1, 0, [0])
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["vision_step"] for r in records if "vision_step" in r] == [2, 3]


def test_even_word_norms_keeps_directions_and_the_zero_row():
    model = reference_vlm.untrained(seed=0)[0]
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[0] = 0
        weight[1] *= 50  # a word the token loss grew
    before = weight.detach().clone()
    even_word_norms(model, 2.0)
    after = model.get_input_embeddings().weight.detach()
    assert torch.equal(after[0], before[0])
    torch.testing.assert_close(after[1:].norm(dim=1), torch.full((len(after) - 1,), 2.0))
    torch.testing.assert_close(after[1:] / 2.0, before[1:] / before[1:].norm(dim=1, keepdim=True))
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied: the output layer is evened too


def test_vision_features_equal_the_tower_on_each_scene_alone():
    model = reference_vlm.untrained(seed=0)[0].eval()
    for video in (False, True):
        inputs, targets = vision_batch(0, 0, 4, float(video))
        with torch.no_grad():
            together = vision_features(model, inputs)
            alone = []
            for pixels, grid in zip(inputs["pixels"].chunk(len(inputs["grid"])), inputs["grid"]):
                out = model.model.visual(pixels, grid_thw=grid[None])
                alone.append(getattr(out, "pooler_output", out))
        torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)
        assert len(targets["colour"]) == len(together)
        assert bool((targets["motion"] != -100).any()) == video


def test_workers_draw_the_same_batches_as_the_training_process(tmp_path, monkeypatch):
    """--workers (a GPU's scenes drawn ahead in other processes) trains on exactly the batches drawn in-process
    while the schedule leaves the scenes' settings alone (the curriculum of 3 steps would change them each step)."""
    monkeypatch.setattr(train_vlm, "CURRICULUM", ())
    common = ["--scenes", "2", "--questions", "2", "--validation", "3", "--no-held-out", "--quiet"]
    common += ["--vision-steps", "0"]
    common += ["--finish-steps", "0", "--steps", "3"]
    weights = []
    for workers in ("0", "2"):
        work = tmp_path / workers
        assert train_vlm.main([*common, "--work", str(work), "--out", str(tmp_path / "out"), "--workers", workers]) == 0
        weights.append(torch.load(work / "checkpoint.pt", weights_only=False)["model"])
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, msg=name)


def test_learning_rate_warms_up_and_decays_and_curriculum_grows():
    rates = [train_vlm.learning_rate(s, 1000, 1e-3) for s in (0, 50, 100, 500, 1000)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3) and rates[3] < rates[2] and rates[4] < rates[3]
    assert [train_vlm.max_shapes(s, 1000) for s in (0, 100, 500)] == [2, 3, None]


def test_a_time_cap_drives_the_schedule_when_it_ends_before_the_last_step():
    steps, peak = 10**6, 1e-3
    assert train_vlm.learning_rate(50, steps, peak, time_share=0.9) < peak  # warm-up still by steps
    assert train_vlm.learning_rate(500, steps, peak, time_share=0.5) == pytest.approx(0.525 * peak)
    assert train_vlm.learning_rate(500, steps, peak, time_share=1.0) == pytest.approx(0.05 * peak)
    assert train_vlm.learning_rate(500, steps, peak) > 0.99 * peak  # without a cap: still at the peak
    assert [train_vlm.max_shapes(500, steps, t) for t in (0.0, 0.1, 0.5)] == [2, 3, None]


@pytest.mark.parametrize("vision_lr", [0.0, 0.5])
def test_fresh_language_model_stage_redraws_the_lm_and_resumes(tmp_path, vision_lr):
    work = tmp_path / "work"
    common = ["--work", str(work), "--out", str(tmp_path / "out"), "--scenes", "2", "--questions", "2"]
    common += ["--validation", "3", "--no-held-out", "--quiet", "--vision-steps", "0", "--finish-steps", "0"]
    common += ["--fresh-vision-lr", str(vision_lr)]
    assert train_vlm.main([*common, "--fresh-lm-at", "1", "--steps", "1"]) == 0  # no fresh language model
    before = torch.load(work / "checkpoint.pt", weights_only=False)
    assert before["lm_from"] is None
    common += ["--fresh-lm-at", "0"]
    assert train_vlm.main([*common, "--steps", "2"]) == 0  # from step 1 on: the fresh language model
    after = torch.load(work / "checkpoint.pt", weights_only=False)
    assert after["lm_from"] == 1
    for name, value in before["model"].items():
        frozen = (
            "embed_tokens" in name or name == "lm_head.weight" or (name.startswith("model.visual.") and not vision_lr)
        )
        assert torch.equal(after["model"][name], value) == frozen, name
    scales = [group["scale"] for group in after["optimizer"]["param_groups"]]
    assert scales == ([1.0, vision_lr] if vision_lr else [1.0])
    assert train_vlm.main([*common, "--steps", "3"]) == 0  # resumes inside the stage
    again = torch.load(work / "checkpoint.pt", weights_only=False)
    assert again["step"] == 3 and again["lm_from"] == 1
    merger = "model.visual.merger.mlp.0.weight"
    assert torch.equal(again["model"][merger], after["model"][merger]) == (not vision_lr)


def test_the_last_stage_trains_everything_on_its_own_schedule_and_resumes(tmp_path, monkeypatch):
    work = tmp_path / "work"
    common = ["--work", str(work), "--out", str(tmp_path / "out"), "--scenes", "2", "--questions", "2"]
    common += ["--validation", "3", "--no-held-out", "--quiet", "--vision-steps", "0"]
    common += ["--fresh-lm-at", "0", "--fresh-vision-lr", "0"]
    common += ["--finish-lr", "3e-4", "--finish-video-share", "1", "--steps", "2"]
    seen = []  # (step, video share) of every batch drawn
    monkeypatch.setattr(train_vlm, "make_batch", lambda *a, **k: seen.append((a[1], a[4])) or make_batch(*a, **k))
    assert train_vlm.main([*common, "--finish-steps", "0"]) == 0  # the two stages before it
    before = torch.load(work / "checkpoint.pt", weights_only=False)
    assert before["lm_from"] == 0 and before["finish_from"] is None
    assert train_vlm.main([*common, "--finish-steps", "2"]) == 0  # resumes into the last stage: two more steps
    after = torch.load(work / "checkpoint.pt", weights_only=False)
    assert after["step"] == 4 and after["finish_from"] == 2
    assert [share for _, share in seen] == [0.25, 0.25, 1.0, 1.0]
    for name in ("model.language_model.embed_tokens.weight", "model.visual.merger.mlp.0.weight"):
        assert not torch.equal(after["model"][name], before["model"][name]), name  # trains again
    groups = after["optimizer"]["param_groups"]
    assert [g["scale"] for g in groups] == [1.0, 1.0]
    assert groups[0]["lr"] == pytest.approx(2 * 3e-4 / train_vlm.WARMUP)  # its own warm-up from its own peak
    assert train_vlm.main([*common, "--finish-steps", "3"]) == 0  # resumes inside it
    again = torch.load(work / "checkpoint.pt", weights_only=False)
    assert again["step"] == 5 and again["finish_from"] == 2 and seen[-1] == (4, 1.0)


def test_the_fresh_language_model_has_its_own_warm_up_and_decay():
    steps, peak, stage = 1000, 1e-3, (640, 0.6, 1.0)  # progress 0.6 = step 100 + 0.6 * 900
    assert train_vlm.progress(640, steps, 0.0) == pytest.approx(0.6)
    first = train_vlm.learning_rate(639, steps, peak, stage=(0, 0.0, 0.6))
    assert first == pytest.approx(0.05 * peak, rel=0.01)  # the first stage has decayed by its end
    assert train_vlm.learning_rate(640, steps, peak, stage=stage) == pytest.approx(peak / train_vlm.WARMUP)
    later = [train_vlm.learning_rate(s, steps, peak, stage=stage) for s in (739, 740, 900)]
    assert later[0] == later[1] == pytest.approx(peak) and later[2] < later[1]  # warmed up again, then decaying
    assert train_vlm.learning_rate(1000, steps, peak, stage=stage) == pytest.approx(0.05 * peak)


@pytest.fixture(scope="module")
def result():
    names = ["accel", "accel no temporal", "accel cls score", "accel in_lm layer 1", "random keep", "uniform pooling"]
    return pa.run_pruning(questions=4, weights="random", names=names, repeats=1, progress=False)


def test_suite_rows_cover_every_method_and_budget(result):
    assert result["weights"] == "random" and result["questions"] == 4 and result["videos"] == 1
    rows = {(r["method"], r["keep_ratio"]): r for r in result["rows"]}
    assert rows[("keep-all", 1.0)]["tokens_kept_per_image"] == 256
    assert rows[("keep-all", 1.0)]["tokens_kept_per_video"] == 512
    for name in ("accel", "accel no temporal", "accel in_lm layer 1", "random keep", "uniform pooling"):
        for ratio in pa.RATIOS:
            if (name, ratio) == ("uniform pooling", 0.375):  # no grid of equal blocks keeps 3/8
                continue
            row = rows[(name, ratio)]
            assert row["status"] == "ok" and 0 <= row["accuracy"] <= 1
            assert row["tokens_kept_per_image"] == pytest.approx(256 * ratio, abs=1)
            assert {"prefill_ms_image", "prefill_ms_video", "share_of_keep_all"} <= set(row) or row["accuracy"] == 0
    assert rows[("accel cls score", 0.25)]["status"].startswith("unsupported: ")
    assert rows[("uniform pooling", 0.375)]["status"].startswith("unsupported: uniform pooling takes")
    flops = [rows[("keep-all", 1.0)]["prefill_gflops_image"]]
    flops += [rows[("accel", r)]["prefill_gflops_image"] for r in sorted(pa.RATIOS, reverse=True)]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == len(flops)
    # FastV-style pruning runs its first layer on every token: more FLOPs than pruning before the LM
    assert rows[("accel in_lm layer 1", 0.25)]["prefill_gflops_image"] > rows[("accel", 0.25)]["prefill_gflops_image"]
    # temporal folding merges the static background before the budget: fewer video tokens than the budget
    assert rows[("accel no temporal", 0.5)]["tokens_kept_per_video"] == 256


def test_report_files_and_tables(result, tmp_path):
    text = markdown(result)
    assert "| keep-all |" in text and "| uniform pooling |" in text and "unsupported" in text
    assert re.search(r"\| random keep \| \| \d+\.\d \(\d+\.\d-\d+\.\d\) \|", text)  # mean of the draws (range)
    written = write(result, tmp_path)
    assert json.loads((tmp_path / "pruning.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "pruning.md").read_text() == text
    assert written["plot"].endswith("pruning.png") and (tmp_path / "pruning.png").stat().st_size > 0


def test_a_random_method_is_the_mean_of_its_draws(monkeypatch):
    seeds = []

    def fake(model, processor, questions, method, ratio, *, seed, batch_size):
        seeds.append(seed)
        return {"accuracy": seed / 10, "n": 4, "_lengths_image": (300, 100)}

    monkeypatch.setattr(pa, "evaluate", fake)
    method = next(m for m in pa.methods() if m.name == "random keep")
    row = pa.evaluate_draws(None, None, [], method, 0.25, seed=2, batch_size=16)
    assert seeds == [2, 3, 4, 5, 6] and method.draws == pa.RANDOM_DRAWS == 5
    assert row["accuracy"] == pytest.approx(0.4) and row["accuracy_range"] == [0.2, 0.6] and row["draws"] == 5
    assert row["n"] == 4 and isinstance(row["n"], int) and row["_lengths_image"] == (300, 100)
    seeds.clear()
    keep_all = pa.evaluate_draws(None, None, [], None, 1.0, seed=7, batch_size=16)
    assert seeds == [7] and keep_all == {"accuracy": 0.7, "n": 4, "_lengths_image": (300, 100)}  # one evaluation


def test_baselines_keep_the_budget_and_pool_blocks():
    model, processor = reference_vlm.untrained(seed=0)
    batch = reference_vlm.inputs(processor, scenes_multi.held_out(1, 0))
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    lm = model.model.language_model
    with torch.no_grad():
        hook = lm.register_forward_pre_hook(capture, with_kwargs=True)
        model(**batch)
        hook.remove()
        full = seen["inputs_embeds"].clone(), seen["position_ids"].clone()
        with Baseline(model, "pooling", 0.25) as b:
            hook = lm.register_forward_pre_hook(capture, with_kwargs=True)  # after the baseline's: sees its output
            model(**batch)
            hook.remove()
    assert b.visual_kept == 64 and seen["inputs_embeds"].shape[1] == full[0].shape[1] - 192
    start = int((batch["mm_token_type_ids"][0] > 0).nonzero()[0])
    grid = full[0][0, start : start + 256].view(16, 16, -1)
    torch.testing.assert_close(seen["inputs_embeds"][0, start], grid[:2, :2].reshape(4, -1).mean(0))
    torch.testing.assert_close(seen["position_ids"][:, 0, start + 1], full[1][:, 0, start + 2])  # next block's first
    with pytest.raises(ValueError, match="pooling takes"):
        Baseline(model, "pooling", 0.3)


def test_cli_suite_writes_its_folder(tmp_path, capsys):
    args = ["bench", "--suite", "pruning", "--questions", "4", "--weights", "random", "--methods", "random keep"]
    assert cli_main([*args, "--out", str(tmp_path), "--quiet", "--repeats", "1"]) == 0
    assert "| random keep |" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} >= {"pruning.json", "pruning.md"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--suite", "pruning", "--family", "flux"], "drop --family/--pipeline/--attention"),
        (["bench", "--suite", "pruning", "--methods", "nope"], "unknown pruning method 'nope'"),
        (["bench", "--suite", "pruning", "--questions", "2"], "at least 4"),
        (["bench", "--suite", "pruning", "--seeds", "2"], "--seeds: only with --suite fidelity"),
        (["bench", "--family", "flux", "--questions", "3"], "--questions: only with --suite pruning"),
    ],
)
def test_cli_suite_mistakes_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accel: error: ") and message in err and "\n" not in err
