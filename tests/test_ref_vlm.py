"""ref-vlm (issue 13): the multi-shape question generator, the real Qwen2-VL classes and processor saved and loaded
offline, the training layout against the processor's, and accel's pruning on the model (random weights)."""

import copy
import json
import random

import pytest
import torch

from accel import zoo
from accel.pruning import PruneConfig
from accel.zoo import _vlm_processor as vp
from accel.zoo import _vlm_train_data as td
from accel.zoo import reference_vlm, scenes_multi
from accel.zoo._base import UnknownModelError, UnsupportedInputError


@pytest.fixture(scope="module")
def untrained():
    return reference_vlm.untrained(seed=0)


def test_held_out_set_is_fixed_balanced_and_in_vocabulary():
    first, again = scenes_multi.held_out(), scenes_multi.held_out()
    assert len(first) == 300 and first == again
    assert sum(q.video for q in first) == 75
    assert scenes_multi.held_out(10, 5) == first[:10] + first[225:230]  # smaller sets are prefixes
    assert {q.type for q in first if not q.video} == set(scenes_multi.IMAGE_TYPES)
    assert {q.type for q in first if q.video} == set(scenes_multi.TYPES)
    vocab = set(vp.vocabulary())
    assert all(w in vocab for q in first for w in [*q.text.split(), q.answer])
    assert set(scenes_multi.answers()) <= vocab
    assert torch.equal(scenes_multi.render(first[3].scene), scenes_multi.render(again[3].scene))
    validation = scenes_multi.question_set(scenes_multi.VALIDATION_SEED, 50, 0)
    assert not {q.scene for q in validation} & {q.scene for q in first}


def test_scenes_have_distinct_cells_and_colours_and_answers_match_them():
    rng = random.Random(5)
    for video in (False, True):
        for _ in range(40):
            scene = scenes_multi.sample_scene(rng, video)
            cells = [item.cell for item in scene.items]
            assert len(set(cells)) == len(cells) and len({i.colour for i in scene.items}) == len(cells)
            for q in scenes_multi.questions(scene):
                if q.type == "count":
                    assert q.answer == str(len(scene.items))
                if q.type == "horizontal":  # the named shape's centre is on the answer's side at every frame
                    item = next(i for i in scene.items if q.text.split()[2] == i.colour)
                    assert (item.cx < 0.5) == (q.answer == "left")
    with pytest.raises(UnsupportedInputError, match="1 to 3 shapes"):
        scenes_multi.sample_scene(rng, True, count=4)


def test_render_draws_each_shape_in_its_cell_and_videos_move():
    scene = scenes_multi.MultiScene(
        "black", False, (scenes_multi.Placed("red", "square", 3, 0.75, 0.75, 0.3, "left"),), video=True
    )
    clip = scenes_multi.render(scene)
    assert clip.shape == (scenes_multi.FRAMES, 3, 128, 128) and clip.dtype == torch.uint8
    red = clip[:, 0].float() > 128
    assert not red[:, :64].any() and not red[:, :, :64].any()  # only in the bottom-right cell
    columns = [frame.nonzero()[:, 1].float().mean() for frame in red]
    assert columns[0] > columns[1] > columns[2] > columns[3]  # moving left


