"""The lookup loss of `ref-vlm`'s training (``--lookup-loss``, `accel.zoo.train_vlm`).

A question names the shape it asks about by one word: its colour ("what shape is the red one ?", "is the red ring on
the left ...") or its place ("what colour is the shape at the top left ?", the last place word). The loss is minus
the log of the attention mass that one head of the first decoder layer (`LAYER`, `HEAD`) puts, from that word, on the
asked shape's visual tokens. The position loss already writes each token's place into it by that layer, the token
loss its colour; what a fresh language model found slowly was the lookup itself (benchmarks/RESULTS.md: the shipped
weights have two first-layer heads that find the asked shape, runs of the 90-minute recipe had none, and their wrong
answers to "what colour ... at the top left" were another shape's colour). Count questions have no target.

The head's probabilities come from an attention function (`PROBE_ATTENTION`) that runs SDPA as usual and, for layer
`LAYER`, also keeps head `HEAD`'s softmax of its last call: in `packed_forward`, the question pass.
"""

from __future__ import annotations

import contextlib

import torch

from accel.zoo import _vlm_train_data as td
from accel.zoo import scenes_multi

LAYER, HEAD = 0, 0
PROBE_ATTENTION = "accel_sdpa_keeping_one_head"
_kept: list[torch.Tensor] = []  # while `probed` runs: the head's probabilities of the layer's last call


def _probe_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if module.layer_idx == LAYER:
        group = query.shape[1] // key.shape[1]  # query heads per key head
        scores = query[:, HEAD] @ key[:, HEAD // group].transpose(-1, -2) * scaling
        if attention_mask is not None:
            mask = attention_mask[:, 0, :, : key.shape[-2]]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        _kept[:] = [scores.softmax(-1)]  # [batch, queries, keys]
    return out


@contextlib.contextmanager
def probed(model):
    """Runs the language model of `model` under `PROBE_ATTENTION`; yields a list that holds, after a forward, head
    `HEAD`'s attention probabilities [batch, queries, keys] of layer `LAYER`'s last call."""
    _kept.clear()
    with td.attention_function(model.model.language_model, PROBE_ATTENTION, _probe_attention):
        yield _kept


def cue(question: scenes_multi.Question) -> int | None:
    """The index in `question.text.split()` of the word that names the asked shape, None for a count."""
    if question.item is None:
        return None
    words = question.text.split()
    if question.type == "colour_at":
        return len(words) - 2  # "... at the top left ?": the last place word
    return words.index(question.scene.items[question.item].colour)


def lookup_loss(probs: torch.Tensor, batch: td.Batch) -> torch.Tensor:
    """Mean over the questions of `batch` that name a shape of minus the log attention mass `probs` (the question
    pass's, [scenes, packed length, prefix + packed length]) puts from the naming word on that shape's visual tokens
    (`batch.targets["owner"]`); 0 when no question names one."""
    layout = td._pack(batch)
    visual = torch.nonzero(batch.prefix["mm_token_type_ids"][0] != 0).squeeze(1)
    owner = batch.targets["owner"].view(-1, visual.numel())
    rows, places, keys = [], [], []
    for row, question in enumerate(batch.questions):
        word = cue(question)
        if word is None:
            continue
        scene = int(layout.scene[row, 0])
        on_shape = owner[scene] == question.item
        if bool(on_shape.any()):  # a shape too small to own a token has nothing to find
            rows.append(scene)
            places.append(int(layout.place[row, word]))
            keys.append(on_shape)
    if not rows:
        return probs.new_zeros(())
    attended = probs[torch.tensor(rows), torch.tensor(places)][:, visual]  # [questions, visual tokens]
    mass = (attended * torch.stack(keys).to(attended.dtype)).sum(1)
    return -torch.log(mass + 1e-6).mean()
