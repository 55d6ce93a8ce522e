"""Pixels to files and uploads to pixels.

Outputs: images as PNG, clips as H.264 MP4 written with PyAV (`av`, part of the `app` extra: its wheels carry
their own FFmpeg, so no system FFmpeg is needed), both enlarged with nearest-neighbour for the page (tiny models
make 64 px pictures; nearest keeps their pixels honest) and at their own size for the API. Uploads are decoded as
images (Pillow) or videos (PyAV) only; anything else is refused with `AppInputError`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from accel.app.limits import AppInputError

DISPLAY_SIDE = 256  # smaller outputs are enlarged by a whole factor to at least this side for the page
FPS = 8
VLM_FRAMES = 8  # frames read from an uploaded video for a VLM, evenly spaced


def _uint8(pixels: torch.Tensor, scale: int) -> torch.Tensor:
    """[..., 3, H, W] floats in [0, 1] -> [..., H*scale, W*scale, 3] uint8 (nearest)."""
    x = pixels.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return x.movedim(-3, -1).contiguous()


def display_scale(pixels: torch.Tensor) -> int:
    side = min(pixels.shape[-2:])
    return max(1, -(-DISPLAY_SIDE // side))


def to_pil(pixels: torch.Tensor, scale: int = 1):
    """The first image of a [B, 3, H, W] batch as a PIL image, enlarged `scale` times."""
    from PIL import Image

    return Image.fromarray(_uint8(pixels[0], scale).numpy(), "RGB")


def write_png(pixels: torch.Tensor, path: Path, scale: int = 1) -> str:
    to_pil(pixels, scale).save(path, format="PNG")
    return str(path)


def write_mp4(pixels: torch.Tensor, path: Path, scale: int = 1) -> str:
    """The first clip of a [B, F, 3, H, W] batch as an H.264 MP4 at FPS frames per second."""
    try:
        import av
    except ImportError:
        raise AppInputError('writing videos needs PyAV: pip install av (or pip install "accel[app]")') from None
    frames = _uint8(pixels[0], scale).numpy()
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = width + width % 2, height + height % 2  # yuv420p needs even sides
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}  # near-lossless: the differences shown are the model's, not the codec's
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(stream.width, stream.height)
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return str(path)


def read_image(path: str):
    """An uploaded image as RGB PIL (one frame of an animated file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        raise AppInputError(f"the upload {Path(path).name!r} is not an image Pillow can read") from None


def read_video(path: str, frames: int = VLM_FRAMES) -> list:
    """`frames` evenly spaced frames of an uploaded video as RGB PIL images."""
    try:
        import av
    except ImportError:
        raise AppInputError('reading videos needs PyAV: pip install av (or pip install "accel[app]")') from None
    kept = []
    try:
        with av.open(path) as container:
            total = container.streams.video[0].frames  # 0 when the container does not say
            step = max(1, total // frames)
            for index, frame in enumerate(container.decode(video=0)):  # decoded one at a time, most dropped
                if index % step == 0:
                    kept.append(frame.to_image().convert("RGB"))
                if len(kept) == frames:
                    break
    except (av.FFmpegError, IndexError, ValueError):
        raise AppInputError(f"the upload {Path(path).name!r} is not a video PyAV can read") from None
    if not kept:
        raise AppInputError(f"the upload {Path(path).name!r} has no video frames")
    return kept
