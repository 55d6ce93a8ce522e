"""Samples and prompt-following scores of the reference models (issue 12), for the README and RESULTS.md.

    python benchmarks/reference_samples.py --out docs            # grids + scores of both models
    python benchmarks/reference_samples.py --models ref-flux --n 20 --steps 4

Writes `<out>/<model>-grid.png` (each column one prompt: ground truth above, the pipeline's sample below; clips
show every other frame) and `<out>/<model>-scores.json` (`accel.bench.prompt_score.score` on `--n` seeded
prompts, without the per-sample rows), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from accel.bench.prompt_eval import eval_prompts, outputs, prompt_following
from accel.zoo import reference as references
from accel.zoo import shapes

GRID_PROMPTS = 8


def _frames(sample: torch.Tensor) -> list[torch.Tensor]:
    """An image as itself, a clip as every other frame."""
    return [sample] if sample.dim() == 3 else list(sample[::2])


def grid(truth: torch.Tensor, samples: torch.Tensor, scale: int = 2) -> Image.Image:
    """Columns of prompts; per column the ground truth's frames, then the sample's, stacked downwards."""
    columns = []
    for t, s in zip(truth, samples):
        columns.append(torch.cat([*_frames(t), *_frames(s)], dim=1))  # [3, rows*H, W]
    pad = torch.ones(3, columns[0].shape[1], 2)
    picture = torch.cat([c for column in columns for c in (column, pad)][:-1], dim=2)
    array = (picture.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def run_model(name: str, out: Path, n: int, steps: int | None) -> dict:
    ref = references.reference(name)
    pipe = references.load(name)
    prompts = eval_prompts(ref, GRID_PROMPTS, seed=1)
    samples = outputs(pipe, ref, prompts, steps=steps)
    truth = torch.stack(
        [shapes.render_prompt(p, seed=i, size=ref.size, frames=ref.frames) for i, p in enumerate(prompts)]
    )
    grid(truth, samples).save(out / f"{name}-grid.png")
    start = time.perf_counter()
    result = prompt_following(pipe, ref, n=n, steps=steps)
    result = {k: v for k, v in result.items() if k != "samples"}
    result.update(steps=steps or ref.steps, guidance=ref.guidance, cpu_seconds=round(time.perf_counter() - start, 1))
    (out / f"{name}-scores.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(references.NAMES))
    p.add_argument("--out", default="docs")
    p.add_argument("--n", type=int, default=100, help="prompts scored (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| model | prompts | colour | shape | background | motion | all right | steps | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = run_model(name, out, args.n, args.steps)
        motion = "-" if r["motion"] is None else f"{r['motion']:.0%}"
        print(
            f"| {name} | {r['n']} | {r['colour']:.0%} | {r['shape']:.0%} | {r['background']:.0%} | {motion} "
            f"| {r['overall']:.0%} | {r['steps']} | {r['cpu_seconds']} |"
        )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
