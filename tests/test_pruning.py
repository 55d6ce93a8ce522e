"""Visual token pruning on tiny LLaVA-1.5, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL (real transformers classes)."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import tiny

import accel
from accel.pruning import PruneConfig, PruneError
from accel.zoo import vlm

FAMILIES = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in FAMILIES[1:]]
IDS = [f"{f}-{'video' if v else 'image'}" for f, v in CASES]
NEW = 20


def model_of(family):
    return tiny(family).obj


def generate(model, inputs, new=NEW):
    return vlm.generate(model, inputs, max_new_tokens=new)


class LMInputs:
    """Records what reaches the language model (registered after accel's hook, so it sees the pruned call)."""

    def __init__(self, model):
        from accel.pipelines import find_adapter

        self.calls = []
        self.handle = find_adapter(model).language_model().register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def single_row(inputs: dict, i: int) -> dict:
    """Row `i` of a `make_inputs` batch, without its left padding."""
    keep = inputs["attention_mask"][i].bool()
    row = {k: inputs[k][i : i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid in inputs:
            row[pix] = torch.split(inputs[pix], inputs[grid].prod(-1).tolist())[i]
            row[grid] = inputs[grid][i : i + 1]
        elif pix in inputs:
            row[pix] = inputs[pix][i : i + 1]
    for key in ("image_sizes", "batch_num_images", "second_per_grid_ts"):
        if key in inputs:
            row[key] = inputs[key][i : i + 1]
    return row


# ---- correctness on every family ---------------------------------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("where", ["before_lm", "in_lm"])
@pytest.mark.parametrize("family,video", CASES, ids=IDS)
def test_keep_all_is_bit_identical(family, video, where, patched):
    model = model_of(family)
    inputs = vlm.make_inputs(model, seed=1, batch_size=2, video=video, ragged=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    ref = generate(model, inputs)
    handle = patched(model, prune=PruneConfig(keep_ratio=1.0, where=where, layer=1))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    out = generate(model, inputs)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.first_logits, ref.first_logits)
    unit = handle.unit("prune")
    assert unit.last.visual_in == unit.last.visual_kept
    accel.unpatch(model)
    assert torch.equal(generate(model, inputs).sequences, ref.sequences)


@pytest.mark.parametrize("family,video", CASES, ids=IDS)
def test_shorter_sequence_keeps_original_positions(family, video, patched):
    model = model_of(family)
    inputs = vlm.make_inputs(model, seed=2, batch_size=2, video=video, ragged=True)
    with LMInputs(model) as base:
        generate(model, inputs, new=3)
    handle = patched(model, prune=PruneConfig(keep=3))
    with LMInputs(model) as pruned:
        out = generate(model, inputs, new=3)
    assert model.config._attn_implementation == "sdpa"
    unit = handle.unit("prune")
    full, short = base.calls[0], pruned.calls[0]
    length = full["inputs_embeds"].shape[1]
    assert short["inputs_embeds"].shape[1] == unit.last.sequence_out < length
    assert all(k < n for k, n in zip(unit.last.visual_kept, unit.last.visual_in))
    for b, kept in enumerate(unit.last.kept_index):
        n = kept.numel()
        tail = slice(short["inputs_embeds"].shape[1] - n, None)
        # kept tokens carry their unpruned positions (all M-RoPE axes for Qwen) and mask values
        assert torch.equal(short["position_ids"][..., b, tail], full["position_ids"][..., b, kept])
        assert torch.equal(short["attention_mask"][b, tail], full["attention_mask"][b, kept])
        assert not short["attention_mask"][b, : short["inputs_embeds"].shape[1] - n].any()
        text = ~vlm_mask(model, inputs["input_ids"][b, kept])
        assert torch.equal(short["inputs_embeds"][b, tail][text], full["inputs_embeds"][b, kept][text])
    # decode steps: original positions continue, mask grows from the shortened prompt
    for step in (1, 2):
        assert torch.equal(pruned.calls[step]["position_ids"], base.calls[step]["position_ids"])
        assert pruned.calls[step]["attention_mask"].shape[1] == unit.last.sequence_out + step
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)


def vlm_mask(model, ids):
    from accel.pipelines import find_adapter

    return find_adapter(model).visual_token_mask(ids)


@pytest.mark.parametrize("where", ["before_lm", "in_lm"])
@pytest.mark.parametrize("family,video", CASES, ids=IDS)
def test_batch_of_three_equals_single_runs(family, video, where, patched):
    model = model_of(family)
    inputs = vlm.make_inputs(model, seed=3, batch_size=3, video=video, ragged=True)
    patched(model, prune=PruneConfig(keep=4, where=where, layer=1))
    batch = generate(model, inputs, new=6)
    for i in range(3):
        row = single_row(inputs, i)
        single = generate(model, row, new=6)
        assert torch.equal(batch.sequences[i, -6:], single.sequences[0, -6:]), f"row {i}"
        torch.testing.assert_close(batch.first_logits[i], single.first_logits[0], atol=1e-4, rtol=1e-4)


MODES = {
    "keep": PruneConfig(keep=2),
    "ratio": PruneConfig(keep_ratio=0.3),
    "mass": PruneConfig(mass=0.5),
    "top-only": PruneConfig(keep=3, contextual=0.0),
    "sampled": PruneConfig(keep=4, score="sampled"),
    "in_lm": PruneConfig(keep=3, where="in_lm", layer=1, text_queries=2),
}


@pytest.mark.compat
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family,video", CASES, ids=IDS)
def test_generate_twenty_tokens_in_every_mode(family, video, mode, patched):
    model = model_of(family)
    inputs = vlm.make_inputs(model, seed=4, batch_size=2, video=video, ragged=True)
    handle = patched(model, prune=MODES[mode])
    out = generate(model, inputs)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + NEW)
    assert torch.isfinite(out.first_logits).all()
    stats = handle.report().stats["prune"]
    assert stats["calls"] == 1
    assert stats["visual_tokens_kept_total"] < stats["visual_tokens_in_total"]
    assert "visual tokens kept" in str(handle)


# ---- budgets, video, scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_dynamic_mass_keeps_more_for_a_larger_target(family, patched):
    model = model_of(family)
    inputs = vlm.make_inputs(model, seed=5, batch_size=2, ragged=True)
    kept = []
    for mass in (0.2, 0.6, 0.95):
        handle = patched(model, prune=PruneConfig(mass=mass))
        generate(model, inputs, new=1)
        kept.append(sum(handle.unit("prune").last.visual_kept))
        accel.unpatch(model)
    assert kept[0] <= kept[1] <= kept[2] and kept[0] < kept[2]


def repeat_first_frame(model, inputs):
    """The video's first temporal unit copied over all others: a static video."""
    inputs = dict(inputs)
    videos = inputs["pixel_values_videos"]
    if "video_grid_thw" in inputs:
        t, h, w = inputs["video_grid_thw"][0].tolist()
        grid = videos.view(t, h * w, -1)
        inputs["pixel_values_videos"] = grid[:1].expand_as(grid).reshape(videos.shape).clone()
    else:
        inputs["pixel_values_videos"] = videos[:, :1].expand_as(videos).clone()
    return inputs


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_static_video_is_merged_over_time(family, patched):
    model = model_of(family)
    inputs = repeat_first_frame(model, vlm.make_inputs(model, seed=6, video=True))
    handle = patched(model, prune=PruneConfig(keep=1000))  # a budget above every count: only merging drops
    generate(model, inputs, new=2)
    last = handle.unit("prune").last
    frames_after_first = last.visual_in[0] - last.visual_kept[0]
    assert last.temporal_merged == frames_after_first > 0  # every later frame folded into the first
    accel.unpatch(model)
    patched(model, prune=PruneConfig(keep=1000, temporal_threshold=None))
    generate(model, inputs, new=2)
    assert accel.get_handle(model).unit("prune").last.temporal_merged == 0
    accel.unpatch(model)
    ref = generate(model, inputs, new=2)
    patched(model, prune=PruneConfig(keep_ratio=1.0))  # keep-all is the identity: no merging over time either
    out = generate(model, inputs, new=2)
    last = accel.get_handle(model).unit("prune").last
    assert last.temporal_merged == 0 and last.visual_kept == last.visual_in
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.first_logits, ref.first_logits)


