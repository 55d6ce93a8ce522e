"""The toy domain of the reference models: one simple shape on a plain or gradient background.

Issue 12 trains small diffusion models (`ref-flux` images, `ref-wan` clips) on renders of this domain, and
`accel.bench.prompt_score` checks what a pipeline produced against its prompt with a hand-written detector of
the same vocabulary. Prompts read ``"a {colour} {shape} on a {background} background"``, with
``" moving {direction}"`` appended for clips. Everything is seeded and vectorised (no loop over pixels).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from accel.zoo._base import UnsupportedInputError

# RGB in [0, 1]. Foreground colours are saturated; backgrounds darker or duller, so every pair contrasts.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.1, 0.1),
    "green": (0.1, 0.8, 0.15),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (0.95, 0.15, 0.9),
    "cyan": (0.1, 0.9, 0.95),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.45, 0.45, 0.45),
    "beige": (0.82, 0.74, 0.58),
    "navy": (0.05, 0.08, 0.4),
}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit step of each direction in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}

TRAVEL = 0.3  # distance a clip's shape covers from first to last frame, as a fraction of the image
GRADIENT = 0.25  # brightness change of a gradient background from top to bottom (added to every channel)
MARGIN = 0.0625  # gap between a shape's bounding box and the image edge: 2 clean border pixels at 32 px
IMAGE_SIZES = (0.3, 0.55)  # range of a shape's extent (bounding box side) in a still image
CLIP_SIZES = (0.25, 0.45)  # smaller in clips, which also need room to travel


@dataclass(frozen=True)
class Scene:
    """One sample of the domain. Centre and size are fractions of the image side; `size` is the extent of
    the shape's bounding box. In a clip, (cx, cy) is the centre at the middle of the clip."""

    colour: str
    shape: str
    background: str
    gradient: bool = False
    cx: float = 0.5
    cy: float = 0.5
    size: float = 0.4
    motion: str | None = None


def prompt(scene: Scene) -> str:
    """The prompt of a scene: ``"a red circle on a navy background"`` (+ ``" moving left"`` in a clip)."""
    text = f"a {scene.colour} {scene.shape} on a {scene.background} background"
    return f"{text} moving {scene.motion}" if scene.motion else text


def _vocabulary() -> str:
    return (
        f"colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; backgrounds {', '.join(BACKGROUNDS)}; "
        f"motions {', '.join(MOTIONS)}"
    )


def parse_prompt(text: str) -> dict:
    """The attributes of a domain prompt: {"colour", "shape", "background", "motion" (None for an image)}.

    Raises `UnsupportedInputError` naming the expected form and the vocabulary for any other text.
    """
    words = str(text).strip().lower().split()
    form = "'a {colour} {shape} on a {background} background' [+ ' moving {direction}']"
    ok = len(words) in (7, 9) and words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background"
    ok = ok and (len(words) == 7 or words[7] == "moving")
    if not ok:
        raise UnsupportedInputError(f"prompt {text!r} is outside the shapes domain; write {form} with {_vocabulary()}")
    fields = {
        "colour": words[1],
        "shape": words[2],
        "background": words[5],
        "motion": words[8] if len(words) == 9 else None,
    }
    vocab = {"colour": COLOURS, "shape": SHAPES, "background": BACKGROUNDS, "motion": MOTIONS}
    for key, word in fields.items():
        if word is not None and word not in vocab[key]:
            raise UnsupportedInputError(
                f"unknown {key} {word!r} in prompt {text!r}; the shapes domain knows {_vocabulary()}"
            )
    return fields


def _placement(rng: random.Random, video: bool, motion: str | None) -> tuple[float, float, float]:
    """Centre and size such that the bounding box stays MARGIN inside the image at every frame."""
    size = rng.uniform(*(CLIP_SIZES if video else IMAGE_SIZES))
    half = size / 2 + MARGIN
    dx, dy = DIRECTIONS[motion] if motion else (0.0, 0.0)
    room_x, room_y = abs(dx) * TRAVEL / 2, abs(dy) * TRAVEL / 2
    cx = rng.uniform(half + room_x, 1 - half - room_x)
    cy = rng.uniform(half + room_y, 1 - half - room_y)
    return cx, cy, size


def _random_scene(rng: random.Random, video: bool, **fixed) -> Scene:
    colour = fixed.get("colour") or rng.choice(list(COLOURS))
    shape = fixed.get("shape") or rng.choice(SHAPES)
    background = fixed.get("background") or rng.choice(list(BACKGROUNDS))
    motion = (fixed.get("motion") or rng.choice(MOTIONS)) if video else None
    gradient = rng.random() < 0.5
    cx, cy, size = _placement(rng, video, motion)
    return Scene(colour, shape, background, gradient, cx, cy, size, motion)


