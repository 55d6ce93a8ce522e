"""transformers' own model-test checks, ported: keep-all pruning changes nothing a VLM returns.

For each tiny VLM family and both pruning places, `PruneConfig(keep_ratio=1.0)` must give exactly what the
unpatched model gives (or the same exception): forward logits of a left-padded ragged batch, hidden states
and attentions, greedy, sampled (same seed), beam search, several sequences per prompt, generation without
a KV cache, videos, and padding-free packed sequences (no mask, position ids restarting per sequence).
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

import accel
from accel.pruning import PruneConfig
from accel.zoo import vlm

FAMILIES = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
NEW = 4
# Random weights may emit a placeholder id, which the model rejects when it re-reads the sequence.
SUPPRESS = [vlm.IMAGE_TOKEN_ID, vlm.VIDEO_TOKEN_ID, vlm.VISION_START_ID, vlm.VISION_END_ID]


def generate(model, inputs, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        **inputs,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        suppress_tokens=SUPPRESS,
        output_logits=True,
        return_dict_in_generate=True,
        **{"do_sample": False, **kwargs},
    )
    result = {"sequences": out.sequences, "logits": torch.stack(out.logits)}
    if getattr(out, "sequences_scores", None) is not None:
        result["sequences_scores"] = out.sequences_scores
    return result


@torch.no_grad()
def forward(model, inputs, **kwargs):
    out = model(**inputs, **kwargs)
    result = {"logits": out.logits}
    for name in ("hidden_states", "attentions"):
        for i, tensor in enumerate(getattr(out, name, None) or ()):
            result[f"{name}[{i}]"] = tensor
    return result


def eager(model, run):
    """`run()` with eager attention, which returns attention weights (SDPA does not)."""
    model.set_attn_implementation("eager")
    try:
        return run()
    finally:
        model.set_attn_implementation("sdpa")


def packed(model, family):
    """Two single-image prompts in one row without padding or mask; positions restart at the second."""
    rows = [vlm.make_inputs(model, seed=seed) for seed in (23, 24)]
    call = {"input_ids": torch.cat([r["input_ids"] for r in rows], 1), "use_cache": False}
    text = torch.cat([torch.arange(r["input_ids"].shape[1]) for r in rows])[None]
    if family.startswith("qwen"):
        for key in ("pixel_values", "image_grid_thw"):
            call[key] = torch.cat([r[key] for r in rows])
        call["mm_token_type_ids"] = torch.cat([r["mm_token_type_ids"] for r in rows], 1)
        rope = model.model
        mrope = [rope.get_rope_index(r["input_ids"], r["mm_token_type_ids"], r["image_grid_thw"])[0] for r in rows]
        call["position_ids"] = torch.cat([text[None], torch.cat(mrope, dim=-1)])  # [4, 1, S]: text row first
    else:
        call["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
        if "image_sizes" in rows[0]:
            call["image_sizes"] = torch.cat([r["image_sizes"] for r in rows])
            call["batch_num_images"] = torch.ones(2, dtype=torch.long)  # one image per packed sequence
        call["position_ids"] = text
    return call


def checks(family):
    model = tiny(family).obj
    batch = vlm.make_inputs(model, seed=21, batch_size=2, ragged=True)
    found = {
        "forward (left-padded batch)": lambda: forward(model, batch),
        "hidden states": lambda: forward(model, batch, output_hidden_states=True),
        "attentions (eager)": lambda: eager(model, lambda: forward(model, batch, output_attentions=True)),
        "greedy": lambda: generate(model, batch),
        "sampled, same seed": lambda: generate(model, batch, seed=0, do_sample=True, top_k=50),
        "beam search": lambda: generate(model, batch, num_beams=2),
        "beams, 2 sequences each": lambda: generate(model, batch, num_beams=2, num_return_sequences=2),
        "sampled, 2 sequences each": lambda: generate(model, batch, seed=1, do_sample=True, num_return_sequences=2),
        "use_cache=False": lambda: generate(model, batch, use_cache=False),
        "padding-free packed": lambda: forward(model, packed(model, family)),
    }
    if family != "llava":
        video = vlm.make_inputs(model, seed=22, batch_size=2, video=True, ragged=True)
        found["video forward"] = lambda: forward(model, video)
        found["video greedy"] = lambda: generate(model, video)
    return found


def run_all(family):
    results = {}
    for name, check in checks(family).items():
        try:
            results[name] = check()
        except Exception as err:  # a mode the model does not support must fail the same way patched
            results[name] = type(err)
    return results


def describe(result) -> str:
    return result.__name__ if isinstance(result, type) else "outputs"


_UNPATCHED = {}


def unpatched(family):
    if family not in _UNPATCHED:
        _UNPATCHED[family] = run_all(family)
    return _UNPATCHED[family]


@pytest.mark.compat
@pytest.mark.parametrize("where", ["before_lm", "in_lm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_returns_exactly_what_the_unpatched_model_returns(family, where, patched):
    reference = unpatched(family)
    assert all(isinstance(r, dict) for r in reference.values()), reference  # every check runs unpatched
    assert "attentions[0]" in reference["attentions (eager)"] and "hidden_states[0]" in reference["hidden states"]
    model = tiny(family).obj
    handle = patched(model, prune=PruneConfig(keep_ratio=1.0, where=where, layer=1))
    results = run_all(family)
    assert handle.unit("prune").calls > 0
    accel.unpatch(model)
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "config"))
    different = []
    for name, expected in reference.items():
        got = results[name]
        if isinstance(expected, dict) and isinstance(got, dict):
            keys_equal = expected.keys() == got.keys()
            if not keys_equal or not all(torch.equal(expected[k], got[k]) for k in expected):
                different.append(name)
        elif got != expected:
            different.append(f"{name}: {describe(got)} patched, {describe(expected)} unpatched")
    assert not different, different
