"""Prompt-following score for the shapes domain (`accel.zoo.shapes`): GenEval in miniature.

A hand-written detector (no training) reads background, colour, shape and, for a clip, motion direction from
pixels; `score` compares the readings with what each prompt asks for. Steps: the background per row from the
left/right border columns (a vertical gradient stays exact), the nearest background colour; the foreground's
coverage from each pixel's projection onto the line between background and foreground colour; the colour as
the nearest palette colour of the foreground's median; the shape from mask features (hole, fill of the
bounding box, top/bottom width asymmetry); motion from the foreground centroid's track.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from accel.zoo._base import UnsupportedInputError
from accel.zoo.shapes import BACKGROUNDS, COLOURS, parse_prompt

LAYOUTS = (
    "an image as a float torch tensor [3, H, W] in [0, 1], a numpy array [H, W, 3] (uint8, or float in [0, 1]) "
    "or a PIL image; a clip as a torch tensor [T, 3, H, W], a numpy array [T, H, W, 3] or a list of images"
)
BORDER = 2  # border columns read for the background (shapes keep a margin off the edges)
FOREGROUND = 0.12  # colour distance from the background that marks a pixel as surely foreground
NOISY = 0.01  # pixel noise (std) above which frames are smoothed before reading
MOVE = 0.08  # least centroid travel, as a fraction of the image side, that counts as clear motion


def _as_image(image) -> torch.Tensor:
    """Any accepted image layout as float32 [3, H, W] in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.array(image.convert("RGB"))  # a writable copy
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise UnsupportedInputError(f"image array of shape {image.shape}; accepted: {LAYOUTS}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        image = torch.from_numpy(np.ascontiguousarray(image)).float().div(scale).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise UnsupportedInputError(f"image of shape/type {shape}; accepted: {LAYOUTS}")
    if not image.is_floating_point():
        raise UnsupportedInputError(f"image tensor of dtype {image.dtype}; accepted: {LAYOUTS}")
    return image.detach().float().cpu().clamp(0, 1)


def _as_clip(frames) -> list[torch.Tensor]:
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        return [_as_image(f) for f in frames]
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4:
            raise UnsupportedInputError(f"clip tensor of shape {tuple(frames.shape)}; accepted: {LAYOUTS}")
        return [_as_image(f) for f in frames]
    if isinstance(frames, (list, tuple)) and frames:
        return [_as_image(f) for f in frames]
    raise UnsupportedInputError(f"clip of type {type(frames).__name__}; accepted: {LAYOUTS}")


def _nearest(colour: torch.Tensor, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    distances = (torch.tensor([palette[n] for n in names]) - colour).norm(dim=1)
    return names[int(distances.argmin())]


def _background_rows(image: torch.Tensor) -> torch.Tensor:
    """[3, H, 1] background colour of each row: median of its border pixels, smoothed over 3 rows."""
    border = torch.cat([image[:, :, :BORDER], image[:, :, -BORDER:]], dim=2)
    rows = border.median(dim=2).values  # [3, H]
    padded = torch.cat([rows[:, :1], rows, rows[:, -1:]], dim=1)
    return ((padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3).unsqueeze(2)


def _coverage(raw: torch.Tensor, image: torch.Tensor, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground colour [3] and per-pixel coverage [H, W] (0 background, 1 foreground) of `raw`; colours are
    read from its `image = _denoised(raw)`, coverage from `raw` itself (blurring would round the corners)."""
    sure = _clean((image - background).norm(dim=0) > FOREGROUND)
    if int(sure.sum()) < 3:
        return torch.full((3,), float("nan")), torch.zeros(image.shape[1:])
    core = _box3(sure.float()) > 0.99  # away from the edges, where pixels mix with the background
    colour = image[:, core if int(core.sum()) >= 3 else sure].median(dim=1).values
    direction = colour.view(3, 1, 1) - background  # per row: the gradient changes the background
    alpha = ((raw - background) * direction).sum(0) / direction.pow(2).sum(0).clamp_min(1e-6)
    return colour, alpha.clamp(0, 1)


def _noise(image: torch.Tensor) -> float:
    """Pixel noise estimate: median absolute difference of horizontal neighbours in the border columns."""
    border = image[:, :, : 2 * BORDER]
    return float((border[:, :, 1:] - border[:, :, :-1]).abs().median()) * 1.05


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean over the last two dims, edges replicated (slices: far cheaper than pooling ops on tiny frames)."""
    x = torch.cat([x[..., :1, :], x, x[..., -1:, :]], dim=-2)
    x = torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    return (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]) / 9


def _denoised(image: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur where the border shows pixel noise (it cuts the noise threefold); clean images as given."""
    return _box3(image) if _noise(image) >= NOISY else image


def _clean(mask: torch.Tensor) -> torch.Tensor:
    """3x3 majority vote: drops isolated noise pixels, keeps edges."""
    return _box3(mask.float()) > 0.5


def _shape(mask: torch.Tensor) -> tuple[str, dict]:
    """Shape name from a boolean foreground mask, with the features it was read from."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) < 4:
        return "none", {}
    top, bottom, left, right = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    box = mask[top : bottom + 1, left : right + 1].float()
    h, w = box.shape
    fill = float(box.mean())
    centre = box[h // 2 - h // 8 : h // 2 + h // 8 + 1, w // 2 - w // 8 : w // 2 + w // 8 + 1]
    hole = float(centre.mean())
    widths = box.sum(1)
    quarter = max(1, h // 4)
    upper, lower = float(widths[:quarter].mean()), float(widths[-quarter:].mean())
    taper = (lower - upper) / max(lower, upper, 1.0)
    features = {"fill": round(fill, 3), "hole": round(hole, 3), "taper": round(taper, 3)}
    if hole < 0.5:
        name = "ring"
    elif taper > 0.5:
        name = "triangle"
    elif fill > 0.92:
        name = "square"
    elif fill > 0.65:
        name = "circle"
    else:
        name = "cross"
    return name, features


def _read(image: torch.Tensor) -> dict:
    """Detections and the foreground's coverage map of one [3, H, W] frame."""
    smooth = _denoised(image)
    background = _background_rows(smooth)
    colour, alpha = _coverage(image, smooth, background)
    mask = _clean(alpha > 0.5)
    shape, features = _shape(mask)
    found = not torch.isnan(colour).any() and shape != "none"
    return {
        "background": _nearest(background.mean(dim=(1, 2)), BACKGROUNDS),
        "colour": _nearest(colour, COLOURS) if found else None,
        "shape": shape if found else None,
        "features": features,
        "alpha": alpha * mask,
    }


def detect(image) -> dict:
    """{"background", "colour", "shape", "features"} read from one image (layouts: see LAYOUTS).

    `colour` and `shape` are None where no foreground stands out from the background."""
    reading = _read(_as_image(image))
    reading.pop("alpha")
    return reading


def _vote(values: list) -> str | None:
    return Counter(values).most_common(1)[0][0] if values else None


def _motion(alphas: list[torch.Tensor]) -> str | None:
    """Direction of the least-squares line through the centroids; None unless it moves clearly along one axis."""
    h, w = alphas[0].shape
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    track = []
    for alpha in alphas:
        total = float(alpha.sum())
        if total > 0:
            track.append((float((alpha.sum(0) * xs).sum()) / total / w, float((alpha.sum(1) * ys).sum()) / total / h))
    if len(track) < 2:
        return None
    t = torch.linspace(-0.5, 0.5, len(track))
    points = torch.tensor(track)
    slope = (t.unsqueeze(1) * (points - points.mean(0))).sum(0) / t.pow(2).sum()  # travel over the whole clip
    dx, dy = float(slope[0]), float(slope[1])
    if max(abs(dx), abs(dy)) < MOVE or min(abs(dx), abs(dy)) > 0.5 * max(abs(dx), abs(dy)):
        return None
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def detect_clip(frames) -> dict:
    """`detect` over a clip (majority vote per attribute across frames) plus "motion" (None if it does not
    move clearly along one axis)."""
    readings = [_read(f) for f in _as_clip(frames)]
    result = {key: _vote([r[key] for r in readings]) for key in ("background", "colour", "shape")}
    result["motion"] = _motion([r["alpha"] for r in readings])
    return result


def _is_clip(sample) -> bool:
    if isinstance(sample, (torch.Tensor, np.ndarray)):
        return sample.ndim == 4
    return isinstance(sample, (list, tuple))


def _samples(images_or_clips) -> list:
    if isinstance(images_or_clips, (torch.Tensor, np.ndarray)):
        if images_or_clips.ndim in (4, 5):
            return list(images_or_clips)
        raise UnsupportedInputError(
            f"batch of shape {tuple(images_or_clips.shape)}; give a batch [B, ...] or a list of samples: {LAYOUTS}"
        )
    return list(images_or_clips)


def score(images_or_clips, prompts: Sequence[str]) -> dict:
    """How well samples follow their prompts.

    `images_or_clips`: a list of images/clips (layouts: see LAYOUTS) or a batch tensor/array. Returns
    {"colour", "shape", "background", "motion", "overall", "n", "samples"}: per-attribute accuracy (motion over
    the samples whose prompt has one; None if none has), the share with every attribute right, and per
    sample the prompt, the detections and which attributes were right."""
    samples, prompts = _samples(images_or_clips), list(prompts)
    if len(samples) != len(prompts) or not samples:
        raise UnsupportedInputError(f"{len(samples)} samples for {len(prompts)} prompts; give one prompt per sample")
    rows = []
    for sample, text in zip(samples, prompts):
        wanted = parse_prompt(text)
        if wanted["motion"] is not None and not _is_clip(sample):
            raise UnsupportedInputError(f"prompt {text!r} describes a clip but its sample is one image; pass the clip")
        found = detect_clip(sample) if _is_clip(sample) else detect(sample)
        keys = [k for k in ("colour", "shape", "background", "motion") if wanted[k] is not None]
        right = {k: found.get(k) == wanted[k] for k in keys}
        rows.append({"prompt": text, "detected": found, "right": right})
    result: dict = {"n": len(rows)}
    for key in ("colour", "shape", "background", "motion"):
        marks = [row["right"][key] for row in rows if key in row["right"]]
        result[key] = sum(marks) / len(marks) if marks else None
    result["overall"] = sum(all(row["right"].values()) for row in rows) / len(rows)
    result["samples"] = rows
    return result
