"""Inputs of the tiny VLMs of `accel.zoo.vlm` (importable from there).

No tokenizer or processor is involved: `make_inputs` writes `input_ids` directly, with the image/video
placeholder token repeated exactly as many times as the real processor would expand it, plus every tensor
the model's `forward` needs (`pixel_values`, `image_sizes`, `image_grid_thw`, `mm_token_type_ids`, ...).

Shared tiny vocabulary (256 ids) for all four families:

* 0 = pad, 1 = bos, 2 = eos; ordinary text tokens are drawn from ``[3, 240)``;
* 250 = image placeholder, 251 = video placeholder, 252 = ``<|vision_start|>``, 253 = ``<|vision_end|>``
  (the last two are only used by the Qwen families, as their processors do).

Placeholder counts of the default inputs (one image per row, or one video per row with ``video=True``):

* ``llava``: 56 px image, patch 14 -> 4x4 = 16 tokens (CLS dropped by the "default" select strategy).
* ``llava_onevision``: AnyRes with 56 px tiles (pinpoints 56/112 px); default image of original size 60x90
  -> best resolution 112x112 = 1 base + 4 crop tiles -> base 4x4 = 16 + crop grid 8x8 unpadded to 6x8 = 48
  + 6 newlines = 70 tokens (ragged row 1: 100x70 -> 72); video 4 frames of 56 px -> 4 * 2x2 (pooled)
  + 1 newline = 17 tokens.
* ``qwen2_vl``: image 56x84 -> grid (1, 4, 6) -> 6 tokens after the 2x2 merger (ragged row 1: 84x84 -> 9);
  video 4 frames of 56x56 -> grid (2, 4, 4) -> 8 tokens (ragged row 1: 56x84 -> 12).
* ``qwen2_5_vl``: image 84x112 -> grid (1, 6, 8) -> 12 tokens (merged grid 3x4 split into 2x2-token windows,
  window_index = [0,1,4,5, 2,3,6,7, 8,9, 10,11]; ragged row 1: 112x112 -> 16); video 4 frames of 84x84 ->
  grid (2, 6, 6) -> 18 tokens (ragged row 1: 112x84 -> 24).
* Qwen prompts wrap the placeholders in ``<|vision_start|> ... <|vision_end|>`` and carry
  ``mm_token_type_ids``; Qwen2.5-VL videos also carry ``second_per_grid_ts`` (1.0).

With ``ragged=True`` row ``i`` gets a longer prompt (left-padded) and, for the dynamic-resolution families
(``llava_onevision`` images, Qwen images and videos), a different image size, hence a different placeholder
count per row. `make_inputs` also accepts the `TinyModel` itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from accel.zoo._base import TinyModel, UnknownModelError, UnsupportedInputError

# ----------------------------------------------------------------------------------------------------------
# Shared token ids
# ----------------------------------------------------------------------------------------------------------

VOCAB_SIZE = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_ID_RANGE = (3, 240)
IMAGE_TOKEN_ID = 250
VIDEO_TOKEN_ID = 251
VISION_START_ID = 252
VISION_END_ID = 253

# Prompt text around the visual block; ragged row i adds 3*i tokens before and i tokens after it.
_PREFIX_LEN, _SUFFIX_LEN = 4, 3

# Video length in frames for every family (Qwen: 2 temporal patches of 2 frames).
_VIDEO_FRAMES = 4

# LLaVA-OneVision: original (height, width) of the image in row i (ragged) / every row (not ragged).
_OV_IMAGE_SIZES = [(60, 90), (100, 70), (50, 50), (112, 112)]

# Qwen (height, width) in pixels: multiples of patch 14 * merge 2 = 28.
_QWEN2_IMAGE_SIZES = [(56, 84), (84, 84), (56, 56), (84, 112)]
_QWEN2_VIDEO_SIZES = [(56, 56), (56, 84), (84, 84), (28, 56)]
_QWEN25_IMAGE_SIZES = [(84, 112), (112, 112), (56, 84), (112, 140)]
_QWEN25_VIDEO_SIZES = [(84, 84), (112, 84), (56, 112), (84, 140)]


def family_of(model: Any) -> str:
    """Family key of a tiny (or any) model of the four supported classes, from its config's model_type."""
    model = model.obj if isinstance(model, TinyModel) else model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _VISUAL:
        raise UnknownModelError(
            f"not a supported VLM: {type(model).__name__} (model_type={model_type!r}); "
            f"pass a {', '.join(_VISUAL)} model"
        )
    return model_type


