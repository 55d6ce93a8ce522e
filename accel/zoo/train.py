"""Train a reference model: ``python -m accel.zoo.train ref-flux`` (or ``ref-wan``).

Two stages, each seeded, time-boxed and resumable from its checkpoint in ``--work``: the VAE learns to
reconstruct fresh renders of the shapes domain, then the transformer learns flow matching on the VAE's latents
of a fixed rendered set, with the frozen text encoders read through the pipeline's own `encode_prompt`. The
result (EMA weights of the transformer, float16) is saved with `save_pretrained` to ``--out`` (by default
where `accel.zoo.load` looks). Run it again after an interruption and it continues where it stopped.

On an idle 2-core CPU the default step counts take under an hour per model with ``--threads 2`` (``ref-flux``
about 53 minutes on the slower of two such machines, 33 on the faster; ``ref-wan`` about 45 on the faster, projected
from timed steps), and ``ref-wan``'s plan also holds a 60-minute budget: on a slower machine its transformer stops
early with fewer steps (see `Plan.minutes`). One thread, the default, is the faster on a machine shared with other
work. ``--minutes`` caps a stage by time instead. With a GPU, ``--device cuda --batch 256 --steps 6000`` trains a
better model in minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from accel.zoo import reference as references
from accel.zoo._train_data import all_prompts, prompt_features, render_batch
from accel.zoo._train_steps import (
    CountedPads,
    encode_latents,
    flow_loss,
    normalisation,
    normalise,
    reconstruction_loss,
    vae_loss,
)


@dataclass(frozen=True)
class Plan:
    """A model's default training run. Fixed step counts keep it reproducible; on an idle 2-core CPU each model
    takes under an hour (ref-wan with two threads on the faster of two machines: VAE 0.45 s/step, transformer 0.33
    s/step; the slower took 19.5 min for the VAE and 0.65 s per transformer step)."""

    vae_steps: int
    decoder_steps: int  # decoder-only fine-tuning on full clips, encoder frozen (0: none)
    steps: int  # transformer
    vae_batch: int
    batch: int
    dataset: int  # rendered images/clips the transformer's latents come from
    vae_crop: int = 0  # train the VAE (and decoder) on random square crops of this side (0: whole frames)
    shape_weight: float = 0.0  # extra reconstruction weight of the shape's pixels (see `reconstruction_loss`)
    short_text: float = 0.0  # share of prompts padded as the pipeline call pads them (see `compact_text`)
    lr: float = 5e-4  # transformer
    sigma_mean: float = 0.0  # mean of the logit-normal training noise levels (see `sample_sigmas`)
    # The whole run's budget in minutes (None: none): the transformer stops early where its steps would overrun it
    # (``--minutes`` overrides), so a slower machine ends on time with fewer steps.
    minutes: float | None = None


PLANS = {
    # Shape (50 prompts) was still rising at 4000 steps: 44% at 1000, 70% at 3000, 90% at 4000, 92% at 7000.
    "ref-flux": Plan(vae_steps=600, decoder_steps=0, steps=7000, vae_batch=16, batch=32, dataset=8192),
    # A convolutional VAE learns the same from 32x32 crops at a quarter of the cost, so it sees four times the
    # shapes; weighting the shape's pixels makes it keep their colour (unweighted, after 19 minutes, the colour
    # of only 44% of reconstructed clips was readable, and the transformer could not learn what it never saw).
    "ref-wan": Plan(
        vae_steps=1200,
        decoder_steps=150,
        # Motion (50 prompts) was still rising at 2800 steps: 12% at 1000, 44% at 3000, 88% at 5000 and 6000;
        # shape 28%, 34%, 38%, 44%. Steps past the budget are cut by `minutes` (an idle 2-core machine of
        # 2026-12-03 ran all 6000 in about 45 minutes with --threads 2; one twice as slow stops near 3000).
        steps=6000,
        minutes=60.0,
        vae_batch=16,
        batch=12,
        dataset=1536,
        vae_crop=32,
        shape_weight=8.0,
        short_text=0.5,
        # 500-step trials from the trained VAE, colour right on 50 prompts: 16% at 5e-4 with mean 0, 36% at 1e-3
        # with mean 0.5, 38% at 2e-3 with 0.5, 30% at 1e-3 with 1.0 (benchmarks/RESULTS.md)
        lr=1e-3,
        sigma_mean=0.5,
    ),
}
STAGES = ("vae", "decoder", "transformer")
CHECKPOINT_EVERY = 120.0  # seconds
OVERHEAD_MINUTES = 3.0  # of a run's budget, outside the stages' clocks: loading, encoding the latent set, saving
MIN_TRANSFORMER_MINUTES = 5.0
EMA_DECAY = 0.999


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m accel.zoo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=references.NAMES)
    p.add_argument("--work", default=None, help="checkpoint folder (default: ./accel-train/<name>)")
    p.add_argument("--out", default=None, help="where to save the pipeline (default: the shipped weights' folder)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default per model)")
    p.add_argument("--decoder-steps", type=int, default=None, help="decoder fine-tuning steps (default per model)")
    p.add_argument("--steps", type=int, default=None, help="transformer steps (default per model)")
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="stages to run, in order (default: %(default)s; the VAE stage is always needed, and the pipeline is "
        "saved only when the transformer stage runs; stages finished earlier are loaded from --work)",
    )
    p.add_argument(
        "--vae-from",
        default=None,
        help="a saved pipeline (e.g. the shipped one) whose VAE to use as it is, instead of the VAE and decoder "
        "stages: retrains the transformer alone",
    )
    p.add_argument("--vae-minutes", type=float, default=None, help="also stop the VAE after this much time")
    p.add_argument("--minutes", type=float, default=None, help="also stop the transformer after this much time")
    p.add_argument("--vae-batch", type=int, default=None, help="VAE batch (default per model)")
    p.add_argument("--batch", type=int, default=None, help="transformer batch (default per model)")
    p.add_argument("--dataset", type=int, default=None, help="rendered set size for the transformer")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=None, help="transformer learning rate (default per model)")
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        help="save the transformer's EMA weights every this many steps to --work/snapshots, to score how the model "
        "grew with training (benchmarks/growth.py) (default: never)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --work")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class Stage:
    """A resumable, time-boxed optimisation of one module: step count, elapsed time, optimiser, EMA, RNGs."""

    def __init__(
        self, name: str, module, args, max_steps: int, minutes: float | None, lr: float, params=None, snapshots=0
    ):
        self.name, self.module, self.args = name, module, args
        self.snapshots = snapshots  # save the EMA weights every this many steps (0: never), for growth curves
        self.budget = math.inf if minutes is None else minutes * 60.0
        self.max_steps = max_steps
        self.file = Path(args.work) / f"{name}.pt"
        params = list(module.parameters() if params is None else params)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.ema = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.step, self.elapsed, self.done = 0, 0.0, False
        self.gen = torch.Generator().manual_seed(args.seed)
        self.rng = random.Random(args.seed)
        if self.file.exists() and not args.fresh:
            self._load()

    def _load(self) -> None:
        state = torch.load(self.file, map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        device = next(self.module.parameters()).device
        self.ema = {key: value.to(device) for key, value in state["ema"].items()}
        self.step, self.elapsed, self.done = state["step"], state["elapsed"], state["done"]
        self.gen.set_state(state["gen"])
        self.rng.setstate(state["rng"])
        _say(self.args, f"{self.name}: resumed at step {self.step} ({self.elapsed / 60:.1f} min done)")

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        state = dict(
            module=self.module.state_dict(),
            optimizer=self.optimizer.state_dict(),
            ema=self.ema,
            step=self.step,
            elapsed=self.elapsed,
            done=self.done,
            gen=self.gen.get_state(),
            rng=self.rng.getstate(),
        )
        torch.save(state, self.file.with_suffix(".tmp"))
        self.file.with_suffix(".tmp").replace(self.file)  # never a half-written checkpoint

    def snapshot(self) -> None:
        """The EMA weights now, in float16, as `<work>/snapshots/<stage>-<step>.pt`, logged with the time spent."""
        folder = Path(self.args.work) / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"{self.name}-{self.step:06d}.pt"
        torch.save({k: v.to("cpu", torch.float16) if v.is_floating_point() else v for k, v in self.ema.items()}, file)
        _log(self.args, {"stage": self.name, "step": self.step, "snapshot": file.name, "elapsed": self.elapsed})

    def finished(self) -> bool:
        return self.step >= self.max_steps or self.elapsed >= self.budget

    def run(self, loss_fn) -> None:
        """Call `loss_fn(stage)` and step until the budget is spent, checkpointing along the way."""
        if self.finished():  # a finished stage continues when rerun with a larger budget
            return
        self.module.train()
        warmup = 100
        base_lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(desc=f"{self.args.name} {self.name}", initial=self.step, disable=self.args.quiet, unit="step")
        last_save, losses = time.perf_counter(), []
        while not self.finished():
            start = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = base_lr * min(1.0, (self.step + 1) / warmup)
            loss = loss_fn(self)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self._update_ema()
            self.step += 1
            self.elapsed += time.perf_counter() - start
            if self.snapshots and self.step % self.snapshots == 0:
                self.snapshot()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", minutes=f"{self.elapsed / 60:.1f}")
            if time.perf_counter() - last_save > CHECKPOINT_EVERY:
                self.save()
                _log(self.args, {"stage": self.name, "step": self.step, "loss": losses[-1], "elapsed": self.elapsed})
                last_save = time.perf_counter()
        bar.close()
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr
        self.done = True
        self.save()
        _log(self.args, {"stage": self.name, "step": self.step, "done": True, "elapsed": self.elapsed})

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(EMA_DECAY, (1 + self.step) / (10 + self.step))
        for key, value in self.module.state_dict().items():
            if value.is_floating_point():
                self.ema[key].lerp_(value.detach(), 1 - decay)
            else:
                self.ema[key].copy_(value)


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def _log(args, record: dict) -> None:
    with open(Path(args.work) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _crop(x: torch.Tensor, side: int, rng: random.Random) -> torch.Tensor:
    """A random `side` x `side` crop of every image or frame of `x`, on the VAE's x4 grid."""
    if not side:
        return x
    top, left = (rng.randrange(0, x.shape[-1] - side + 1, 4) for _ in range(2))
    return x[..., top : top + side, left : left + side]