def test_llava_uses_the_cls_row_and_the_tower_keeps_sdpa(patched):
    model = model_of("llava")
    handle = patched(model, prune=PruneConfig(keep=4, contextual=0.0))
    unit = handle.unit("prune")
    assert unit.score == "cls"
    inputs = vlm.make_inputs(model, seed=7)
    captured = {}
    attn = unit.adapter.cls_attention_module()

    def grab(module, args, kwargs):
        captured.setdefault("h", kwargs["hidden_states"])

    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        generate(model, inputs, new=1)
    finally:
        hook.remove()
    # reference: the full eager attention matrix of that layer, CLS row, mean over heads, patches only
    h = captured["h"]
    q = attn.q_proj(h).view(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    weights = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)[0, 0, 1:]
    start = int((inputs["input_ids"][0] == vlm.IMAGE_TOKEN_ID).nonzero()[0])
    kept = unit.last.kept_index[0]
    kept_patches = kept[(kept >= start) & (kept < start + 16)] - start
    assert set(kept_patches.tolist()) == set(weights.topk(4).indices.tolist())
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


def test_score_cls_without_cls_token_is_an_error():
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        accel.patch(model_of("qwen2_vl"), prune=PruneConfig(score="cls"))
    assert accel.get_handle(model_of("qwen2_vl")) is None


