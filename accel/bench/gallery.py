"""Baseline and accelerated outputs side by side, as files to look at: a PNG for images, an animated GIF for clips.

    write_image_row("demo-ref-flux.png", [baseline[0], fast[0]], ["baseline", "fast"])      # [3, H, W] each
    write_clip_row("demo-ref-wan.gif", [baseline[0], fast[0]], ["baseline", "fast"])        # [F, 3, H, W] each

Panels are the outputs in the order given, left to right, each enlarged `scale` times with nearest-neighbour
(tiny models make tiny pictures; nearest keeps their pixels honest), `GAP` pixels apart, over a white label row
`LABEL_HEIGHT` pixels high naming each panel. Pixels are floats in [0, 1]. A clip's GIF has one frame per clip
frame, all clips in step; Pillow merges consecutive frames that are identical in every panel into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from accel.zoo._base import UnsupportedInputError

GAP = 4  # pixels between panels
LABEL_HEIGHT = 16  # pixels of the label row above the panels
FONT_SIZE = 11


def _check(samples: Sequence[torch.Tensor], labels: Sequence[str], dims: int, layout: str) -> None:
    if not samples or len(samples) != len(labels):
        raise UnsupportedInputError(f"{len(samples)} panels for {len(labels)} labels; give one label per panel")
    shapes = {tuple(s.shape) for s in samples}
    if len(shapes) != 1 or any(s.dim() != dims or s.shape[-3] != 3 for s in samples):
        raise UnsupportedInputError(f"panels must all be {layout} floats in [0, 1] of one shape, got {sorted(shapes)}")


def _pil(image: torch.Tensor, scale: int):
    """[3, H, W] in [0, 1] -> RGB PIL image enlarged `scale` times (nearest)."""
    from PIL import Image

    pixels = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
    picture = Image.fromarray(pixels.contiguous().numpy(), "RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def _fit(text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _compose(panels: list, labels: Sequence[str]):
    """One picture: a label row over the panels, left to right."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = panels[0].size
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * GAP, LABEL_HEIGHT + h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = i * (w + GAP)
        canvas.paste(panel, (x, LABEL_HEIGHT))
        draw.text((x + 2, 2), _fit(label, font, w - 4), fill="black", font=font)
    return canvas


def write_image_row(path: str | Path, images: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 3) -> Path:
    """Images ([3, H, W] each) side by side under their labels, as a PNG at `path`."""
    _check(images, labels, 3, "[3, H, W]")
    path = Path(path)
    _compose([_pil(image, scale) for image in images], labels).save(path, format="PNG")
    return path


def write_clip_row(
    path: str | Path, clips: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 3, fps: float = 4.0
) -> Path:
    """Clips ([F, 3, H, W] each) side by side under their labels, played in step as an animated GIF at `path`
    (`fps` frames a second, looping)."""
    _check(clips, labels, 4, "[F, 3, H, W]")
    path = Path(path)
    frames = [_compose([_pil(clip[t], scale) for clip in clips], labels) for t in range(clips[0].shape[0])]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


__all__ = ["GAP", "LABEL_HEIGHT", "write_clip_row", "write_image_row"]