def sample_scenes(n: int, seed: int, video: bool = False) -> list[Scene]:
    """`n` scenes drawn from `seed` (same seed, same scenes); clips (`video=True`) get a motion."""
    rng = random.Random(seed)
    return [_random_scene(rng, video) for _ in range(n)]


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Distance to the shape's outline (negative inside), in image fractions; `r` is half the extent.

    Exact near the edges, which is all the anti-aliasing needs."""
    ax, ay = dx.abs(), dy.abs()
    if shape == "circle":
        return torch.hypot(dx, dy) - r
    if shape == "square":
        return torch.maximum(ax, ay) - r
    if shape == "ring":  # outer radius r, hole radius 0.45 r
        return (torch.hypot(dx, dy) - 0.725 * r).abs() - 0.275 * r
    if shape == "cross":  # two bars of half-width 0.3 r
        horizontal = torch.maximum(ax - r, ay - 0.3 * r)
        vertical = torch.maximum(ax - 0.3 * r, ay - r)
        return torch.minimum(horizontal, vertical)
    if shape == "triangle":  # apex up, base at the bottom, bounding box centred on (cx, cy)
        h = 0.875 * r
        base = dy - h
        side = (2 * h * ax - r * (dy + h)) / math.hypot(2 * h, r)
        return torch.maximum(base, side)
    raise UnsupportedInputError(f"unknown shape {shape!r}; the shapes domain knows {', '.join(SHAPES)}")


def _background(scene: Scene, size: int) -> torch.Tensor:
    base = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1)
    if not scene.gradient:
        return base.expand(3, size, size).clone()
    y = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    ramp = (GRADIENT * (y - 0.5)).view(1, size, 1)  # darker at the top, brighter at the bottom
    return (base + ramp).clamp(0, 1).expand(3, size, size).clone()


def _frame(scene: Scene, size: int, cx: float, cy: float) -> torch.Tensor:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dy, dx = coords.view(size, 1) - cy, coords.view(1, size) - cx
    distance = _signed_distance(scene.shape, dx, dy, scene.size / 2)
    alpha = (0.5 - distance * size).clamp(0, 1)  # one-pixel linear edge: anti-aliased, cheap
    colour = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
    background = _background(scene, size)
    return background + alpha * (colour - background)


def _check(scene: Scene, size: int, frames: int | None) -> None:
    if scene.colour not in COLOURS or scene.shape not in SHAPES or scene.background not in BACKGROUNDS:
        raise UnsupportedInputError(f"scene {scene} is outside the shapes domain: {_vocabulary()}")
    if scene.motion is not None and scene.motion not in MOTIONS:
        raise UnsupportedInputError(f"unknown motion {scene.motion!r}; choose one of {', '.join(MOTIONS)}")
    if not 0 < scene.size <= 1:
        raise UnsupportedInputError(f"scene size {scene.size}; give the shape's extent as a fraction in (0, 1]")
    if int(size) < 8:
        raise UnsupportedInputError(f"render size {size} is too small; use at least 8 pixels")
    if frames is not None and int(frames) < 1:
        raise UnsupportedInputError(f"frames={frames}; give a positive frame count, or None for an image")


def render(scene: Scene, size: int = 64, frames: int | None = None) -> torch.Tensor:
    """Float32 pixels in [0, 1]: [3, size, size] for `frames=None`, else [frames, 3, size, size].

    In a clip the shape moves steadily by TRAVEL (centred on the scene's centre) in its motion's direction;
    a scene without a motion stands still."""
    _check(scene, size, frames)
    if frames is None:
        return _frame(scene, size, scene.cx, scene.cy)
    dx, dy = DIRECTIONS[scene.motion] if scene.motion else (0.0, 0.0)
    steps = [i / (frames - 1) - 0.5 if frames > 1 else 0.0 for i in range(frames)]
    return torch.stack([_frame(scene, size, scene.cx + dx * TRAVEL * t, scene.cy + dy * TRAVEL * t) for t in steps])


def scene_for(text: str, seed: int = 0) -> Scene:
    """The scene of a prompt: attributes from the text; position, size and gradient drawn from `seed`."""
    fields = parse_prompt(text)
    return _random_scene(random.Random(seed), fields["motion"] is not None, **fields)


def render_prompt(text: str, seed: int = 0, size: int = 64, frames: int | None = None) -> torch.Tensor:
    """The ground truth of a prompt (see `scene_for` and `render`). A motion prompt needs `frames`."""
    scene = scene_for(text, seed)
    if scene.motion is not None and frames is None:
        raise UnsupportedInputError(f"prompt {text!r} describes a clip; pass frames= (e.g. 9) to render it")
    return render(scene, size, frames)
