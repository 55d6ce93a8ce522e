"""What one request may ask for, and the messages it gets when it asks for more.

The app runs on a shared machine, so every input is bounded. A request outside the bounds is refused before any
model runs, with one of these messages (README.md, "The app" lists them; `AppInputError` carries them to the page and to
`gradio_client`, which raises it as `AppError` with the same text):

    steps must be between 1 and {max_steps}, got {value}
    size must be a multiple of 8 between {min_size} and {max_size} pixels, got {value}
    frames must be between 1 and {max_frames}, got {value}
    new tokens must be between 1 and {max_new_tokens}, got {value}
    seed must be between 0 and 2**32 - 1, got {value}
    the prompt has {n} characters; the limit is {max_prompt_chars}
    the upload is {size} MB; the limit is {max_upload_mb} MB
    the upload {name!r} is not an image (PNG, JPEG, WebP, BMP or GIF) / not a video (MP4, WebM, MOV, MKV or AVI)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from accel._validate import check_int
from accel.errors import AccelError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
MAX_SEED = 2**32 - 1


class AppInputError(AccelError, ValueError):
    """A request to the app outside its bounds, or an input it cannot read; the message says which and why."""


@dataclass
class Limits:
    """Bounds of one request (the defaults suit a CPU; raise them on a GPU server)."""

    max_steps: int = 50
    min_size: int = 32
    max_size: int = 512
    max_frames: int = 33
    max_new_tokens: int = 64
    max_prompt_chars: int = 300
    max_upload_mb: int = 20

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_frames", "max_new_tokens", "max_prompt_chars", "max_upload_mb"):
            check_int(self, name, low=1)
        check_int(self, "min_size", low=8)
        check_int(self, "max_size", low=self.min_size)

    def check_steps(self, value: int) -> int:
        return _between("steps", value, 1, self.max_steps)

    def check_size(self, value: int) -> int:
        value = _integer("size", value)
        if value % 8 or not self.min_size <= value <= self.max_size:
            raise AppInputError(
                f"size must be a multiple of 8 between {self.min_size} and {self.max_size} pixels, got {value}"
            )
        return value

    def check_frames(self, value: int) -> int:
        return _between("frames", value, 1, self.max_frames)

    def check_new_tokens(self, value: int) -> int:
        return _between("new tokens", value, 1, self.max_new_tokens)

    def check_prompt(self, text: str) -> str:
        if not isinstance(text, str):
            raise AppInputError(f"the prompt must be text, got {type(text).__name__}")
        if len(text) > self.max_prompt_chars:
            raise AppInputError(f"the prompt has {len(text)} characters; the limit is {self.max_prompt_chars}")
        return text

    def check_upload(self, path: str, suffixes: tuple[str, ...], kind: str) -> str:
        """`path` if it names a file of an allowed suffix within the size limit (its content is checked when
        it is decoded, by `accel.app.media`)."""
        name = os.path.basename(path)
        if not path.lower().endswith(suffixes):
            allowed = ", ".join(s[1:].upper() for s in suffixes if s != ".jpeg")
            raise AppInputError(f"the upload {name!r} is not {kind} ({allowed})")
        size = os.path.getsize(path)
        if size > self.max_upload_mb * 2**20:
            raise AppInputError(f"the upload is {size / 2**20:.1f} MB; the limit is {self.max_upload_mb} MB")
        return path


def _integer(name: str, value) -> int:
    # Sliders and JSON send floats for whole numbers; 12.5 steps is a mistake worth naming.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise AppInputError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _between(name: str, value, low: int, high: int) -> int:
    value = _integer(name, value)
    if not low <= value <= high:
        raise AppInputError(f"{name} must be between {low} and {high}, got {value}")
    return value


def check_seed(value) -> int:
    value = _integer("seed", value)
    if not 0 <= value <= MAX_SEED:
        raise AppInputError(f"seed must be between 0 and 2**32 - 1, got {value}")
    return value
