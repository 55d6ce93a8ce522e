"""Scenes of one to four shapes and the one-word questions `ref-vlm` answers about them (issue 13).

Built on the shapes domain of `accel.zoo.shapes` (its colours, shapes, backgrounds and renderer), by composition:
each shape sits in its own cell of a 2x2 grid ("top left", ..., "bottom right"), so "the shape at the top left"
and "on the left or the right" always have one answer. Colours are distinct within a scene, so "the red one"
names one shape. A video is `FRAMES` frames in which every shape moves steadily in its own direction without
leaving its cell.

Question types (every answer is one word of the tokenizer, see `accel.zoo.reference_vlm`):

    colour_at   what colour is the shape at the top left ?            -> red
    shape_of    what shape is the red one ?                           -> ring
    count       how many shapes are there ?                           -> 3
    horizontal  is the red ring on the left or the right ?            -> left
    vertical    is the red ring at the top or the bottom ?            -> bottom
    motion      which way does the red ring move ?   (videos only)    -> up

Everything is seeded: `sample_scene(rng, video)` draws from a `random.Random`, `questions(scene)` lists every
question a scene supports in a fixed order, and `held_out()` is the fixed evaluation set of 300 (225 on images,
75 on videos), drawn from seeds no training stream uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from accel.zoo import shapes
from accel.zoo._base import UnsupportedInputError

SIZE = 128  # image side in pixels
FRAMES = 4  # video length: 2 temporal patches of 2 frames
MAX_SHAPES = 4
MAX_VIDEO_SHAPES = 3
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major 2x2 grid
# A shape's bounding-box side, as a fraction of the image (a cell is 0.5). Small enough that a shape covers few
# visual tokens (6 to 17 of 256 for 80% of shapes, counting those it covers by a quarter), so that pruning at random
# loses whole shapes: at (0.2, 0.34) random keep at 12.5% lost 9.5 points of ref-vlm's accuracy, at this size 15.5.
IMAGE_EXTENT = (0.16, 0.28)
VIDEO_EXTENT = (0.16, 0.24)
VIDEO_TRAVEL = 0.14  # distance a shape covers from the first frame to the last
CELL_MARGIN = 0.03  # gap between a shape's bounding box and its cell's border
TYPES = ("colour_at", "shape_of", "count", "horizontal", "vertical", "motion")
IMAGE_TYPES = TYPES[:5]
HELD_OUT_IMAGES, HELD_OUT_VIDEOS = 225, 75
HELD_OUT_SEED = 1_000_003  # the held-out set's streams (this seed and the next); training draws from others
VALIDATION_SEED = 2_000_003  # what the trainer checks itself on


@dataclass(frozen=True)
class Placed:
    """One shape of a scene: its cell index into `CELLS`, centre (mid-clip) and extent as image fractions."""

    colour: str
    shape: str
    cell: int
    cx: float
    cy: float
    size: float
    motion: str | None = None


@dataclass(frozen=True)
class MultiScene:
    background: str
    gradient: bool
    items: tuple[Placed, ...]
    video: bool = False


@dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str
    scene: MultiScene
    item: int | None = None  # the index in `scene.items` of the shape it asks about (None: a count)

    @property
    def video(self) -> bool:
        return self.scene.video


def _place(rng: random.Random, cell: int, video: bool) -> tuple[float, float, float]:
    size = rng.uniform(*(VIDEO_EXTENT if video else IMAGE_EXTENT))
    room = size / 2 + CELL_MARGIN + (VIDEO_TRAVEL / 2 if video else 0.0)  # motion-free room on every side
    row, col = divmod(cell, 2)
    cx = rng.uniform(col * 0.5 + room, col * 0.5 + 0.5 - room)
    cy = rng.uniform(row * 0.5 + room, row * 0.5 + 0.5 - room)
    return cx, cy, size


def sample_scene(rng: random.Random, video: bool = False, count: int | None = None) -> MultiScene:
    """A scene drawn from `rng`: `count` shapes (1 to MAX_SHAPES, or MAX_VIDEO_SHAPES for a video, drawn when
    None) in distinct cells with distinct colours; a video's shapes each move in a drawn direction."""
    top = MAX_VIDEO_SHAPES if video else MAX_SHAPES
    n = rng.randint(1, top) if count is None else count
    if not 1 <= n <= top:
        raise UnsupportedInputError(f"a {'video' if video else 'image'} holds 1 to {top} shapes, not {n}")
    background = rng.choice(list(shapes.BACKGROUNDS))
    gradient = rng.random() < 0.5
    cells = sorted(rng.sample(range(len(CELLS)), n))
    colours = rng.sample(list(shapes.COLOURS), n)
    items = []
    for cell, colour in zip(cells, colours):
        shape = rng.choice(shapes.SHAPES)
        motion = rng.choice(shapes.MOTIONS) if video else None
        items.append(Placed(colour, shape, cell, *_place(rng, cell, video), motion))
    return MultiScene(background, gradient, tuple(items), video)


