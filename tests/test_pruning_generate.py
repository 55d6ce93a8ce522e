"""Visual token pruning under every generate() mode, with labels, in training mode, on text-only and
padding-free packed calls, and under torch.compile (tiny LLaVA, LLaVA-OneVision and Qwen2-VL)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny

import accel
from accel.pipelines import find_adapter
from accel.pruning import PruneConfig, PruneError
from accel.zoo import vlm

# Random weights may emit a placeholder id; re-reading it (use_cache=False) fails unpatched as well. No eos
# either, so every run has NEW tokens (min_new_tokens does not combine with assisted decoding everywhere).
SUPPRESS = [vlm.IMAGE_TOKEN_ID, vlm.VIDEO_TOKEN_ID, vlm.VISION_START_ID, vlm.VISION_END_ID, vlm.EOS_ID]
NEW = 5

# LLaVA scores with the vision tower's [CLS] row, OneVision with sampled attention (newline tokens kept),
# Qwen2-VL and LLaVA inside the language model.
CASES = {
    "llava-cls": ("llava", PruneConfig(keep=4)),
    "onevision-sampled": ("llava_onevision", PruneConfig(keep=6)),
    "qwen2_vl-in_lm": ("qwen2_vl", PruneConfig(keep=3, where="in_lm", layer=1)),
    "llava-in_lm": ("llava", PruneConfig(keep=4, where="in_lm", layer=1)),
}


def gen(model, inputs, new=NEW, **kwargs):
    kwargs = {"do_sample": False, **kwargs}
    return model.generate(
        **inputs,
        max_new_tokens=new,
        suppress_tokens=SUPPRESS,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def inputs_of(model, batch_size=2, seed=11):
    return vlm.make_inputs(model, seed=seed, batch_size=batch_size, ragged=batch_size > 1)


# ---- generate modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_uncached_and_assisted_generation_prune_as_greedy_does(case, patched):
    family, config = CASES[case]
    model = tiny(family).obj
    batch, single = inputs_of(model), inputs_of(model, batch_size=1)
    handle = patched(model, prune=config)
    unit = handle.unit("prune")
    ref = gen(model, batch)
    kept = unit.last.kept_index
    assert unit.last.visual_kept != unit.last.visual_in  # something is pruned
    # use_cache=False: every step re-runs the whole sequence, pruned as the prompt was
    uncached = gen(model, batch, use_cache=False)
    assert torch.equal(uncached.sequences, ref.sequences)
    torch.testing.assert_close(uncached.logits[-1], ref.logits[-1], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a[: b.numel()], b) for a, b in zip(unit.last.kept_index, kept))
    # assisted decoding (the model drafts for itself) and prompt lookup verify several tokens per call
    ref_single = gen(model, single)
    assert torch.equal(gen(model, single, assistant_model=model).sequences, ref_single.sequences)
    assert torch.equal(gen(model, single, prompt_lookup_num_tokens=2).sequences, ref_single.sequences)


@pytest.mark.parametrize("case", ["llava-cls", "qwen2_vl-in_lm"])
def test_beams_and_several_sequences_prune_each_copy_like_its_prompt(case, patched):
    family, config = CASES[case]
    model = tiny(family).obj
    inputs = inputs_of(model)
    handle = patched(model, prune=config)
    unit = handle.unit("prune")
    gen(model, inputs, new=1)
    kept = unit.last.kept_index
    for kwargs in (
        {"num_beams": 2},
        {"num_beams": 2, "num_return_sequences": 2},
        {"do_sample": True, "num_return_sequences": 2},
    ):
        torch.manual_seed(0)
        out = gen(model, inputs, **kwargs)
        assert out.sequences.shape[0] == 2 * kwargs.get("num_return_sequences", 1)
        expanded = unit.last.kept_index  # generate() repeats each prompt: row 2b and 2b+1 are prompt b
        assert len(expanded) == 4
        for row, index in enumerate(expanded):
            assert torch.equal(index[-kept[row // 2].numel() :], kept[row // 2]), (kwargs, row)


def test_cls_score_of_features_the_patched_tower_never_saw_is_a_clear_error(patched):
    model = tiny("llava").obj
    inputs = inputs_of(model, batch_size=1)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    patched(model, prune=PruneConfig(keep=4))
    call = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(PruneError, match="none of the 0 images the vision tower encoded"):
        model(**call, mm_encoder_outputs={"image": features})


# ---- labels and training ---------------------------------------------------------------------------------------


def labels_of(model, inputs):
    """Loss on the text tokens only (placeholders and padding -100), as a VLM fine-tuning collator does."""
    ids = inputs["input_ids"]
    text = ~find_adapter(model).visual_token_mask(ids) & inputs["attention_mask"].bool()
    return torch.where(text, ids, torch.full_like(ids, -100))


@pytest.mark.parametrize("case", ["llava-cls", "qwen2_vl-in_lm"])
def test_labels_are_pruned_with_the_sequence(case, patched):
    family, config = CASES[case]
    model = tiny(family).obj
    inputs = inputs_of(model)
    labels = labels_of(model, inputs)
    with torch.no_grad():
        full = model(**inputs, labels=labels)
    patched(model, prune=PruneConfig(keep_ratio=1.0, where=config.where, layer=config.layer))
    with torch.no_grad():
        same = model(**inputs, labels=labels)
    assert torch.equal(same.loss, full.loss) and torch.equal(same.logits, full.logits)
    accel.unpatch(model)

    handle = patched(model, prune=config)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
    unit = handle.unit("prune")
    length = out.logits.shape[1]
    assert length == unit.last.sequence_out < labels.shape[1]
    short = torch.full((labels.shape[0], length), -100)
    for b, kept in enumerate(unit.last.kept_index):
        short[b, length - kept.numel() :] = labels[b, kept]
    assert int((short != -100).sum()) == int((labels != -100).sum())  # every text label survives
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), short[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert list(out.keys())[0] == "loss" and torch.equal(as_tuple[0], out.loss)


def test_training_mode_with_gradients_refuses_to_prune_and_keep_all_keeps_the_graph(patched):
    model = tiny("llava").obj
    inputs = inputs_of(model)
    labels = labels_of(model, inputs)
    head = model.lm_head.weight

    def grad_of_loss():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return head.grad.clone()

    model.train()
    try:
        reference = grad_of_loss()
        patched(model, prune=PruneConfig(keep_ratio=1.0))
        assert torch.equal(grad_of_loss(), reference)
        accel.unpatch(model)
        patched(model, prune=PruneConfig(keep=4))
        with pytest.raises(PruneError, match="model.eval\\(\\)"):
            model(**inputs, labels=labels)
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] < inputs["input_ids"].shape[1]
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# ---- calls that must pass through untouched ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before_lm", "in_lm"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_text_only_call_with_a_placeholder_id_passes_through(family, where, patched):
    model = tiny(family).obj
    ids = torch.tensor([[1, 17, 30, vlm.IMAGE_TOKEN_ID, vlm.IMAGE_TOKEN_ID, vlm.IMAGE_TOKEN_ID, 44, 9]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    patched(model, prune=PruneConfig(keep=2, where=where, layer=1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


class LMCalls:
    def __init__(self, model):
        self.calls = []
        lm = find_adapter(model).language_model()
        self.handle = lm.register_forward_pre_hook(lambda m, a, k: self.calls.append(dict(k)), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_keep_all_leaves_a_missing_attention_mask_missing(patched):
    model = tiny("llava").obj
    inputs = {k: v for k, v in inputs_of(model, batch_size=1).items() if k != "attention_mask"}
    patched(model, prune=PruneConfig(keep_ratio=1.0))
    with LMCalls(model) as lm, torch.no_grad():
        model(**inputs)
    assert lm.calls[0]["attention_mask"] is None and lm.calls[0].get("position_ids") is None


def packed(model):
    """Two single-image prompts in one row, padding-free: no mask, position ids restart at the second."""
    a, b = inputs_of(model, batch_size=1, seed=12), inputs_of(model, batch_size=1, seed=13)
    n = a["input_ids"].shape[1]
    positions = torch.cat([torch.arange(n), torch.arange(b["input_ids"].shape[1])])[None]
    call = {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]], 1),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
        "position_ids": positions,
        "use_cache": False,
    }
    return call, b, n


def test_padding_free_packed_sequences_keep_all_is_identity_and_pruning_refuses(patched):
    model = tiny("llava").obj
    call, second, n = packed(model)
    with torch.no_grad():
        ref = model(**call).logits
        alone = model(**second).logits
    torch.testing.assert_close(ref[:, n:], alone, atol=1e-5, rtol=1e-5)  # the packing is honoured
    for where in ("before_lm", "in_lm"):
        patched(model, prune=PruneConfig(keep_ratio=1.0, where=where, layer=1))
        with torch.no_grad():
            assert torch.equal(model(**call).logits, ref), where
        accel.unpatch(model)
    patched(model, prune=PruneConfig(keep=4))
    with pytest.raises(PruneError, match="packed"), torch.no_grad():
        model(**call)


# ---- torch.compile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [PruneConfig(keep=4), PruneConfig(keep_ratio=1.0)], ids=["keep4", "keep_all"])
def test_torch_compile_fullgraph_ends_in_a_prune_error(config, patched):
    model = tiny("llava").obj
    inputs = inputs_of(model, batch_size=1)
    patched(model, prune=config)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        with pytest.raises(PruneError, match="torch.compile"), torch.no_grad():
            compiled(**inputs)
    finally:
        torch._dynamo.reset()
