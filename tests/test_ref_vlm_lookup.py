"""ref-vlm's lookup loss (`accel.zoo._vlm_lookup`): each question names the shape it asks about, the probe keeps the
first layer's head without changing the forward, and the loss reads the naming word's attention on that shape."""

import copy
import random

import pytest
import torch

from accel.zoo import _vlm_lookup as lookup
from accel.zoo import _vlm_processor as vp
from accel.zoo import _vlm_train_data as td
from accel.zoo import reference_vlm, scenes_multi


@pytest.fixture(scope="module")
def untrained():
    return reference_vlm.untrained(seed=0)[0]


def test_every_question_but_a_count_names_the_shape_it_asks_about():
    rng = random.Random(3)
    for video in (False, True):
        scene = scenes_multi.sample_scene(rng, video, count=3)
        for q in scenes_multi.questions(scene):
            word = lookup.cue(q)
            if q.type == "count":
                assert q.item is None and word is None
                continue
            item, words = scene.items[q.item], q.text.split()
            if q.type == "colour_at":
                assert q.answer == item.colour and " ".join(words[-3:-1]) == scenes_multi.CELLS[item.cell]
                assert word == len(words) - 2
            else:
                assert words[word] == item.colour
                assert q.answer in (item.shape, item.motion, "left", "right", "top", "bottom")


@pytest.mark.parametrize("video_share", [0.0, 1.0])
def test_probe_keeps_the_question_pass_head_and_leaves_the_forward_as_it_was(untrained, video_share):
    batch = td.make_batch(0, 4, scenes=2, per_scene=3, video_share=video_share)
    with torch.no_grad():
        plain, _, _ = td.packed_forward(untrained, batch)
        with lookup.probed(untrained) as kept:
            probed, _, _ = td.packed_forward(untrained, batch)
    torch.testing.assert_close(probed.logits, plain.logits)
    assert all(config._attn_implementation != lookup.PROBE_ATTENTION for config in _configs(untrained))
    probs = kept[0]
    layout = td._pack(batch)
    scenes, prefix = batch.prefix["input_ids"].shape
    assert probs.shape == (scenes, layout.segment.shape[1], prefix + layout.segment.shape[1])
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
    assert float(probs[~td._question_mask(layout, prefix)[:, 0]].abs().max()) == 0.0  # other questions unseen

    ids = td._packed(batch.ids, layout, td._index()[vp.PAD])
    for row, q in enumerate(batch.questions):  # the cue's place in the packed rows holds the cue word
        if (word := lookup.cue(q)) is not None:
            scene, place = int(layout.scene[row, 0]), int(layout.place[row, word])
            assert int(ids[scene, place]) == td._ids([q.text.split()[word]])[0]


def _configs(model):
    return [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]


def test_lookup_loss_is_the_cue_words_attention_on_the_asked_shape_and_trains_only_the_first_layer(untrained):
    model = copy.deepcopy(untrained)
    batch = td.make_batch(0, 7, scenes=2, per_scene=4, video_share=0.0)
    with lookup.probed(model) as kept:
        td.packed_forward(model, batch)
    loss = lookup.lookup_loss(kept[0], batch)
    layout, owner = td._pack(batch), batch.targets["owner"].view(2, -1)
    terms = []
    for row, q in enumerate(batch.questions):
        if q.item is not None:
            scene, place = int(layout.scene[row, 0]), int(layout.place[row, lookup.cue(q)])
            mass = kept[0][scene, place, 3 : 3 + reference_vlm.IMAGE_TOKENS][owner[scene] == q.item].sum()
            terms.append(-torch.log(mass + 1e-6))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert 0 < float(loss.detach()) < 20
    loss.backward()
    layers = model.model.language_model.layers
    assert layers[lookup.LAYER].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layers[lookup.LAYER + 1 :].parameters())


def test_lookup_loss_falls_when_trained_and_is_zero_without_a_named_shape(untrained):
    model = copy.deepcopy(untrained)
    batch = td.make_batch(0, 9, scenes=2, per_scene=4, video_share=0.0)
    optimizer = torch.optim.Adam(model.model.language_model.layers[0].parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        with lookup.probed(model) as kept:
            td.packed_forward(model, batch)
        loss = lookup.lookup_loss(kept[0], batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    batch.questions = [scenes_multi.questions(q.scene)[0] for q in batch.questions]  # each scene's count
    assert {q.type for q in batch.questions} == {"count"}
    assert float(lookup.lookup_loss(kept[0].detach(), batch)) == 0.0