def train_vae(pipe, ref, args) -> float:
    """Train (or load from --work) the VAE; returns the seconds its stage took."""
    plan = PLANS[ref.name]
    vae = pipe.vae.to(args.device)
    stage = Stage("vae", vae, args, args.vae_steps or plan.vae_steps, args.vae_minutes, args.vae_lr)

    def loss(stage: Stage) -> torch.Tensor:
        x, _ = render_batch(ref, args.vae_batch or plan.vae_batch, seed=args.seed * 1_000_003 + stage.step)
        if ref.kind == "video":  # one causal chunk (first frame + 4) is what the encoder repeats; half the cost
            start = stage.rng.choice((0, 4))
            x = x[:, :, start : start + 5]
        x = _crop(x, plan.vae_crop, stage.rng)
        return vae_loss(vae, x.to(args.device), ref, plan.shape_weight)

    stage.run(loss)
    vae.load_state_dict(stage.ema)
    vae.eval().requires_grad_(False)
    return stage.elapsed


def train_decoder(pipe, ref, args) -> float:
    """Fine-tune the decode side on whole clips with the encoder frozen: the latents (and so the transformer's
    training data) stay as they are, the pictures get cleaner. Wan's decoder also learns the chunk-to-chunk
    caching it never sees in the VAE stage's single chunks. Returns the seconds its stage took."""
    plan = PLANS[ref.name]
    steps = plan.decoder_steps if args.decoder_steps is None else args.decoder_steps
    if not steps:
        return 0.0
    vae = pipe.vae
    decode_side = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
    for p in decode_side:
        p.requires_grad_(True)
    stage = Stage("decoder", vae, args, steps, None, args.vae_lr / 2, params=decode_side)

    def loss(stage: Stage) -> torch.Tensor:
        x, _ = render_batch(ref, args.vae_batch or plan.vae_batch, seed=args.seed * 1_000_003 + 500_009 + stage.step)
        x = _crop(x, plan.vae_crop, stage.rng).to(args.device)
        with torch.no_grad():
            latents = encode_latents(vae, x)
        return reconstruction_loss(vae.decode(latents).sample, x, plan.shape_weight)

    stage.run(loss)
    vae.load_state_dict(stage.ema)
    vae.eval().requires_grad_(False)
    return stage.elapsed


