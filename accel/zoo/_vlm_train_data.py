"""Training batches of `ref-vlm` (see `accel.zoo.train_vlm`): scenes, questions and the packed layout.

A step shows the model `scenes` images (or half as many videos, whose 512 tokens cost as much) and asks
`per_scene` questions about each. The image prefix

    <|im_start|> user <|vision_start|> <|image_pad|> x 256 <|vision_end|>

is the costly part (the ViT and 260 LM positions), so it runs once per scene with a KV cache, and the questions
about a scene follow on that cache in one row, each one

    what colour is the shape at the top left ? <|im_end|> <|im_start|> assistant red <|im_end|>

token for token what the chat template gives (tests check it) and masked so that it sees the prefix and itself
only, so the model sees at training exactly the prompts it is asked at evaluation. Only the answer and the
`<|im_end|>` after it carry a loss.
Everything is drawn from a string-seeded `random.Random` per step, so a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from accel import _private
from accel.zoo import _vlm_processor as vp
from accel.zoo import scenes_multi, shapes

IGNORE = -100


@dataclass
class Batch:
    prefix: dict[str, torch.Tensor]  # model inputs of the scenes' prefixes (ids, mask, types, pixels, grids)
    ids: torch.Tensor  # [scenes * per_scene, L] question rows, right-padded
    mask: torch.Tensor  # [scenes * per_scene, L]
    labels: torch.Tensor  # [scenes * per_scene, L] the answer and its <|im_end|>, else IGNORE
    questions: list[scenes_multi.Question]  # row order: per_scene rows for each scene in turn
    per_scene: int
    targets: dict[str, torch.Tensor]  # per visual token, in the merger's output order: see `token_targets`

    def to(self, device) -> Batch:
        moved = {name: getattr(self, name) for name in ("ids", "mask", "labels")}
        return Batch(
            prefix={k: v.to(device) for k, v in self.prefix.items()},
            **{k: v.to(device) for k, v in moved.items()},
            questions=self.questions,
            per_scene=self.per_scene,
            targets={k: v.to(device) for k, v in self.targets.items()},
        )


def _ids(words: list[str]) -> list[int]:
    index = _index()
    return [index.get(w, index[vp.UNK]) for w in words]


@functools.cache
def _index() -> dict[str, int]:
    return {token: i for i, token in enumerate(vp.vocabulary())}


def prefix_ids(video: bool, tokens: int) -> list[int]:
    pad = "<|video_pad|>" if video else "<|image_pad|>"
    return _ids(["<|im_start|>", "user", "<|vision_start|>", *[pad] * tokens, "<|vision_end|>"])


def question_ids(question: scenes_multi.Question) -> tuple[list[int], list[int]]:
    """(ids, labels) of one question row: the question, the assistant turn, the answer and its end."""
    prompt = _ids([*question.text.split(), "<|im_end|>", "<|im_start|>", "assistant"])
    answer = _ids([question.answer, "<|im_end|>"])
    return prompt + answer, [IGNORE] * len(prompt) + answer


# What each visual token is taught to show (`token_loss`): the words it is scored against, in this order.
TOKEN_WORDS = {
    "colour": (*shapes.COLOURS, *shapes.BACKGROUNDS),  # a shape's colour, or the background's name
    "shape": shapes.SHAPES,  # the shape it belongs to (background tokens: no target)
    "motion": shapes.MOTIONS,  # videos: the way its shape moves
}


def token_targets(scene: scenes_multi.MultiScene) -> dict[str, torch.Tensor]:
    """Per visual token of `scene` (raster order per temporal patch, as the merger outputs them): the index in
    `TOKEN_WORDS[name]` of what it shows, IGNORE where it has none; "owner": the index in `scene.items` of its shape,
    -1 where none."""
    owner = scenes_multi.owners(scene, vp.PATCH * vp.MERGE, group=vp.TEMPORAL).flatten()
    items = scene.items
    background = len(shapes.COLOURS) + list(shapes.BACKGROUNDS).index(scene.background)
    colour = [list(shapes.COLOURS).index(i.colour) for i in items]
    shape = [shapes.SHAPES.index(i.shape) for i in items]
    motion = [shapes.MOTIONS.index(i.motion) if i.motion else IGNORE for i in items]

    def pick(values: list[int], none: int) -> torch.Tensor:
        table = torch.tensor([*values, none])  # index -1 (no shape) takes the last entry
        return table[owner]

    picked = {"colour": pick(colour, background), "shape": pick(shape, IGNORE), "motion": pick(motion, IGNORE)}
    return {**picked, "owner": owner}


def token_loss(
    model, features: torch.Tensor, targets: dict[str, torch.Tensor], weights: dict[str, float] | None = None
) -> torch.Tensor:
    """Cross-entropy of each visual token's features (the merger's output, what the LM reads) against the (tied)
    word embeddings of `TOKEN_WORDS`: it teaches the vision tower to put a token's colour, shape and motion where
    the language model already has the words for them, the grounding a question-only loss finds slowly. The terms
    present are averaged, each scaled by its `weights` entry (default 1)."""
    weights = weights or {}
    losses = []
    for name, words in TOKEN_WORDS.items():
        target = targets[name]
        if bool((target != IGNORE).any()):
            loss = _word_loss(model, features, words, target)
            losses.append(weights.get(name, 1.0) * loss)
    return torch.stack(losses).mean()


def _word_loss(model, states: torch.Tensor, words, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `states` [tokens, width] scored against the tied word embeddings of `words`, with `target`
    the index in `words` per token (IGNORE: none)."""
    logits = states @ model.get_input_embeddings().weight[_ids(list(words))].T
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE)