def test_processor_is_qwen2_vl_and_training_rows_are_the_chat_template(untrained):
    model, processor = untrained
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    for video in (0.0, 1.0):
        batch = td.make_batch(0, 1, scenes=2, per_scene=2, video_share=video)
        full = reference_vlm.inputs(processor, batch.questions)
        answer_at = (batch.labels != td.IGNORE).int().argmax(1)
        for i in range(len(batch.questions)):
            ids = full["input_ids"][i][full["attention_mask"][i].bool()].tolist()
            assert ids == batch.prefix["input_ids"][i // 2].tolist() + batch.ids[i, : answer_at[i]].tolist()
        key = "pixel_values_videos" if video else "pixel_values"
        per_scene = batch.prefix[key].shape[0] // 2
        assert torch.equal(full[key][:per_scene], batch.prefix[key][:per_scene])
        tokens = reference_vlm.VIDEO_TOKENS if video else reference_vlm.IMAGE_TOKENS
        assert int((full["mm_token_type_ids"][0] > 0).sum()) == tokens


def test_video_patches_keep_channel_time_row_column_order():
    frames = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    rows = vp.processor().video_processor([frames], return_tensors="pt")["pixel_values_videos"]
    assert rows.shape == (4, 3 * 2 * 8 * 8)
    normal = vp.normalise(frames[0]), vp.normalise(frames[1])
    patch = rows[1].view(3, 2, 8, 8)  # second patch of the first row: rows 0-7, columns 8-15
    assert torch.allclose(patch[:, 0], normal[0][:, :8, 8:]) and torch.allclose(patch[:, 1], normal[1][:, :8, 8:])


def _packed_matching_one_prompt_at_a_time(model, processor, batch):
    """`packed_forward`'s output and features, after checking its logits where each answer starts against the
    model's on each prompt alone."""
    with torch.no_grad():
        packed, features, _ = td.packed_forward(model, batch)
        single = model(**reference_vlm.inputs(processor, batch.questions)).logits[:, -1]
    answer_at = (batch.labels != td.IGNORE).int().argmax(1)
    rows = torch.arange(len(batch.questions))
    torch.testing.assert_close(packed.logits[rows, answer_at - 1], single, atol=1e-5, rtol=1e-4)
    return packed, features


def test_packed_training_forward_matches_one_prompt_at_a_time(untrained):
    model, processor = untrained
    batch = td.make_batch(0, 2, scenes=2, per_scene=3, video_share=0.0)
    packed, features = _packed_matching_one_prompt_at_a_time(model, processor, batch)
    assert torch.isfinite(packed.loss)
    assert features.shape == (2 * reference_vlm.IMAGE_TOKENS, model.config.text_config.hidden_size)
    plain = td.token_loss(model, features, batch.targets)
    assert torch.isfinite(plain)
    # an image has no motion term: colour and shape are averaged, each scaled by its weight
    terms = [td.token_loss(model, features, batch.targets, {"colour": 1, "shape": 0}) * 2]
    terms.append(td.token_loss(model, features, batch.targets, {"colour": 0, "shape": 1}) * 2)
    torch.testing.assert_close(plain, sum(terms) / 2)
    weighted = td.token_loss(model, features, batch.targets, {"shape": 4.0, "motion": 12.0})
    torch.testing.assert_close(weighted, (terms[0] + 4 * terms[1]) / 2)


def test_packed_questions_of_a_video_see_the_prefix_and_themselves_only(untrained):
    model, processor = untrained
    batch = td.make_batch(0, 5, scenes=4, per_scene=4, video_share=1.0)  # two videos, four questions each
    assert all(q.video for q in batch.questions)
    _, features = _packed_matching_one_prompt_at_a_time(model, processor, batch)
    assert features.shape[0] == 2 * reference_vlm.VIDEO_TOKENS


def test_packed_prefix_runs_the_vit_attention_once_per_block_for_all_scenes(untrained, monkeypatch):
    """The training forward's ViT: one attention call per block over every scene's temporal patches (a GPU step is
    otherwise bound by launching a few operations per scene), with each scene's features as the tower gives them
    alone, and the tower's attention implementation left as it was."""
    model, _ = untrained
    calls = []

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return segment_attention(module, query, *args, **kwargs)

    segment_attention = td._segment_attention
    monkeypatch.setattr(td, "_segment_attention", counting)
    batch = td.make_batch(0, 5, scenes=4, per_scene=2, video_share=1.0)  # two videos
    with torch.no_grad():
        _, features, _ = td.packed_forward(model, batch)
        alone = [
            model.model.visual(pixels, grid_thw=grid[None]).pooler_output
            for pixels, grid in zip(
                batch.prefix["pixel_values_videos"].chunk(2), batch.prefix["video_grid_thw"], strict=True
            )
        ]
    assert calls == [2 * reference_vlm.VIDEO_TOKENS] * model.config.vision_config.depth
    torch.testing.assert_close(features, torch.cat(alone), atol=1e-5, rtol=1e-4)
    assert model.model.visual.config._attn_implementation == "sdpa"


def test_segment_attention_refuses_unequal_segments():
    query = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="equal segments"):
        td._segment_attention(None, query, query, query, cu_seq_lens_q=torch.tensor([0, 4, 10]), max_length_q=6)