def _row_sizes(table: list, batch_size: int, ragged: bool) -> list:
    return [table[i % len(table)] if ragged else table[0] for i in range(batch_size)]


def _rand_text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(*TEXT_ID_RANGE, (n,), generator=gen).tolist()


def onevision_image_tokens(orig_hw: tuple[int, int], config) -> int:
    """Placeholder count of one single-image AnyRes input (mirrors `LlavaOnevisionProcessor`)."""
    from transformers.image_processing_utils import select_best_resolution

    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution(orig_hw, config.image_grid_pinpoints)
    cur_h, cur_w = side * (best_h // tile), side * (best_w // tile)
    orig_h, orig_w = orig_hw
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    unpadded, newlines = cur_h * cur_w, cur_h
    max_patches = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(cur_h * cur_w / (max_patches * side**2))
    if ratio > 1.1:
        unpadded = int(cur_h // ratio) * int(cur_w // ratio)
        newlines = int(cur_h // ratio)
    count = side * side + unpadded + newlines
    if config.vision_feature_select_strategy == "default":
        count -= 1
    return count


def _qwen_grid(hw: tuple[int, int], frames: int, vision_config) -> tuple[int, int, int]:
    p, t = vision_config.patch_size, vision_config.temporal_patch_size
    return (max(frames // t, 1), hw[0] // p, hw[1] // p)


class _Prompts:
    """The batch's prompt rows, built one at a time: random text around each row's visual tokens."""

    def __init__(self, gen: torch.Generator, batch_size: int, ragged: bool):
        self.gen, self.batch_size, self.ragged = gen, batch_size, ragged
        self.rows: list[list[int]] = []
        self.kinds: list[list[int]] = []  # 0 text, 1 image, 2 video (mm_token_type_ids)

    def add(self, visual: list[int], kind: int, bos: bool = False) -> None:
        i = len(self.rows) if self.ragged else 0
        prefix = _rand_text(_PREFIX_LEN + 3 * i, self.gen)
        suffix = _rand_text(_SUFFIX_LEN + i, self.gen)
        head = [BOS_ID] if bos else []
        self.rows.append(head + prefix + visual + suffix)
        visual_kinds = [kind if t in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID) else 0 for t in visual]
        self.kinds.append([0] * (len(head) + len(prefix)) + visual_kinds + [0] * len(suffix))

    def sizes(self, table: list) -> list:
        """Row i's entry of `table` when ragged, else the first entry for every row."""
        return _row_sizes(table, self.batch_size, self.ragged)

    def tensors(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and mm_token_type_ids [B, L], every row left-padded to the longest."""
        length = max(len(r) for r in self.rows)
        names = ("input_ids", "attention_mask", "mm_token_type_ids")
        out = {name: torch.zeros(self.batch_size, length, dtype=torch.long) for name in names}
        out["input_ids"].fill_(PAD_ID)
        for i, (ids, kind) in enumerate(zip(self.rows, self.kinds)):
            out["input_ids"][i, length - len(ids) :] = torch.tensor(ids)
            out["attention_mask"][i, length - len(ids) :] = 1
            out["mm_token_type_ids"][i, length - len(ids) :] = torch.tensor(kind)
        return out


def _llava_visual(config, prompts: _Prompts, video: bool) -> dict:
    if video:
        raise UnsupportedInputError(
            "llava has no video input: pass video=False, or use llava_onevision, qwen2_vl or qwen2_5_vl for videos"
        )
    vc = config.vision_config
    # patches, plus the CLS token unless the "default" strategy drops it
    n = (vc.image_size // vc.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
    pixel_values = torch.randn(prompts.batch_size, 3, vc.image_size, vc.image_size, generator=prompts.gen)
    for _ in range(prompts.batch_size):
        prompts.add([IMAGE_TOKEN_ID] * n, 1, bos=True)
    return {"pixel_values": pixel_values}


def _onevision_visual(config, prompts: _Prompts, video: bool) -> dict:
    from transformers.image_processing_utils import select_best_resolution

    vc = config.vision_config
    tile, batch_size = vc.image_size, prompts.batch_size
    if video:
        side = tile // vc.patch_size
        n = _VIDEO_FRAMES * math.ceil(side / 2) ** 2 + 1
        pixel_values_videos = torch.randn(batch_size, _VIDEO_FRAMES, 3, tile, tile, generator=prompts.gen)
        for _ in range(batch_size):
            prompts.add([VIDEO_TOKEN_ID] * n, 2)
        return {"pixel_values_videos": pixel_values_videos}
    sizes = prompts.sizes(_OV_IMAGE_SIZES)
    tiles = []
    for hw in sizes:
        bh, bw = select_best_resolution(hw, config.image_grid_pinpoints)
        tiles.append(1 + (bh // tile) * (bw // tile))
    pixel_values = torch.zeros(batch_size, max(tiles), 3, tile, tile)
    for i, (hw, count) in enumerate(zip(sizes, tiles)):
        pixel_values[i, :count] = torch.randn(count, 3, tile, tile, generator=prompts.gen)
        prompts.add([IMAGE_TOKEN_ID] * onevision_image_tokens(hw, config), 1)
    return {
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
        "batch_num_images": torch.ones(batch_size, dtype=torch.long),
    }


def _qwen_visual(config, prompts: _Prompts, video: bool) -> dict:
    vc = config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    if config.model_type == "qwen2_vl":
        table = _QWEN2_VIDEO_SIZES if video else _QWEN2_IMAGE_SIZES
    else:
        table = _QWEN25_VIDEO_SIZES if video else _QWEN25_IMAGE_SIZES
    grids = [_qwen_grid(hw, _VIDEO_FRAMES if video else 1, vc) for hw in prompts.sizes(table)]
    token_id, kind = (VIDEO_TOKEN_ID, 2) if video else (IMAGE_TOKEN_ID, 1)
    patches = []
    for t, h, w in grids:
        patches.append(torch.randn(t * h * w, patch_dim, generator=prompts.gen))
        n = t * h * w // vc.spatial_merge_size**2
        prompts.add([VISION_START_ID] + [token_id] * n + [VISION_END_ID], kind)
    grid_thw = torch.tensor(grids, dtype=torch.long)
    if not video:
        return {"pixel_values": torch.cat(patches), "image_grid_thw": grid_thw}
    extra = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": grid_thw}
    if config.model_type == "qwen2_5_vl":
        # temporal_patch_size / fps with fps = 2, as the processor computes it
        extra["second_per_grid_ts"] = torch.full((prompts.batch_size,), 1.0)
    return extra


_VISUAL = {
    "llava": _llava_visual,
    "llava_onevision": _onevision_visual,
    "qwen2_vl": _qwen_visual,
    "qwen2_5_vl": _qwen_visual,
}


def make_inputs(
    tiny_or_model: Any, seed: int = 0, batch_size: int = 1, video: bool = False, ragged: bool = False
) -> dict:
    """`generate()` kwargs for a tiny VLM: token ids with expanded placeholders plus the visual tensors.

    One image per row (or one video per row with ``video=True``; LLaVA has no video input and raises).
    Rows get different random text and pixels. ``ragged=True`` (meaningful with ``batch_size > 1``) makes
    row ``i``'s prompt ``4*i`` tokens longer, left-pads all rows to the same length, and for the dynamic
    resolution families also gives each row a different image/video size. Deterministic in ``seed``; the
    global RNG is not touched.
    """
    model = tiny_or_model.obj if isinstance(tiny_or_model, TinyModel) else tiny_or_model
    family = family_of(model)
    dtype = next(model.parameters()).dtype
    prompts = _Prompts(torch.Generator().manual_seed(seed), batch_size, ragged)
    extra = _VISUAL[family](model.config, prompts, video)
    inputs = prompts.tensors()
    if family not in ("qwen2_vl", "qwen2_5_vl"):
        del inputs["mm_token_type_ids"]
    for key, value in extra.items():
        inputs[key] = value.to(dtype) if value.is_floating_point() and key != "second_per_grid_ts" else value
    return inputs