# Where each visual token sits, the words `position_loss` scores the language model's view of it against.
POSITION_WORDS = {"vertical": ("top", "bottom"), "horizontal": ("left", "right")}
POSITION_LAYER = 0  # the decoder layer whose output `position_loss` reads, so the layers after it can use it


def position_targets(tokens: int, side: int) -> dict[str, torch.Tensor]:
    """Per visual token of a prefix (raster order per temporal patch, `side` x `side` each): the index in
    `POSITION_WORDS[name]` of the half of the frame, and so of the 2x2 grid's cell, it lies in."""
    place = torch.arange(tokens) % (side * side)
    return {"vertical": (place // side >= side // 2).long(), "horizontal": (place % side >= side // 2).long()}


def position_loss(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each visual token's hidden state after decoder layer `POSITION_LAYER` (through the final
    norm, against the tied word embeddings) with the words of its cell: "top"/"bottom", "left"/"right". It teaches
    the language model to write a token's place into its content early, so that "the shape at the top left" and
    "on the left or the right" are found by matching words, as colours are, instead of through M-RoPE angles a
    fresh language model learns slowly. `hidden`: [scenes, prefix length, width], the prefix of `batch`."""
    visual = batch.prefix["mm_token_type_ids"] != 0
    grid = next(batch.prefix[k] for k in ("image_grid_thw", "video_grid_thw") if k in batch.prefix)
    states = model.model.language_model.norm(hidden[visual])  # scene by scene, each in the merger's order
    targets = position_targets(int(visual[0].sum()), int(grid[0, 2]) // vp.MERGE)
    losses = []
    for name, words in POSITION_WORDS.items():
        target = targets[name].to(states.device).repeat(hidden.shape[0])
        losses.append(_word_loss(model, states, words, target))
    return torch.stack(losses).mean()


def pick_questions(rng: random.Random, scene: scenes_multi.MultiScene, n: int) -> list[scenes_multi.Question]:
    """`n` questions about `scene`, each of a type drawn uniformly from those it supports (so counting is asked
    as often as colours, however many shapes there are)."""
    pool = scenes_multi.questions(scene)
    types = list(dict.fromkeys(q.type for q in pool))
    out = []
    for _ in range(n):
        qtype = rng.choice(types)
        out.append(rng.choice([q for q in pool if q.type == qtype]))
    return out


def prefix_inputs(scenes: list[scenes_multi.MultiScene]) -> dict[str, torch.Tensor]:
    """Model inputs of the prefixes of same-kind scenes, laid out as the processor lays them out."""
    video = scenes[0].video
    frames = [vp.normalise(scenes_multi.render(s)) for s in scenes]
    if not video:
        frames = [f[None].expand(vp.TEMPORAL, -1, -1, -1) for f in frames]  # the image processor's repeat
    pixels = torch.cat([vp.patchify(f) for f in frames])
    t = frames[0].shape[0] // vp.TEMPORAL
    side = scenes_multi.SIZE // vp.PATCH
    grid = torch.tensor([[t, side, side]] * len(scenes))
    tokens = t * side * side // vp.MERGE**2
    ids = torch.tensor([prefix_ids(video, tokens)] * len(scenes))
    kinds = torch.zeros_like(ids)
    kinds[:, 3 : 3 + tokens] = 2 if video else 1
    key = "video" if video else "image"
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": kinds,
        f"pixel_values{'_videos' if video else ''}": pixels,
        f"{key}_grid_thw": grid,
    }


def make_batch(
    seed: int, step: int, scenes: int, per_scene: int, video_share: float, max_shapes: int | None = None
) -> Batch:
    """The batch of `step`: all images, or (with probability `video_share`) all videos, half as many.
    `max_shapes` caps the shapes per scene (the curriculum)."""
    rng = random.Random(f"ref-vlm-train-{seed}-{step}")
    video = rng.random() < video_share
    n = max(1, scenes // 2) if video else scenes
    top = scenes_multi.MAX_VIDEO_SHAPES if video else scenes_multi.MAX_SHAPES
    top = min(top, max_shapes or top)
    drawn = [scenes_multi.sample_scene(rng, video, count=rng.randint(1, top)) for _ in range(n)]
    questions = [q for scene in drawn for q in pick_questions(rng, scene, per_scene)]
    rows = [question_ids(q) for q in questions]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), _index()[vp.PAD])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE)
    for i, (row, label) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(label)
    targets = [token_targets(scene) for scene in drawn]
    targets = {name: torch.cat([t[name] for t in targets]) for name in targets[0]}
    return Batch(prefix_inputs(drawn), ids, mask, labels, questions, per_scene, targets)


@dataclass
class _Layout:
    """Where the tokens of the question rows ([rows, L] each) sit in the packed question rows, one per scene."""

    scene: torch.Tensor  # the packed row (scene) of each token
    column: torch.Tensor  # its column in its question row
    place: torch.Tensor  # its column in the packed row
    valid: torch.Tensor  # a real token, not padding
    segment: torch.Tensor  # [scenes, packed length]: i + 1 for the scene's i-th question, 0 padding


def _pack(batch: Batch) -> _Layout:
    rows, width = batch.ids.shape
    per = batch.per_scene
    order = torch.arange(rows, device=batch.ids.device)
    lengths = batch.mask.sum(1)
    starts = (lengths.view(-1, per).cumsum(1) - lengths.view(-1, per)).flatten()  # each question after the last
    column = torch.arange(width, device=order.device).expand(rows, -1)
    scene = (order // per)[:, None].expand(-1, width)
    place = starts[:, None] + column
    valid = batch.mask.bool()
    segment = torch.zeros(rows // per, int(place[valid].max()) + 1, dtype=torch.long, device=order.device)
    segment[scene[valid], place[valid]] = (order % per + 1)[:, None].expand(-1, width)[valid]
    return _Layout(scene, column, place, valid, segment)


def _packed(rows: torch.Tensor, layout: _Layout, fill: int) -> torch.Tensor:
    """[scenes, packed length]: each scene's question `rows` one after another, `fill` after them."""
    out = torch.full(layout.segment.shape, fill, dtype=rows.dtype, device=rows.device)
    out[layout.scene[layout.valid], layout.place[layout.valid]] = rows[layout.valid]
    return out


def _question_mask(layout: _Layout, prefix: int) -> torch.Tensor:
    """[scenes, 1, packed length, prefix + packed length] bool, True where attended: every question sees its
    scene's whole prefix, then itself causally, never another question (padding, segment 0, sees the prefix and
    the padding before it, so no row is empty)."""
    seg = layout.segment
    scenes, length = seg.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    own = causal & (seg[:, None, :] == seg[:, :, None])
    seen = torch.ones(scenes, length, prefix, dtype=torch.bool, device=seg.device)
    return torch.cat([seen, own], -1)[:, None]


# Qwen2-VL's ViT hands the packed segments (cu_seqlens) to its attention function in one call only when the name of
# the implementation holds "flash"; any other splits them and calls it once per image and temporal patch.
SEGMENT_ATTENTION = "accel_flash_equal_segments"


def _segment_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The training ViT's attention: `query` [1, heads, total, dim] holds equal segments (a scene's temporal patches,
    the segments of cu_seqlens) that attend only within themselves; they run as one batched SDPA call instead of
    one call per segment. Returns [1, total, heads, dim], the layout of transformers' flash functions."""
    heads, total, dim = query.shape[1:]
    bounds = kwargs.get("cu_seq_lens_q")  # None when called per segment
    length = kwargs.get("max_length_q") or total
    count = total // length
    if count * length != total or (bounds is not None and bounds.numel() != count + 1):
        raise ValueError(f"segment attention needs equal segments; got {total} tokens, longest segment {length}")

    def split(x: torch.Tensor) -> torch.Tensor:
        return x[0].view(heads, count, length, dim).transpose(0, 1)

    out = torch.nn.functional.scaled_dot_product_attention(
        split(query), split(key), split(value), dropout_p=dropout, scale=scaling
    )
    return out.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None


@contextlib.contextmanager
def attention_function(module, name: str, function):
    """Every attention of `module` (a submodule of a transformers model) as `function`, registered under `name`, for
    the duration; the implementations it had are restored after."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    saved = _private.attention_implementations(module)
    for config, _ in saved:
        _private.restore_attention_implementation(config, name)
    try:
        yield
    finally:
        for config, implementation in saved:
            _private.restore_attention_implementation(config, implementation)


def _segments_in_one_call(model):
    """The vision tower's attention as `_segment_attention` for the duration."""
    return attention_function(model.model.visual, SEGMENT_ATTENTION, _segment_attention)


def one_grid(grid: torch.Tensor) -> torch.Tensor:
    """[1, 3]: the grids of equal scenes ([scenes, 3]) as one whose temporal patches are all of theirs, which the ViT
    computes as it would each scene alone (see `_batched_prefix`)."""
    one = grid[:1].clone()
    one[0, 0] *= grid.shape[0]
    return one


def _batched_prefix(model, prefix: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, M-RoPE deltas) of `prefix` (scenes of one layout, as `make_batch` draws them) that run each step
    in a few large operations instead of a few per scene, so that a GPU step is not bound by launching them:

    * the M-RoPE positions of one scene, for every scene (`get_rope_index` loops over the rows);
    * one grid (scenes x temporal patches, height, width) for all the scenes: Qwen2-VL's ViT attends within each
      temporal patch and its rotary table reads only the height and the width, so this is the same computation as
      one grid per scene, without the loop over grids (the segments then attend in one call, `_segment_attention`).
    """
    key = next(k for k in ("image_grid_thw", "video_grid_thw") if k in prefix)
    grid = prefix[key]
    scenes = grid.shape[0]
    positions, deltas = model.model.get_rope_index(
        prefix["input_ids"][:1], prefix["mm_token_type_ids"][:1], attention_mask=prefix["attention_mask"][:1],
        **{key: grid[:1]},
    )  # fmt: skip
    inputs = {**prefix, key: one_grid(grid), "position_ids": positions.expand(-1, scenes, -1)}
    return inputs, deltas.expand(scenes, -1)


def packed_forward(model, batch: Batch, with_loss: bool = True):
    """(output, visual features, hidden): the model's output on the question rows of `batch` (its logits in the
    rows' layout), the merger's output of the prefixes (every visual token, what the language model reads), and the
    prefixes' output of decoder layer `POSITION_LAYER` (`position_loss`).

    The real class's forward twice: the prefixes, with a KV cache (batched across scenes: `_batched_prefix`); then
    one row per scene holding its questions one after another, on that cache, under a mask in which each question
    sees the prefix and itself only, at the M-RoPE positions generate() would give it (text positions continue from
    the prefix's). So each question is computed as if asked alone, while the prefix runs once per scene and its cache
    is never copied per question (a copy per question made the step 0.39 s instead of 0.33 s)."""
    from accel._transformers_compat import cache_kwarg_name, output_cache

    p, deltas = _batched_prefix(model, batch.prefix)
    features, hidden = [], []
    layer = model.model.language_model.layers[POSITION_LAYER]
    hooks = [
        model.model.visual.merger.register_forward_hook(lambda module, args, out: features.append(out)),
        layer.register_forward_hook(lambda module, args, out: hidden.append(out[0] if isinstance(out, tuple) else out)),
    ]
    try:
        with _segments_in_one_call(model):
            prefix = model(**p, use_cache=True, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    layout = _pack(batch)
    length = p["input_ids"].shape[1]
    text = length + layout.column + deltas.reshape(-1, 1).to(batch.ids.device)[layout.scene[:, 0]]
    out = model(
        input_ids=_packed(batch.ids, layout, _index()[vp.PAD]),
        attention_mask=_question_mask(layout, length),
        position_ids=_packed(text, layout, 0)[None].expand(3, -1, -1),
        labels=_packed(batch.labels, layout, IGNORE) if with_loss else None,
        **{cache_kwarg_name(model): output_cache(prefix)},
    )
    out.logits = out.logits[layout.scene, layout.place.clamp(max=layout.segment.shape[1] - 1)]
    return out, features[0], hidden[0]


def answer_hits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Bool per row: whether the most likely token where the answer starts is the answer."""
    first = (batch.labels != IGNORE).int().argmax(1)  # the answer's position in each row
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    return logits[rows, first - 1].argmax(-1) == batch.ids[rows, first]


class _StepBatches(torch.utils.data.Dataset):
    """`make_batch` keyed by (step, video share, cap on shapes): what the loader's worker processes draw."""

    def __init__(self, seed: int, scenes: int, per_scene: int):
        self.seed, self.scenes, self.per_scene = seed, scenes, per_scene

    def __getitem__(self, key: tuple[int, float, int | None]) -> tuple[int, Batch]:
        step, video_share, max_shapes = key
        return step, make_batch(self.seed, step, self.scenes, self.per_scene, video_share, max_shapes)


def _as_is(item):
    return item


def prefetched_batches(
    seed: int,
    first_step: int,
    scenes: int,
    per_scene: int,
    params: Callable[[], tuple[float, int | None]],
    workers: int,
) -> Iterator[tuple[int, Batch]]:
    """(step, batch) from `first_step` on, drawn by `workers` processes ahead of the training step, so that a GPU
    does not wait for the scenes to be drawn. Each step is handed to a worker with `params()` (video share, cap on
    shapes) as they stand then, a few steps (twice `workers`) before it trains: where the schedule changes them
    (the curriculum, the last stage) those few steps are drawn as the steps before them were. Otherwise the
    batches are those of `make_batch`, step for step."""

    def keys():
        step = first_step
        while True:
            yield (step, *params())
            step += 1

    loader = torch.utils.data.DataLoader(
        _StepBatches(seed, scenes, per_scene), batch_size=None, sampler=keys(), num_workers=workers,
        collate_fn=_as_is, prefetch_factor=2,
    )  # fmt: skip
    return iter(loader)
