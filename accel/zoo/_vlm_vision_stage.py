"""The first stage of `ref-vlm`'s training (``--vision-steps``, `accel.zoo.train_vlm`): the vision tower alone.

The tower learns to show each visual token's colour, shape and motion from the token loss (`token_loss`); the
language model is not run. A step of the whole model costs about five times one of the tower alone (8 images: 0.32 s
against 0.07 s on this repository's 2-core CPU), and the language model trained beside a tower that still shows
little was drawn afresh afterwards anyway (it settles on answers it does not unlearn), so the tower's first steps
are the cheap ones. The word embeddings of the token loss's words learn with it; the others wait for the language
model. When the stage ends, every word gets the same norm (`even_word_norms`).
"""

from __future__ import annotations

import random

import torch

from accel.zoo import scenes_multi
from accel.zoo._vlm_train_data import TOKEN_WORDS, _segments_in_one_call, one_grid, prefix_inputs, token_targets

WORD_NORM = 2.3  # about the median word norm of weights trained jointly (the shipped ones: 0.7 to 4.3)


def vision_batch(seed: int, step: int, scenes: int, video_share: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the tower's inputs, the token loss's targets) of vision step `step`: `scenes` images, or (with probability
    `video_share`) half as many videos, drawn from a stream of their own, so a resumed run sees the same ones."""
    rng = random.Random(f"ref-vlm-vision-{seed}-{step}")
    video = rng.random() < video_share
    n = max(1, scenes // 2) if video else scenes
    drawn = [scenes_multi.sample_scene(rng, video) for _ in range(n)]
    prefix = prefix_inputs(drawn)
    key = "video" if video else "image"
    inputs = {"pixels": prefix[f"pixel_values{'_videos' if video else ''}"], "grid": prefix[f"{key}_grid_thw"]}
    targets = [token_targets(scene) for scene in drawn]
    return inputs, {name: torch.cat([t[name] for t in targets]) for name in TOKEN_WORDS}


def vision_features(model, inputs: dict) -> torch.Tensor:
    """The merger's output [tokens, width] of a `vision_batch`'s inputs: every scene's temporal patches as one grid
    whose segments attend in one call (as `accel.zoo._vlm_train_data.packed_forward` runs the prefixes)."""
    with _segments_in_one_call(model):
        out = model.model.visual(inputs["pixels"], grid_thw=one_grid(inputs["grid"]))
    return getattr(out, "pooler_output", out)


def even_word_norms(model, norm: float = WORD_NORM) -> None:
    """Scale every word embedding to `norm`, keeping its direction (an all-zero row, the padding's, stays zero).
    The token loss grows only its own words (colours to a norm of about 9 in this stage) and leaves the others at
    their draw (about 0.17); a language model on those frozen, tied embeddings then answered a colour to nearly
    every question, and on evened ones it learned faster than on the jointly trained words (benchmarks/RESULTS.md)."""
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        lengths = weight.norm(dim=1, keepdim=True)
        weight.copy_(torch.where(lengths > 0, weight * (norm / lengths.clamp_min(1e-12)), weight))
