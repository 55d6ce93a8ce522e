"""Train `ref-vlm`: ``python -m accel.zoo.train_vlm`` (issue 13).

Seeded, resumable and time-boxed. Every step draws fresh scenes of `accel.zoo.scenes_multi` (`make_batch` of
`accel.zoo._vlm_train_data`: 8 images, or 4 videos a quarter of the time, 10 questions each, the image prefix run
once per scene and its KV cache shared by the questions). The loss is on the answer tokens only, plus
(``--token-loss``) a per-visual-token loss that scores the merger's output against the word embeddings of the
colour, shape and motion it shows (the generator knows them), which grounds the vision tower in the words far
sooner than the answers alone do, and (``--position-loss``) one that has the first decoder layer name each visual
token's cell ("top"/"bottom", "left"/"right"), so the questions about places match words, as those about colours
do, and (``--lookup-loss``) one that has a first-layer head attend from the word that names the asked shape (its colour
or its place) to that shape's tokens (`accel.zoo._vlm_lookup`). AdamW, linear warm-up, cosine decay over ``--steps``; a curriculum caps the
shapes per scene at 2, then 3, for the first 8% and 20% of the steps. The model checks itself on a validation set
(not the held-out one) every ``--eval-minutes`` and at the end, where it also reports the held-out accuracy; the
weights (float16) and processor go to ``--out`` with `save_pretrained`. A checkpoint in ``--work`` is written
every two minutes: run the same command again and it continues.

Three stages. First the vision tower alone (``--vision-steps``, 9000 at ``--vision-lr`` 5e-3, about 12 minutes
here; `accel.zoo._vlm_vision_stage`): the token loss teaches it to show each token's colour, shape and motion, the
language model is not run, and a step costs a fifth of one of the whole model. When it ends every word embedding is
scaled to the same norm (`even_word_norms`): the token loss grows only its own words, and a language model on
those answered a colour to nearly every question. Then the language model (``--steps``, its own warm-up and
decay) on the frozen word embeddings, beside a vision tower that goes on learning at half its rate
(``--fresh-vision-lr``; 0 freezes it) with the token loss still on. A language model trained from the start beside a
vision tower that still shows little settles on answers it does not unlearn (it answered motion at chance after 15k
steps, although its visual tokens then showed each shape's motion to a linear read 100% of the time), hence the
tower first. ``--fresh-lm-at`` (0 by default) redraws the language model's layers later in the run instead, the
recipe before the vision stage (with ``--vision-steps 0``: everything trains together until then).

A last stage of ``--finish-steps`` (2500) after ``--steps``: everything trains again (word embeddings, vision tower
at full rate) from a new optimiser, warm-up and decay from ``--finish-lr`` (5e-4), with ``--finish-video-share``
(half) of the steps on videos. The language model reads motion last; a video-heavy stage from its start costs
it the places in images, a short one after it does not. ``--init W --steps 0`` runs that stage alone on saved
weights ``W``.

The shipped weights are this command's output followed by the last stage once more (``--init W --steps 0
--finish-steps 4000 --finish-video-share 0.25 --minutes 18``): 82.5 minutes of training in all (README, "ref-vlm").
A step of the language model's stages costs about 0.23 s on this repository's 2-core CPU with ``--threads 2``, one
of the vision stage 0.07 s. The run also stops after ``--minutes`` (85 by default) of training and still saves:
the vision stage gets at most 20% of them, the stages after it the rest by their share of the steps, and the
learning-rate schedule, the curriculum and the stages follow the time spent where it runs out before the steps
(a slower machine).
``--device cuda`` trains on a GPU: ``--device cuda --workers 12 --scenes 128 --steps 1000000 --finish-steps 200000
--minutes 6`` fills six minutes, the last of them in the last stage; the workers draw the scenes ahead of the step
(one process here draws 32 scenes in about 0.05 s). The prefixes run as one batched pass
(`accel.zoo._vlm_train_data.packed_forward`), so a step's operations do not grow with its scenes; on an H200 a step
of 128 scenes took 0.091 s (2026-12-04, before the vision stage; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from accel.zoo import reference_vlm, scenes_multi
from accel.zoo._vlm_lookup import lookup_loss, probed
from accel.zoo._vlm_recipe import CHECKPOINT_EVERY, CURRICULUM, VISION_TIME, WARMUP, parser
from accel.zoo._vlm_train_data import (
    answer_hits,
    make_batch,
    packed_forward,
    position_loss,
    prefetched_batches,
    token_loss,
)
from accel.zoo._vlm_vision_stage import even_word_norms, vision_batch, vision_features


def max_shapes(step: int, steps: int, time_share: float = 0.0) -> int | None:
    """The curriculum's cap on shapes per scene; `time_share` is the share of ``--minutes`` spent (see `learning_rate`)."""
    for share, top in CURRICULUM:
        if step < share * steps and time_share < share:
            return top
    return None