def test_distinct_score_ranks_tokens_that_differ_from_the_typical_one():
    """Most tokens background (alike), a few showing something: the few score highest, even when the background is
    not the majority of any single direction's mass (the median, not the mean, is the reference)."""
    from accel.pruning.select import distinct_scores

    g = torch.Generator().manual_seed(0)
    background = torch.ones(12, 8) + 0.01 * torch.randn(12, 8, generator=g)
    shapes = torch.randn(4, 8, generator=g) * 3
    x = torch.cat([background[:5], shapes[:2], background[5:], shapes[2:]])
    scores = distinct_scores(x)
    assert torch.isclose(scores.sum(), torch.tensor(1.0)) and (scores >= 0).all()
    assert set(scores.topk(4).indices.tolist()) == {5, 6, 14, 15}


def test_dominant_tokens_cover_each_distinct_thing_before_repeating_one(monkeypatch):
    """Two things: a large salient one (five near-identical tokens, all scoring above the other) and a small one. The
    top scores alone keep only the large one; duplicate suppression keeps one of each first, then goes by score."""
    from accel.pruning.select import dominant_tokens

    g = torch.Generator().manual_seed(0)
    large = torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(5, 4, generator=g)
    small = torch.tensor([0, 1.0, 0, 0]) + 0.01 * torch.randn(2, 4, generator=g)
    x = torch.cat([small[:1], large, small[1:]])
    scores = torch.tensor([0.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    assert dominant_tokens(x, scores, 2, None).tolist() == [1, 2]
    assert dominant_tokens(x, scores, 2, 0.8).tolist() == [1, 0]
    assert dominant_tokens(x, scores, 4, 0.8).tolist() == [1, 0, 2, 3]
    monkeypatch.setattr("accel.pruning.select._SIMILARITY_ROWS", 3)  # long videos: the matrix a few rows at a time
    assert dominant_tokens(x, scores, 4, 0.8).tolist() == [1, 0, 2, 3]


def test_duplicate_suppression_is_the_greedy_pass_down_the_scores():
    """A token is a duplicate only of a kept one: a chain A ~ B ~ C with A and C unlike keeps A and C. And on random
    features the fixed point matches a plain loop down the scores."""
    from accel.pruning.select import dominant_tokens

    angles = torch.tensor([0.0, 0.5, 1.0])  # neighbours 0.5 rad apart (cosine 0.88), ends 1 rad (0.54)
    chain = torch.stack([angles.cos(), angles.sin()], 1)
    assert dominant_tokens(chain, torch.tensor([0.9, 0.8, 0.7]), 2, 0.8).tolist() == [0, 2]

    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, scores = torch.randn(40, 3, generator=g), torch.rand(40, generator=g)
        unit = torch.nn.functional.normalize(x, dim=-1)
        kept, duplicates = [], []
        for i in scores.argsort(descending=True).tolist():
            alike = any(float(unit[i] @ unit[j]) > 0.8 for j in kept)
            (duplicates if alike else kept).append(i)
        assert dominant_tokens(x, scores, 40, 0.8).tolist() == kept + duplicates


@pytest.mark.parametrize("family,score", [("qwen2_vl", "distinct"), ("llava", "cls")])
def test_auto_score_is_cls_where_there_is_one_else_distinct(family, score, patched):
    handle = patched(model_of(family), prune=PruneConfig(keep=4))
    assert next(u for u in handle.units if u.name == "prune").score == score


def test_config_errors():
    with pytest.raises(ValueError, match="only one of"):
        PruneConfig(keep=4, mass=0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        PruneConfig(keep_ratio=0.0)
    with pytest.raises(ValueError, match="where"):
        PruneConfig(where="after")
    assert PruneConfig().keep_ratio == 0.25


def test_prune_on_a_diffusion_model_is_an_error():
    with pytest.raises(ValueError, match="vision-language models"):
        accel.patch(tiny("flux").obj, prune=True)


def test_static_cache_mask_is_a_clear_error(patched):
    model = model_of("llava")
    patched(model, prune=PruneConfig(keep=4))
    inputs = vlm.make_inputs(model, seed=8)
    mask = torch.ones(1, 1, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1], dtype=torch.bool)
    with pytest.raises(PruneError, match="2-D attention mask"):
        model(**{**inputs, "attention_mask": mask})


def test_unpatch_removes_every_hook(patched):
    model = model_of("qwen2_5_vl")

    def count():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = count()
    patched(model, prune=PruneConfig(keep=2))
    assert count() > before
    accel.unpatch(model)
    assert count() == before


@pytest.mark.compat
def test_in_lm_keeps_the_visual_tokens_the_last_prompt_token_attends_to(patched):
    model = model_of("qwen2_vl")
    inputs = vlm.make_inputs(model, seed=9)
    handle = patched(model, prune=PruneConfig(keep=2, where="in_lm", layer=1))
    unit = handle.unit("prune")
    layer = unit.adapter.language_layers()[1]
    generate(model, inputs, new=2)
    # reference: layer 1's full eager attention on the unpruned prefill, last query row, mean over heads
    accel.unpatch(model)
    captured = {}

    def grab_full(module, args, kwargs):
        captured.setdefault("hidden", kwargs.get("hidden_states", args[0] if args else None))
        captured.setdefault("cos_sin", kwargs["position_embeddings"])

    hook = layer.register_forward_pre_hook(grab_full, with_kwargs=True)
    generate(model, inputs, new=1)
    hook.remove()
    from accel.pipelines import find_adapter

    q, k, scale = find_adapter(model).lm_query_key(1, captured["hidden"])
    cos, sin = captured["cos_sin"]

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]

    weights = ((rope(q) @ rope(k).transpose(-1, -2)) * scale).softmax(-1).mean(1)[0, -1]
    visual = vlm_mask(model, inputs["input_ids"][0]).nonzero().squeeze(1)
    expected = visual[weights[visual].topk(2).indices].sort().values
    kept = unit.last.kept_index[0]
    assert torch.equal(kept[vlm_mask(model, inputs["input_ids"][0, kept])], expected)


@pytest.mark.compat
def test_cache_argument_is_read_by_the_name_the_forward_declares():
    from transformers import DynamicCache

    from accel._transformers_compat import CACHE_NAMES, cache_kwarg_name, get_cache
    from accel.pipelines import find_adapter

    lm = find_adapter(model_of("llava")).language_model()
    name = cache_kwarg_name(lm)
    params = list(inspect.signature(type(lm).forward).parameters)[1:]
    assert name in params
    cache = DynamicCache()
    for alias in CACHE_NAMES:  # the current name and the deprecated ones a caller may still pass
        assert get_cache(lm, (), {alias: cache}) is cache
    assert get_cache(lm, (None,) * params.index(name) + (cache,), {}) is cache
    assert get_cache(lm, (), {}) is None


@pytest.mark.compat
def test_compat_cache_helpers_work_on_the_installed_transformers():
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from accel._transformers_compat import (
        cache_length,
        create_causal_mask,
        crop_cache,
        output_cache,
        supports_mask_layer,
    )

    model = model_of("llava")
    lm_config = model.config.text_config
    cache = DynamicCache(config=lm_config)
    heads, dim = lm_config.num_key_value_heads, lm_config.hidden_size // lm_config.num_attention_heads
    for layer in range(lm_config.num_hidden_layers):
        cache.update(torch.randn(1, heads, 7, dim), torch.randn(1, heads, 7, dim), layer)
    output = BaseModelOutputWithPast(last_hidden_state=torch.zeros(1, 1, 1), **{cache_name(): cache})
    assert output_cache(output) is cache
    crop_cache(cache, 9)  # longer than held: nothing to drop
    assert cache_length(cache) == 7
    crop_cache(cache, 5)
    assert cache_length(cache) == 5 and cache_length(cache, 1) == 5
    # a 2-D mask over 5 cached + 2 new tokens, the first cached one padded: causal, no padded key
    mask2d = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    embeds = torch.zeros(1, 2, lm_config.hidden_size)
    layer = 1 if supports_mask_layer() else None
    mask = create_causal_mask(lm_config, embeds, mask2d, cache, torch.tensor([[4, 5]]), layer_idx=layer)
    expected = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def cache_name() -> str:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from accel._transformers_compat import CACHE_NAMES

    return next(n for n in CACHE_NAMES if n in BaseModelOutputWithPast.__dataclass_fields__)
