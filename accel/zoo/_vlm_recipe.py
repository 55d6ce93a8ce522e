"""`ref-vlm`'s training recipe (`accel.zoo.train_vlm`): its defaults and its command line."""

from __future__ import annotations

import argparse

VISION_STEPS, VISION_LR = 9000, 5e-3  # the vision tower alone, first; about 11 minutes here
VISION_TIME = 0.2  # its most share of --minutes (a slower machine, a GPU run capped by time)
STEPS = 12000  # the language model's, before the last stage; about 46 minutes here
MINUTES = 85.0  # the 90 minutes, less the evaluations, on a machine too slow for STEPS in time
CHECKPOINT_EVERY = 120.0  # seconds
WARMUP = 100
CURRICULUM = ((0.08, 2), (0.2, 3))  # (share of the steps, most shapes per scene) until then
VALIDATION = 120  # questions, a third of them on videos
SHAPE_WEIGHT = MOTION_WEIGHT = 1.0
POSITION_LOSS = 1.0
LOOKUP_LOSS = 1.0
FRESH_LM_AT = 0.0  # share of the run after which the language model starts over (1: never)
FRESH_VISION_LR = 0.5  # the vision tower's learning rate in that stage, as a share of the language model's
FINISH_STEPS, FINISH_LR, FINISH_VIDEO_SHARE = 2500, 5e-4, 0.5  # the last stage, after --steps


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m accel.zoo.train_vlm", description=description)
    p.add_argument("--work", default="accel-train/ref-vlm", help="checkpoint folder (default: %(default)s)")
    p.add_argument("--out", default=None, help="where to save model and processor (default: the shipped weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that draw the scenes ahead of the step (a GPU would otherwise wait for them); 0: in the "
        "training process, as on a 2-core CPU (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS, help="optimiser steps; sets the schedule (default: %(default)s)")
    p.add_argument(
        "--minutes",
        type=float,
        default=MINUTES,
        help="also stop after this much training time; the schedule then follows the time spent, so a run the clock "
        "stops is not the same step for step on a faster machine (default: %(default)s)",
    )
    p.add_argument("--scenes", type=int, default=8, help="images per step (videos: half) (default: %(default)s)")
    p.add_argument("--questions", type=int, default=10, help="questions per scene (default: %(default)s)")
    p.add_argument("--video-share", type=float, default=0.25, help="share of video steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument(
        "--token-loss",
        type=float,
        default=1.0,
        help="weight of the per-visual-token colour/shape/motion loss, 0 for none (default: %(default)s)",
    )
    p.add_argument(
        "--position-loss",
        type=float,
        default=POSITION_LOSS,
        help="weight of the loss that teaches the language model's first layer to name each visual token's cell "
        "(top/bottom, left/right), 0 for none (default: %(default)s)",
    )
    p.add_argument(
        "--lookup-loss",
        type=float,
        default=LOOKUP_LOSS,
        help="weight of the loss that has a first-layer head attend from the word naming the asked shape to its "
        "visual tokens, 0 for none (default: %(default)s)",
    )
    p.add_argument(
        "--shape-weight",
        type=float,
        default=SHAPE_WEIGHT,
        help="weight of the shape term of the token loss (colour: 1) (default: %(default)s)",
    )
    p.add_argument(
        "--motion-weight",
        type=float,
        default=MOTION_WEIGHT,
        help="weight of the motion term of the token loss (colour: 1) (default: %(default)s)",
    )
    p.add_argument("--eval-minutes", type=float, default=10.0, help="validation interval (default: %(default)s)")
    p.add_argument("--validation", type=int, default=VALIDATION, help="validation questions (default: %(default)s)")
    p.add_argument("--no-held-out", action="store_true", help="skip the held-out evaluation at the end")
    p.add_argument(
        "--init",
        default=None,
        help="start from a saved ref-vlm (e.g. the shipped weights) instead of a random init, without the curriculum: "
        "a continuation with other settings (--steps 0: the last stage alone)",
    )
    _stage_arguments(p)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --work")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    """The vision tower's stage, the fresh language model's and the last one (the module's docstring)."""
    p.add_argument(
        "--vision-steps",
        type=int,
        default=VISION_STEPS,
        help="steps of the vision tower alone on the token loss before the language model trains (at most "
        f"{VISION_TIME:.0%} of --minutes); 0: none (default: %(default)s)",
    )
    p.add_argument("--vision-lr", type=float, default=VISION_LR, help="their peak learning rate (default: %(default)s)")
    p.add_argument(
        "--fresh-lm-at",
        type=float,
        default=FRESH_LM_AT,
        help="share of the run (steps or --minutes, whichever is further) after which the language model's layers "
        "are drawn afresh and trained on the frozen word embeddings, with their own warm-up and decay, beside the "
        "vision tower (--fresh-vision-lr); 0 with --init: only that stage; 1: never (default: %(default)s)",
    )
    p.add_argument(
        "--fresh-vision-lr",
        type=float,
        default=FRESH_VISION_LR,
        help="the vision tower's learning rate beside the fresh language model, as a share of its rate, with the "
        "token loss still on; 0 freezes the tower (default: %(default)s)",
    )
    p.add_argument(
        "--finish-steps",
        type=int,
        default=FINISH_STEPS,
        help="steps of a last stage after --steps: everything trains again (word embeddings, vision tower at full "
        "rate) from a new optimiser, warm-up and decay, --finish-video-share of the steps on videos; 0: none "
        "(default: %(default)s)",
    )
    p.add_argument("--finish-lr", type=float, default=FINISH_LR, help="its peak learning rate (default: %(default)s)")
    p.add_argument(
        "--finish-video-share",
        type=float,
        default=FINISH_VIDEO_SHARE,
        help="its share of video steps (default: %(default)s)",
    )