def transformer_minutes(plan: Plan, args, spent: float) -> float | None:
    """The transformer's time cap: ``--minutes``, else what the plan's budget leaves after `spent` seconds of the
    earlier stages (at least `MIN_TRANSFORMER_MINUTES`)."""
    if args.minutes is not None or plan.minutes is None:
        return args.minutes
    left = max(plan.minutes - OVERHEAD_MINUTES - spent / 60, MIN_TRANSFORMER_MINUTES)
    _say(args, f"transformer: at most {left:.1f} min (the plan's {plan.minutes:g})")
    return left


@torch.no_grad()
def latent_set(pipe, ref, args, size: int) -> tuple[torch.Tensor, list[str]]:
    """Render and encode the transformer's training set once (cached in --work), and set the VAE's latent
    normalisation from it."""
    cache = Path(args.work) / f"latents-{size}.pt"
    if cache.exists() and not args.fresh:
        latents, prompts = torch.load(cache, weights_only=False)
    else:
        chunks, prompts = [], []
        for first in tqdm(range(0, size, 64), desc=f"{ref.name} encoding", disable=args.quiet):
            x, batch_prompts = render_batch(ref, min(64, size - first), seed=10_000_019 + first + args.seed)
            chunks.append(encode_latents(pipe.vae, x.to(args.device)).cpu())
            prompts += batch_prompts
        latents = torch.cat(chunks)
        torch.save((latents, prompts), cache)
    pipe.vae.register_to_config(**normalisation(latents, ref))
    return normalise(latents, pipe.vae, ref), prompts