def validation_set(n: int) -> list:
    """`n` questions (a third on videos) from the validation seed, which neither training nor the held-out set uses."""
    return scenes_multi.question_set(scenes_multi.VALIDATION_SEED, n - n // 3, n // 3)


def learning_rate(step: int, steps: int, peak: float, time_share: float = 0.0, stage: tuple = (0, 0.0, 1.0)) -> float:
    """Linear warm-up, then cosine decay to 5% of `peak` by the last step, or by the end of ``--minutes`` where that
    comes first (`time_share`: the share of it spent), so a run capped by time (``--steps 1000000 --minutes 6`` on a
    GPU) still decays. `stage` = (first step, start, end as `progress`) of a stage with its own warm-up and decay
    (the fresh language model of ``--fresh-lm-at``)."""
    first, start, end = stage
    if step - first < WARMUP:
        return peak * (step - first + 1) / WARMUP
    start = max(start, progress(first + WARMUP, steps, 0.0))  # decay from the stage's warm-up on
    into = min(1.0, max(0.0, (progress(step, steps, time_share) - start) / max(1e-9, end - start)))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * into)))


def progress(step: int, steps: int, time_share: float) -> float:
    """How far the run is, from 0 to 1: by the steps after the warm-up, or by ``--minutes``, whichever is further."""
    return min(1.0, max((step - WARMUP) / max(1, steps - WARMUP), time_share))