def _alphas(scene: MultiScene, size: int, t: float) -> list[torch.Tensor]:
    """Each shape's coverage [size, size] in [0, 1] at clip time `t` in [-0.5, 0.5] (0 for an image)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    out = []
    for item in scene.items:
        dx, dy = shapes.DIRECTIONS[item.motion] if item.motion else (0.0, 0.0)
        cx, cy = item.cx + dx * VIDEO_TRAVEL * t, item.cy + dy * VIDEO_TRAVEL * t
        distance = shapes._signed_distance(
            item.shape, coords.view(1, size) - cx, coords.view(size, 1) - cy, item.size / 2
        )
        out.append((0.5 - distance * size).clamp(0, 1))  # the one-pixel anti-aliased edge of accel.zoo.shapes
    return out


def _times(frames: int) -> list[float]:
    return [i / (frames - 1) - 0.5 for i in range(frames)] if frames > 1 else [0.0]


def _frame(scene: MultiScene, size: int, t: float) -> torch.Tensor:
    """One frame: the background, then each shape over it."""
    base = shapes.Scene(scene.items[0].colour, scene.items[0].shape, scene.background, scene.gradient)
    image = shapes._background(base, size)
    for item, alpha in zip(scene.items, _alphas(scene, size, t)):
        colour = torch.tensor(shapes.COLOURS[item.colour]).view(3, 1, 1)
        image = image + alpha * (colour - image)
    return image


def owners(scene: MultiScene, cell: int, size: int = SIZE, frames: int = FRAMES, group: int = 2) -> torch.Tensor:
    """Which shape each `cell` x `cell` pixel block shows: [T, size/cell, size/cell] indices into `scene.items`, -1
    where no shape covers a quarter of the block. A video's frames are averaged in groups of `group` (T of them);
    an image has T = 1. Shapes drawn later win where they overlap, as in `render`."""
    times = _times(frames) if scene.video else [0.0]
    steps = []
    for start in range(0, len(times), group if scene.video else 1):
        chunk = times[start : start + group]
        maps = [sum(a) / len(chunk) for a in zip(*(_alphas(scene, size, t) for t in chunk))]
        cover = torch.stack(maps)  # [items, size, size]
        for i in range(len(maps) - 1):  # what later shapes hide of earlier ones
            cover[i] = cover[i] * (1 - cover[i + 1 :].amax(0))
        pooled = torch.nn.functional.avg_pool2d(cover[:, None], cell)[:, 0]
        best = pooled.max(0)
        steps.append(torch.where(best.values >= 0.25, best.indices, -1))
    return torch.stack(steps)


def render(scene: MultiScene, size: int = SIZE, frames: int = FRAMES) -> torch.Tensor:
    """uint8 pixels: [3, size, size] for an image, [frames, 3, size, size] for a video (what a camera gives and
    what the processor rescales by 1/255)."""
    if scene.video:
        pixels = torch.stack([_frame(scene, size, t) for t in _times(frames)])
    else:
        pixels = _frame(scene, size, 0.0)
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8)


def _name(item: Placed) -> str:
    return f"{item.colour} {item.shape}"


def questions(scene: MultiScene) -> list[Question]:
    """Every question `scene` supports, in a fixed order (motion questions only for a video)."""
    out = [Question("count", "how many shapes are there ?", str(len(scene.items)), scene)]
    for i, item in enumerate(scene.items):
        row, col = divmod(item.cell, 2)
        name = _name(item)
        out += [
            Question("colour_at", f"what colour is the shape at the {CELLS[item.cell]} ?", item.colour, scene, i),
            Question("shape_of", f"what shape is the {item.colour} one ?", item.shape, scene, i),
            Question("horizontal", f"is the {name} on the left or the right ?", ("left", "right")[col], scene, i),
            Question("vertical", f"is the {name} at the top or the bottom ?", ("top", "bottom")[row], scene, i),
        ]
        if scene.video:
            out.append(Question("motion", f"which way does the {name} move ?", item.motion, scene, i))
    return out


def sample_question(rng: random.Random, scene: MultiScene, qtype: str) -> Question:
    """A question of type `qtype` about `scene`, the shape it asks about drawn from `rng`."""
    pool = [q for q in questions(scene) if q.type == qtype]
    if not pool:
        raise UnsupportedInputError(f"no {qtype!r} question for this scene; types: {', '.join(TYPES)} (motion: videos)")
    return pool[rng.randrange(len(pool))]


def question_set(seed: int, n_images: int, n_videos: int) -> list[Question]:
    """A fixed set, images first: one question per scene, types in turn (on videos every other one is a motion
    question). Images and videos draw from their own streams, so a smaller set is a prefix of each part."""
    video_types = ("motion", "count", "motion", "colour_at", "motion", "shape_of", "motion", "horizontal", "vertical")
    out = []
    for video, n, types in ((False, n_images, IMAGE_TYPES), (True, n_videos, video_types)):
        rng = random.Random(seed + video)
        out += [sample_question(rng, sample_scene(rng, video), types[i % len(types)]) for i in range(n)]
    return out


def held_out(n_images: int = HELD_OUT_IMAGES, n_videos: int = HELD_OUT_VIDEOS) -> list[Question]:
    """The evaluation set of issue 13 (300 questions by default); training never draws from its seeds."""
    return question_set(HELD_OUT_SEED, n_images, n_videos)


def answers() -> list[str]:
    """Every answer any question can have."""
    counts = [str(n) for n in range(1, MAX_SHAPES + 1)]
    return [*shapes.COLOURS, *shapes.SHAPES, *counts, "left", "right", "top", "bottom", *shapes.MOTIONS]


TEMPLATE_WORDS = (
    "what colour is the shape at top bottom left right one how many shapes are there on or which way does move ?"
).split()


def words() -> list[str]:
    """Every word a question or an answer uses (and the backgrounds' names), once each."""
    return list(dict.fromkeys([*TEMPLATE_WORDS, *answers(), *shapes.BACKGROUNDS]))
