"""Training data of the reference models: fresh renders of the shapes domain, and prompt features computed once
by the pipeline's own `encode_prompt`, with the padding made compact.

The pipelines pad prompts to `max_sequence_length` (512 by default). Past the real tokens, every pad feature is
the same vector at the same position (Flux: a zero-layer T5, text rope at 0; Wan: zeros, no rope on cross
attention), so N pads act on attention exactly as one pad whose logit is raised by log N. Training keeps the
real tokens, one pad with bias log N (N drawn over the lengths a user may pick) and masked filler, so a step
costs 9 text tokens instead of 512 while the model learns exactly what the 512-token call computes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from accel.zoo import shapes
from accel.zoo.reference import Reference
from accel.zoo.tokenizer import PAD_ID

PROBE_LENGTH = 16  # encode prompts at this length: longer than any domain prompt, so it ends in pads
LENGTHS = (16, 512)  # smallest and default max_sequence_length: N pads is drawn log-uniformly between them


def all_prompts(video: bool) -> list[str]:
    """Every prompt of the domain, in a fixed order (140 image prompts, 560 clip prompts)."""
    scenes = [
        shapes.Scene(c, s, b, motion=m)
        for c in shapes.COLOURS
        for s in shapes.SHAPES
        for b in shapes.BACKGROUNDS
        for m in (shapes.MOTIONS if video else (None,))
    ]
    return [shapes.prompt(scene) for scene in scenes]


@dataclass
class PromptFeatures:
    """Per prompt: the real tokens' features [n, D] (eos included), and for Flux the pooled CLIP vector."""

    tokens: list[torch.Tensor]
    pooled: torch.Tensor | None  # [P, D] (Flux) or None (Wan)
    pad: torch.Tensor  # [D], the feature of every pad position
    index: dict[str, int]


@torch.no_grad()
def prompt_features(pipe, ref: Reference, prompts: list[str]) -> PromptFeatures:
    """Features of `prompts` plus the empty prompt (CFG's negative), through the pipeline's `encode_prompt`."""
    prompts = [*prompts, ""]
    tokenizer = pipe.tokenizer_2 if ref.kind == "image" else pipe.tokenizer
    tokens, pooled, pad = [], [], None
    for text in prompts:
        n_real = int((tokenizer(text, return_tensors="pt").input_ids != PAD_ID).sum())
        if ref.kind == "image":
            embeds, pooled_embeds, _ = pipe.encode_prompt(
                prompt=text, prompt_2=None, device="cpu", max_sequence_length=PROBE_LENGTH
            )
            pooled.append(pooled_embeds[0].float())
        else:
            embeds, _ = pipe.encode_prompt(
                prompt=text, do_classifier_free_guidance=False, max_sequence_length=PROBE_LENGTH, device="cpu"
            )
        tokens.append(embeds[0, :n_real].float().clone())
        pad = embeds[0, -1].float().clone()
    return PromptFeatures(tokens, torch.stack(pooled) if pooled else None, pad, {p: i for i, p in enumerate(prompts)})


def compact_text(
    features: PromptFeatures, ids: list[int], rng: random.Random, short_share: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text features [B, T, D] and the additive attention bias [B, T] over them for prompts `ids`: real tokens
    (bias 0), one pad standing for N pads (bias log N), masked filler (-inf) up to the longest prompt + 1.

    The padded length is drawn log-uniformly over LENGTHS, except for `short_share` of the prompts, padded to
    the shortest length (what `Reference.call_kwargs` asks for). Cross attention learns to find the few real
    tokens far sooner when hundreds of pads do not share its weight (Wan reads text only there)."""
    width = max(len(features.tokens[i]) for i in ids) + 1
    dim = features.pad.numel()
    text = features.pad.expand(len(ids), width, dim).clone()
    bias = torch.full((len(ids), width), float("-inf"))
    low, high = math.log(LENGTHS[0]), math.log(LENGTHS[1])
    for row, i in enumerate(ids):
        n = len(features.tokens[i])
        length = LENGTHS[0] if short_share and rng.random() < short_share else round(math.exp(rng.uniform(low, high)))
        text[row, :n] = features.tokens[i]
        bias[row, :n] = 0.0
        bias[row, n] = math.log(length - n)
    return text, bias


def render_batch(ref: Reference, batch: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`batch` fresh scenes drawn from `seed`, as the VAE sees them: images [B, 3, H, W] or clips
    [B, 3, F, H, W], in [-1, 1], with their prompts."""
    scenes = shapes.sample_scenes(batch, seed, video=ref.kind == "video")
    pixels = [shapes.render(s, ref.size, ref.frames) for s in scenes]
    x = torch.stack(pixels)
    if ref.kind == "video":
        x = x.permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W] -> [B, 3, F, H, W]
    return x * 2 - 1, [shapes.prompt(s) for s in scenes]
