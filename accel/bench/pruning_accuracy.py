"""The pruning accuracy benchmark of issue 13 (`accel bench --suite pruning`): how much of `ref-vlm`'s accuracy on the
held-out questions of `accel.zoo.scenes_multi` each way of dropping visual tokens keeps, at a budget.

    result = run_pruning(questions=300)
    print(markdown(result)); plot(result, "pruning.png")

Every method runs at keep ratios 50%, 37.5%, 25% and 12.5% of each image's 256 (each video's 512) visual tokens, after the
unpatched model (keep-all) has answered every question:

    accel                   accel.patch(prune=PruneConfig(keep_ratio=r)): the default mode (before the LM,
                            distinct score, near-duplicates last, 15% contextual tokens, video temporal folding
                            at 0.9)
    accel top scores        the same with duplicate_similarity=None (the top-scoring tokens, repeats or not)
    accel no temporal       the same without temporal folding (differs from accel on videos only)
    accel dominant only     the same with contextual=0 (the dominant tokens alone)
    accel sampled score     score='sampled' (attention from evenly spaced tokens, the default before 'distinct')
    accel cls score         score='cls': Qwen2-VL's ViT has no [CLS] token, so this row records the refusal
    accel in_lm layer K     where='in_lm', layer=K (FastV-style, text-guided), K = 1, 2
    random keep             `accel.bench.pruning_baselines`: uniform random tokens, the mean of 5 draws (seeds
                            `seed` to `seed + 4`; one draw on 300 questions moves by a few points)
    uniform pooling         `accel.bench.pruning_baselines`: each frame's grid average-pooled 1x2 / 2x2 / 2x4

One row per (method, ratio), plain JSON values: accuracy (overall, images, videos, per question type), the share
of keep-all's accuracy it keeps, visual tokens kept per image and per video (from accel's report or the baseline's
count), prefill FLOPs per image and video question (`prefill_flops`: ViT, merger, LM layers at the lengths they ran,
the last position's logits), CPU prefill milliseconds of one image and one video question (median of `repeats`),
and status ("ok" or "unsupported: <why>"). A row of several draws has their mean, their count ("draws") and the
range of their accuracies ("accuracy_range").
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import accel
from accel.bench.pruning_baselines import Baseline
from accel.pruning import PruneConfig
from accel.zoo import reference_vlm, scenes_multi

RATIOS = (0.5, 0.375, 0.25, 0.125)
RANDOM_DRAWS = 5
WEIGHTS = ("auto", "trained", "random")


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "accel" | "baseline" | "preset"
    settings: dict = field(default_factory=dict)  # PruneConfig fields, {"baseline": kind} or {"preset": name}
    draws: int = 1  # seeds averaged over (a random method)


def methods() -> list[Method]:
    return [
        Method("accel", "accel"),
        Method("accel top scores", "accel", {"duplicate_similarity": None}),
        Method("accel no temporal", "accel", {"temporal_threshold": None}),
        Method("accel dominant only", "accel", {"contextual": 0.0}),
        Method("accel sampled score", "accel", {"score": "sampled"}),
        Method("accel cls score", "accel", {"score": "cls"}),
        Method("accel in_lm layer 1", "accel", {"where": "in_lm", "layer": 1}),
        Method("accel in_lm layer 2", "accel", {"where": "in_lm", "layer": 2}),
        Method("random keep", "baseline", {"baseline": "random"}, draws=RANDOM_DRAWS),
        Method("uniform pooling", "baseline", {"baseline": "pooling"}),
    ]


class _Run:
    """One (method, ratio) installed on the model for a while: `with _Run(...) as run: run.forward(batch)`."""

    def __init__(self, model, method: Method | None, ratio: float, seed: int):
        self.model, self.method, self.ratio, self.seed = model, method, ratio, seed
        self.kept: dict[bool, list[int]] = {False: [], True: []}  # per image / per video
        self.lengths: dict[bool, list[tuple[int, int]]] = {False: [], True: []}  # (full, to the LM) per row
        self._baseline = None
        self.applied: list[str] | None = None  # a preset's accelerators, as its report names them

    def __enter__(self) -> _Run:
        m = self.method
        if m is None:
            return self
        if m.family == "baseline":
            self._baseline = Baseline(self.model, m.settings["baseline"], self.ratio, self.seed).__enter__()
        elif m.family == "preset":  # what `accel.patch(vlm, preset=...)` does on its own
            report = accel.patch(self.model, preset=m.settings["preset"]).report()
            self.applied = [a.accelerator for a in report.applied]
        else:
            accel.patch(self.model, prune=PruneConfig(keep_ratio=self.ratio, **m.settings))
        return self

    def __exit__(self, *exc) -> None:
        if self._baseline is not None:
            self._baseline.__exit__()
        elif self.method is not None:
            accel.unpatch(self.model)

    def forward(self, batch: dict, video: bool) -> torch.Tensor:
        """Logits of the first answer token; records tokens kept and sequence lengths per row."""
        rows, full = batch["input_ids"].shape
        visual = int((batch["mm_token_type_ids"][0] > 0).sum())
        with torch.no_grad():
            logits = self.model(**batch, use_cache=True, logits_to_keep=1).logits[:, -1]
        kept, out = self._stats(rows, visual, full)
        self.kept[video] += kept
        self.lengths[video] += [(full, out)] * rows
        return logits

    def _stats(self, rows: int, visual: int, full: int) -> tuple[list[int], int]:
        if self._baseline is not None:
            b = self._baseline
            kept, b.visual_in, b.visual_kept = b.visual_kept // rows, 0, 0
            return [kept] * rows, b.sequence_out
        stats = None if self.method is None else accel.get_handle(self.model).report().stats.get("prune")
        if stats is None:  # nothing pruned
            return [visual] * rows, full
        last = stats["last_call"]
        return list(last["visual_tokens_kept"]), last["sequence_out"]


def prefill_flops(config, visual_tokens: int, frames: int, full: int, kept: int, switch: int = 0) -> int:
    """FLOPs (2 per multiply-add) of one prefill: the ViT and merger over every patch, the first `switch` LM layers
    at `full` positions and the rest at `kept`, attention causal, the last position's logits."""
    v, t = config.vision_config, config.text_config
    patches = visual_tokens * v.spatial_merge_size**2
    d, per_frame = v.embed_dim, patches // max(frames, 1)
    vit = v.depth * (patches * (4 + 2 * v.mlp_ratio) * d * d + frames * 2 * per_frame**2 * d)
    vit += patches * v.in_channels * v.temporal_patch_size * v.patch_size**2 * d  # patch embedding
    wide = d * v.spatial_merge_size**2
    vit += visual_tokens * (wide * wide + wide * v.hidden_size)  # merger MLP
    h, heads, kv = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    head = h // heads
    per_token = h * h * 2 + 2 * h * kv * head + 3 * h * t.intermediate_size
    lm = 0
    for layer in range(t.num_hidden_layers):
        s = full if layer < switch else kept
        lm += s * per_token + s * (s + 1) * heads * head  # QK and AV over the causal triangle
    return 2 * (vit + lm + h * t.vocab_size)