def test_saved_folder_loads_offline_with_from_pretrained(untrained, tmp_path, monkeypatch):
    model, processor = untrained
    reference_vlm.save(model, processor, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 40 * 2**20
    video_config = json.loads((tmp_path / "processor_config.json").read_text())["video_processor"]
    assert video_config["video_processor_type"] == "Qwen2VLVideoProcessor" and video_config["patch_size"] == vp.PATCH
    loaded, loaded_processor = zoo.load("ref-vlm", folder=tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    questions = scenes_multi.held_out(3, 2)
    rounded = copy.deepcopy(model).half().float()  # the saved weights went through float16
    expected = reference_vlm.predict(rounded, processor, questions)
    assert reference_vlm.predict(loaded, loaded_processor, questions) == expected
    with pytest.raises(UnknownModelError, match="train_vlm"):
        reference_vlm.load(tmp_path / "missing")


@pytest.mark.parametrize("where", ["before_lm", "in_lm"])
def test_accel_pruning_patches_ref_vlm_and_reports_what_it_kept(untrained, patched, where):
    model, processor = untrained
    questions = scenes_multi.held_out(2, 0) + scenes_multi.held_out(0, 1)
    handle = patched(model, prune=PruneConfig(keep_ratio=0.25, where=where, layer=1))
    answers = reference_vlm.predict(model, processor, questions, batch_size=3)
    assert len(answers) == 3
    last = handle.report().stats["prune"]["last_call"]
    assert last["visual_tokens_in"] == [256, 256, 512]
    assert last["visual_tokens_kept"] == [64, 64, 128]
    assert last["sequence_out"] < last["sequence_in"]
    if where == "before_lm":  # the static background folds into the first temporal patch
        assert last["video_tokens_merged"] > 0


def test_token_targets_name_what_each_visual_token_shows():
    scene = scenes_multi.MultiScene(
        "navy", False, (scenes_multi.Placed("cyan", "ring", 1, 0.75, 0.25, 0.3, "up"),), video=True
    )
    targets = td.token_targets(scene)
    assert all(t.shape == (reference_vlm.VIDEO_TOKENS,) for t in targets.values())
    first = {k: v[:256].view(16, 16) for k, v in targets.items()}
    words = {k: list(v) for k, v in td.TOKEN_WORDS.items()}
    assert words["colour"][first["colour"][0, 0]] == "navy" and first["shape"][0, 0] == td.IGNORE
    hit = first["shape"] != td.IGNORE
    assert hit.any() and not hit[:, :8].any() and not hit[8:].any()  # only in the top-right cell
    assert {words["colour"][i] for i in first["colour"][hit].tolist()} == {"cyan"}
    assert {words["shape"][i] for i in first["shape"][hit].tolist()} == {"ring"}
    assert {words["motion"][i] for i in first["motion"][hit].tolist()} == {"up"}
    assert torch.equal(first["owner"] == 0, hit) and set(first["owner"].unique().tolist()) == {-1, 0}


def test_position_loss_names_each_visual_tokens_cell_after_the_first_decoder_layer(untrained):
    targets = td.position_targets(2 * 256, 16)
    words = {k: [v[i] for i in targets[k].tolist()] for k, v in td.POSITION_WORDS.items()}
    for token, place in {
        0: ("top", "left"),
        15: ("top", "right"),
        16 * 8: ("bottom", "left"),
        255: ("bottom", "right"),
    }.items():
        assert (words["vertical"][token], words["horizontal"][token]) == place
        assert (words["vertical"][token + 256], words["horizontal"][token + 256]) == place  # second temporal patch
    model = copy.deepcopy(untrained[0])
    batch = td.make_batch(0, 1, scenes=2, per_scene=2, video_share=0.0)
    _, _, hidden = td.packed_forward(model, batch)
    assert hidden.shape == (2, 4 + reference_vlm.IMAGE_TOKENS, model.config.text_config.hidden_size)
    td.position_loss(model, hidden, batch).backward()
    layers = model.model.language_model.layers
    assert layers[td.POSITION_LAYER].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layers[td.POSITION_LAYER + 1 :].parameters())


def test_default_preset_prunes_ref_vlm_and_lossless_does_not(untrained, patched):
    """`accel.patch(vlm)` does something for VLMs: the default preset's pruning budget, shown in the report."""
    import accel
    from accel.presets import preset_configs

    model, processor = untrained
    questions = scenes_multi.held_out(2, 0)
    handle = patched(model)
    reference_vlm.predict(model, processor, questions, batch_size=2)
    report = handle.report()
    ratio = preset_configs(report.preset)["prune"].keep_ratio
    assert [a.accelerator for a in report.applied] == ["prune"]
    assert report.stats["prune"]["last_call"]["visual_tokens_kept"] == [int(256 * ratio)] * 2
    assert f"{int(256 * ratio)}" in str(report) and "cache" in {s.accelerator for s in report.skipped}
    accel.unpatch(model)
    lossless = patched(model, "lossless")
    assert not lossless.report().applied and "prune" in {s.accelerator for s in lossless.report().skipped}


def test_shipped_weights_load_and_answer_from_the_image():
    """The weights in the package: from_pretrained loads them, they stay small, and they answer well above what the
    question alone allows (RESULTS.md: 87.0% on all 300 held-out questions; count, colour and position are read)."""
    model, processor = zoo.load("ref-vlm")
    assert sum(p.stat().st_size for p in reference_vlm.WEIGHTS.iterdir()) < 40 * 2**20
    questions = [q for q in scenes_multi.held_out(60, 0) if q.type in ("count", "colour_at")]
    answers = reference_vlm.predict(model, processor, questions)
    assert sum(a == q.answer for a, q in zip(answers, questions)) / len(questions) >= 0.8