def train_transformer(pipe, ref, args, spent: float = 0.0) -> None:
    """Train the transformer on the latent set; `spent`: seconds the earlier stages took (see `transformer_minutes`)."""
    plan = PLANS[ref.name]
    batch = args.batch or plan.batch
    latents, prompts = latent_set(pipe, ref, args, args.dataset or plan.dataset)
    features = prompt_features(pipe, ref, all_prompts(ref.kind == "video"))
    transformer = pipe.transformer.to(args.device)
    originals = []
    if ref.kind == "video":
        for block in transformer.blocks:
            originals.append(block.attn2.processor)
            block.attn2.set_processor(CountedPads(block.attn2.processor))
    steps, lr = args.steps or plan.steps, args.lr or plan.lr
    minutes = transformer_minutes(plan, args, spent)
    stage = Stage("transformer", transformer, args, steps, minutes, lr, snapshots=args.snapshot_every)

    def loss(stage: Stage) -> torch.Tensor:
        rows = torch.randint(0, latents.shape[0], (batch,), generator=stage.gen)
        x0 = latents[rows].to(args.device)
        batch_prompts = [prompts[i] for i in rows]
        return flow_loss(
            transformer, x0, batch_prompts, features, ref, stage.gen, stage.rng, plan.short_text, plan.sigma_mean
        )

    stage.run(loss)
    if stage.step < steps:
        _say(args, f"transformer: stopped by time at step {stage.step} of {steps}")
    for block, processor in zip(getattr(transformer, "blocks", []), originals):
        block.attn2.set_processor(processor)
    transformer.load_state_dict(stage.ema)
    transformer.eval().requires_grad_(False)


def save(pipe, out: Path) -> None:
    """float16 on disk (loaded back as any dtype); each model well under 25 MB."""
    pipe.to("cpu")
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(torch.float32)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args) -> int:
    ref = references.reference(args.name)
    args.work = args.work or str(Path("accel-train") / ref.name)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else references.path(ref.name)
    start = time.perf_counter()
    pipe = references.untrained(ref.name, seed=args.seed)
    stages = args.stages.split(",")
    unknown = [name for name in stages if name not in STAGES]
    if unknown or "vae" not in stages:
        raise SystemExit(f"--stages {args.stages}: give a comma-separated subset of {','.join(STAGES)} with vae")
    spent = 0.0  # seconds of the VAE stages, from their checkpoints' clocks
    if args.vae_from:
        trained = type(pipe.vae).from_pretrained(str(Path(args.vae_from) / "vae"), dtype=torch.float32)
        pipe.vae.load_state_dict(trained.state_dict())
        pipe.vae.to(args.device).eval().requires_grad_(False)
    else:
        spent += train_vae(pipe, ref, args)
    if "decoder" in stages and not args.vae_from:
        spent += train_decoder(pipe, ref, args)
    if "transformer" not in stages:
        _say(args, f"stages {args.stages} done; rerun with every stage to save the pipeline")
        return 0
    train_transformer(pipe, ref, args, spent)
    save(pipe, out)
    sizes = {p.parent.name: p.stat().st_size / 2**20 for p in out.glob("*/*.safetensors")}
    _say(args, f"saved {ref.name} to {out} in {(time.perf_counter() - start) / 60:.1f} min; MB: {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