def _batches(questions: Sequence, batch_size: int):
    """(video, questions) batches of one media kind each."""
    for video in (False, True):
        same = [q for q in questions if q.video == video]
        for start in range(0, len(same), batch_size):
            yield video, same[start : start + batch_size]


def evaluate(model, processor, questions, method: Method | None, ratio: float, *, seed: int, batch_size: int) -> dict:
    """Accuracy and token counts of one (method, ratio) on `questions`."""
    from accel.zoo.train_vlm import summary

    predictions, order = [], []
    with _Run(model, method, ratio, seed) as run:
        for video, batch_questions in _batches(questions, batch_size):
            batch = reference_vlm.inputs(processor, batch_questions)
            logits = run.forward(batch, video)
            predictions += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
            order += batch_questions
    row = summary(predictions, order)
    if run.applied is not None:
        row["applied"] = run.applied
    for video, name in ((False, "image"), (True, "video")):
        if run.kept[video]:
            row[f"tokens_kept_per_{name}"] = sum(run.kept[video]) / len(run.kept[video])
            row[f"_lengths_{name}"] = run.lengths[video][0]
    return row


def evaluate_draws(model, processor, questions, method: Method | None, ratio: float, *, seed: int, batch_size: int):
    """`evaluate` averaged over `method.draws` seeds from `seed` on, with the draws' count and accuracy range."""
    draws = 1 if method is None else method.draws
    results = [
        evaluate(model, processor, questions, method, ratio, seed=seed + i, batch_size=batch_size) for i in range(draws)
    ]
    if draws == 1:
        return results[0]
    measured = [k for k, v in results[0].items() if isinstance(v, float)]  # counts such as "n" are the same in each
    mean = {**results[0], **{k: sum(r[k] for r in results) / draws for k in measured}}
    accuracies = [r["accuracy"] for r in results]
    return {**mean, "draws": draws, "accuracy_range": [min(accuracies), max(accuracies)]}