class Run:
    """Model, optimiser, step and elapsed time, saved to and resumed from `work/checkpoint.pt`."""

    def __init__(self, args):
        self.args = args
        if args.init:
            self.model, self.processor = reference_vlm.load(args.init)
        else:
            self.model, self.processor = reference_vlm.untrained(seed=args.seed)
        self.model.to(args.device).train()
        self.optimizer = self._optimizer()
        self.step, self.elapsed, self.cpu = 0, 0.0, 0.0
        self.vision_step, self.vision_elapsed = 0, 0.0  # the vision tower's stage (--vision-steps), first
        self.lm_from = None  # the step the fresh language model started at (--fresh-lm-at)
        self.finish_from = None  # the step the last stage started at (--finish-steps), and the time spent by then
        self.finish_elapsed = 0.0
        self.lookup = None  # the last step's lookup loss (--lookup-loss), for the log
        self.batches = None  # (step, batch) from worker processes (--workers), else drawn in train_step
        self.drawn_with = None  # (video share, cap on shapes) of the last schedule: the workers draw with it
        self.file = Path(args.work) / "checkpoint.pt"
        self.total_budget = math.inf if args.minutes is None else args.minutes * 60.0  # seconds of training
        if self.file.exists() and not args.fresh:
            state = torch.load(self.file, map_location=args.device, weights_only=False)
            if state.get("lm_from") is not None:
                self.start_fresh_lm(state["lm_from"])
            if state.get("finish_from") is not None:
                self.start_finish(state["finish_from"], state["finish_elapsed"])
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.elapsed, self.cpu = state["step"], state["elapsed"], state.get("cpu", 0.0)
            self.vision_step, self.vision_elapsed = state.get("vision_step", 0), state.get("vision_elapsed", 0.0)
            _say(args, f"ref-vlm: resumed at step {self.step} ({self.elapsed / 60:.1f} min done)")

    @property
    def budget(self) -> float:
        """Seconds of training left to the stages after the vision tower's."""
        return self.total_budget - self.vision_elapsed

    @property
    def main_budget(self) -> float:
        """The stages before the last get the time by their share of the steps."""
        return self.budget * self.args.steps / max(1, self.args.steps + self.args.finish_steps)

    @property
    def vision_done(self) -> bool:
        if self.args.init:  # a continuation: the tower has learned
            return True
        return self.vision_step >= self.args.vision_steps or self.vision_elapsed >= self.total_budget * VISION_TIME

    def vision_train_step(self) -> float:
        """One step of the vision tower alone on the token loss (`accel.zoo._vlm_vision_stage`); its token loss."""
        args = self.args
        share = self.vision_elapsed / (self.total_budget * VISION_TIME)
        rate = learning_rate(self.vision_step, args.vision_steps, args.vision_lr, share)
        inputs, targets = vision_batch(args.seed, self.vision_step, args.scenes, args.video_share)
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
        targets = {k: v.to(args.device) for k, v in targets.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        weights = {"shape": args.shape_weight, "motion": args.motion_weight}
        loss = token_loss(self.model, vision_features(self.model, inputs), targets, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.vision_step += 1
        if self.vision_done:  # the language model's stages start from evened words and an optimiser of their own
            even_word_norms(self.model)
            self.optimizer = self._optimizer()
        return loss.item()

    def _optimizer(self, vision_scale: float = 1.0) -> torch.optim.Optimizer:
        """AdamW over what trains; each group's ``scale`` multiplies the schedule's rate (the vision tower's beside a
        fresh language model)."""
        vision = {id(p) for p in self.model.model.visual.parameters()}
        trained = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trained if id(p) not in vision], "scale": 1.0},
            {"params": [p for p in trained if id(p) in vision], "scale": vision_scale},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=self.args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def start_fresh_lm(self, step: int) -> None:
        """Draw the language model's layers afresh and train them from here on the frozen word embeddings, beside a
        vision tower that keeps ``--fresh-vision-lr`` of their rate (0: frozen) (why: the module's docstring,
        "Three stages")."""
        fresh, _ = reference_vlm.untrained(seed=self.args.seed + 1)
        language = self.model.model.language_model
        for name in ("layers", "norm"):
            getattr(language, name).load_state_dict(getattr(fresh.model.language_model, name).state_dict())
        self.lm_from = step
        self.model.model.visual.requires_grad_(self.vision_trains)
        self.model.get_input_embeddings().weight.requires_grad_(False)  # tied: the output layer too
        self.optimizer = self._optimizer(self.args.fresh_vision_lr)

    def start_finish(self, step: int, elapsed: float) -> None:
        """The last stage (``--finish-steps``): everything trains again, from a new optimiser. Why: a fresh language
        model learns the places in images first and motion last; half the steps on videos from its start cost it
        the places, a short video-heavy stage after it does not (benchmarks/RESULTS.md)."""
        self.finish_from, self.finish_elapsed = step, elapsed
        self.model.requires_grad_(True)
        self.optimizer = self._optimizer()

    @property
    def vision_trains(self) -> bool:
        """Always but beside a fresh language model under ``--fresh-vision-lr 0``, which freezes the tower."""
        return self.lm_from is None or self.finish_from is not None or self.args.fresh_vision_lr > 0

    @property
    def before_last_over(self) -> bool:
        """The stages before the last one have had their steps or their time."""
        return self.step >= self.args.steps or self.elapsed >= self.main_budget

    @property
    def done(self) -> bool:
        args = self.args
        if self.finish_from is not None:
            return self.step >= self.finish_from + args.finish_steps or self.elapsed >= self.budget
        return self.before_last_over and (args.finish_steps == 0 or self.elapsed >= self.budget)

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        state = dict(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            step=self.step,
            elapsed=self.elapsed,
            cpu=self.cpu,
            lm_from=self.lm_from,
            finish_from=self.finish_from,
            finish_elapsed=self.finish_elapsed,
            vision_step=self.vision_step,
            vision_elapsed=self.vision_elapsed,
        )
        torch.save(state, self.file.with_suffix(".tmp"))
        self.file.with_suffix(".tmp").replace(self.file)  # never a half-written checkpoint

    def schedule(self) -> tuple[float, int | None, float]:
        """This step's learning rate, cap on shapes per scene and share of video steps, after starting the stage it
        is in."""
        args = self.args
        if self.finish_from is None and args.finish_steps and self.before_last_over:
            self.start_finish(self.step, self.elapsed)
        if self.finish_from is not None:  # its own schedule, as a run of --finish-steps from step 0 would have
            time_share = (self.elapsed - self.finish_elapsed) / max(1e-9, self.budget - self.finish_elapsed)
            rate = learning_rate(self.step - self.finish_from, args.finish_steps, args.finish_lr, time_share)
            return rate, None, args.finish_video_share
        time_share = self.elapsed / self.main_budget
        at = args.fresh_lm_at
        if self.lm_from is None and at < 1 and progress(self.step, args.steps, time_share) >= at:
            self.start_fresh_lm(self.step)
        stage = (0, 0.0, at) if self.lm_from is None else (self.lm_from, at, 1.0)
        top = None if args.init else max_shapes(self.step, args.steps, time_share)
        return learning_rate(self.step, args.steps, args.lr, time_share, stage), top, args.video_share

    def train_step(self) -> tuple[float, float]:
        args = self.args
        rate, top, video_share = self.schedule()
        self.drawn_with = (video_share, top)
        if args.workers and self.batches is None:
            self.batches = prefetched_batches(
                args.seed, self.step, args.scenes, args.questions, lambda: self.drawn_with, args.workers
            )
        if self.batches is not None:
            step, batch = next(self.batches)
            assert step == self.step, (step, self.step)
        else:
            batch = make_batch(args.seed, self.step, args.scenes, args.questions, video_share, top)
        batch = batch.to(args.device)
        for group in self.optimizer.param_groups:
            group["lr"] = group["scale"] * rate
        with probed(self.model) if args.lookup_loss else contextlib.nullcontext() as kept:
            out, features, hidden = packed_forward(self.model, batch)
        loss = out.loss
        if args.lookup_loss:
            look = lookup_loss(kept[0], batch)
            loss = loss + args.lookup_loss * look
            self.lookup = look.item()
        if args.position_loss:
            loss = loss + args.position_loss * position_loss(self.model, hidden, batch)
        if args.token_loss and self.vision_trains:  # none beside a frozen tower
            weights = {"shape": args.shape_weight, "motion": args.motion_weight}
            loss = loss + args.token_loss * token_loss(self.model, features, batch.targets, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return out.loss.item(), answer_hits(out.logits.detach(), batch).float().mean().item()

    def evaluate(self, questions) -> dict:
        self.model.eval()
        predictions = reference_vlm.predict(self.model, self.processor, questions, batch_size=16)
        self.model.train()
        return summary(predictions, questions)


def summary(predictions, questions) -> dict:
    """Accuracy overall, on images, on videos and per question type."""
    out = {"accuracy": reference_vlm.accuracy(predictions, questions), "n": len(questions)}
    groups = {"images": [False], "videos": [True]}
    for name, kinds in groups.items():
        pairs = [(p, q) for p, q in zip(predictions, questions) if q.video in kinds]
        if pairs:
            out[name] = sum(p == q.answer for p, q in pairs) / len(pairs)
    for qtype in scenes_multi.TYPES:
        pairs = [(p, q) for p, q in zip(predictions, questions) if q.type == qtype]
        if pairs:
            out[qtype] = round(sum(p == q.answer for p, q in pairs) / len(pairs), 4)
    return out


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def _log(args, record: dict) -> None:
    with open(Path(args.work) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _vision_stage(run: Run) -> float:
    """The vision tower's steps (--vision-steps), unless done; the time of the last checkpoint."""
    args, last_save = run.args, time.perf_counter()
    if run.vision_done:
        return last_save
    bar = tqdm(desc="ref-vlm vision", total=args.vision_steps, initial=run.vision_step, disable=args.quiet, unit="step")
    losses = []
    while not run.vision_done:
        start = time.perf_counter()
        losses = [*losses[-49:], run.vision_train_step()]
        run.vision_elapsed += time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(token_loss=f"{sum(losses) / len(losses):.3f}")
        if run.vision_step % 10 == 0 or run.vision_done:
            _log(
                args,
                {"vision_step": run.vision_step, "token_loss": losses[-1], "elapsed": round(run.vision_elapsed, 1)},
            )
        if time.perf_counter() - last_save > CHECKPOINT_EVERY or run.vision_done:
            run.save()
            last_save = time.perf_counter()
    bar.close()
    return last_save


def train(args) -> Run:
    Path(args.work).mkdir(parents=True, exist_ok=True)
    run = Run(args)
    validation = validation_set(args.validation)
    total = args.steps + args.finish_steps
    last_save = _vision_stage(run)
    bar = tqdm(desc="ref-vlm", total=total, initial=run.step, disable=args.quiet, unit="step")
    last_eval = time.perf_counter()
    losses, hits = [], []
    while not run.done:
        start, cpu = time.perf_counter(), time.process_time()
        loss, hit = run.train_step()
        run.elapsed += time.perf_counter() - start
        run.cpu += time.process_time() - cpu
        losses, hits = [*losses[-49:], loss], [*hits[-49:], hit]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}", acc=f"{sum(hits) / len(hits):.2f}")
        record = {"step": run.step, "loss": loss, "train_accuracy": hit, "elapsed": round(run.elapsed, 1)}
        record["cpu"] = round(run.cpu, 1)  # process CPU seconds: about the wall time on an idle machine
        if run.lookup is not None:
            record["lookup_loss"] = run.lookup
        if time.perf_counter() - last_eval > args.eval_minutes * 60:
            record["validation"] = run.evaluate(validation)
            bar.write(f"step {run.step}: validation {json.dumps(record['validation'])}")
            last_eval = time.perf_counter()
        if time.perf_counter() - last_save > CHECKPOINT_EVERY:
            run.save()
            last_save = time.perf_counter()
        if run.step % 10 == 0 or "validation" in record:
            _log(args, record)
    bar.close()
    run.batches = None  # ends the worker processes
    run.save()
    return run


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        run = train(args)
        out = Path(args.out) if args.out else reference_vlm.WEIGHTS
        run.model.eval()
        final = {"step": run.step, "elapsed": round(run.elapsed, 1)}
        final["validation"] = run.evaluate(validation_set(args.validation))
        if not args.no_held_out:
            final["held_out"] = run.evaluate(scenes_multi.held_out())
        reference_vlm.save(run.model, run.processor, out)
        _log(args, {"final": final})
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        _say(args, f"ref-vlm: {json.dumps(final)}")
        _say(args, f"saved to {out} ({size:.1f} MB) in {(time.perf_counter() - start) / 60:.1f} min")
        return 0
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