def prefill_ms(model, processor, question, method: Method | None, ratio: float, repeats: int, seed: int) -> float:
    """Median wall-clock milliseconds of one prefill of `question` (batch of one) on this machine."""
    batch = reference_vlm.inputs(processor, [question])
    times = []
    with _Run(model, method, ratio, seed) as run:
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            run.forward(batch, question.video)
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]


def load_model(weights: str = "auto", seed: int = 0):
    """(model, processor, "trained" | "random"): the shipped weights, or random ones (`auto` warns when falling
    back, so a benchmark of an untrained model never passes for a real result)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    trained = (reference_vlm.WEIGHTS / "config.json").exists()
    if weights == "trained" or (weights == "auto" and trained):
        model, processor = reference_vlm.load()
        return model, processor, "trained"
    if weights == "auto":
        warnings.warn(
            f"no trained weights at {reference_vlm.WEIGHTS}: benchmarking ref-vlm with RANDOM weights (train them "
            "with `python -m accel.zoo.train_vlm`)",
            stacklevel=2,
        )
    model, processor = reference_vlm.untrained(seed)
    return model, processor, "random"


def result_row(method: Method | None, ratio: float, result: dict, config, baseline: dict | None) -> dict:
    row = {
        "method": "keep-all" if method is None else method.name,
        "family": "baseline" if method is None else method.family,
    }
    row.update(settings={} if method is None else dict(method.settings), keep_ratio=ratio, status="ok")
    switch = method.settings.get("layer", 0) if method is not None and method.settings.get("where") == "in_lm" else 0
    media = (
        ("image", reference_vlm.IMAGE_TOKENS, 1),
        ("video", reference_vlm.VIDEO_TOKENS, reference_vlm.VIDEO_FRAMES),
    )
    for name, tokens, frames in media:
        lengths = result.pop(f"_lengths_{name}", None)
        if lengths is not None:
            row[f"prefill_gflops_{name}"] = round(prefill_flops(config, tokens, frames, *lengths, switch) / 1e9, 4)
    row.update(result)
    if baseline is not None and baseline["accuracy"] > 0:
        row["share_of_keep_all"] = round(row["accuracy"] / baseline["accuracy"], 4)
    return row


def run_pruning(
    questions: int = 300,
    weights: str = "auto",
    ratios: Sequence[float] = RATIOS,
    names: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    repeats: int = 3,
    progress: bool = True,
) -> dict:
    """Keep-all, then every method (or those in `names`) at every ratio, on the first `questions` of the held-out
    set (three quarters images, a quarter videos). Returns {"weights", "questions", "rows", ...}."""
    from tqdm.auto import tqdm

    from accel.errors import AccelError

    model, processor, kind = load_model(weights, seed)
    n_videos = questions // 4
    held = scenes_multi.held_out(questions - n_videos, n_videos)
    timed = [q for q in held if not q.video][:1] + [q for q in held if q.video][:1]
    chosen = [m for m in methods() if names is None or m.name in names]
    jobs = [(None, 1.0)] + [(m, r) for m in chosen for r in ratios]
    rows, baseline = [], None
    for method, ratio in tqdm(jobs, desc="pruning suite", disable=not progress):
        try:
            result = evaluate_draws(model, processor, held, method, ratio, seed=seed, batch_size=batch_size)
        except AccelError as err:
            rows.append(
                {
                    "method": method.name,
                    "family": method.family,
                    "settings": dict(method.settings),
                    "keep_ratio": ratio,
                    "status": f"unsupported: {err}",
                }
            )
            continue
        row = result_row(method, ratio, result, model.config, baseline)
        for q in timed:
            row[f"prefill_ms_{'video' if q.video else 'image'}"] = round(
                prefill_ms(model, processor, q, method, ratio, repeats, seed), 2
            )
        if method is None:
            baseline = row
        rows.append(row)
    return {
        "model": reference_vlm.NAME,
        "weights": kind,
        "questions": len(held),
        "images": len(held) - n_videos,
        "videos": n_videos,
        "seed": seed,
        "rows": rows,
    }
