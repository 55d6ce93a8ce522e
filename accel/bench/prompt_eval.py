"""How well a reference pipeline follows its prompts: ``python -m accel.bench.prompt_eval ref-flux --n 100``.

Generates one image (or clip) for each of `n` seeded domain prompts, with generator seed = the prompt's index,
and scores them with `accel.bench.prompt_score` (the GenEval in miniature of issue 12). ``--growth WORK`` scores
instead every snapshot a training run saved (``python -m accel.zoo.train ... --snapshot-every N``): how prompt
following grew with training time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from accel.bench.prompt_score import score
from accel.zoo import reference as references
from accel.zoo import shapes


def eval_prompts(ref: references.Reference, n: int, seed: int = 0) -> list[str]:
    """The `n` prompts of an evaluation: seeded scenes of the domain (clips get a motion)."""
    return [shapes.prompt(s) for s in shapes.sample_scenes(n, seed, video=ref.kind == "video")]


def outputs(pipe, ref, prompts: list[str], *, steps=None, guidance=None, first_seed: int = 0, batch: int = 10):
    """Float pixels in [0, 1], one per prompt ([N, 3, H, W] or [N, F, 3, H, W]), generated in batches; prompt i
    gets generator seed first_seed + i whatever the batch size."""
    results = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        kwargs = ref.call_kwargs(steps, guidance)
        kwargs["negative_prompt"] = [""] * len(chunk)
        generators = [torch.Generator().manual_seed(first_seed + start + i) for i in range(len(chunk))]
        result = pipe(chunk, generator=generators, **kwargs)
        results.append((result.images if ref.kind == "image" else result.frames).float().cpu())
    return torch.cat(results)


def prompt_following(pipe, ref, n: int = 100, seed: int = 0, steps=None, guidance=None, progress=True) -> dict:
    """`accel.bench.prompt_score.score` of `pipe` on `n` seeded prompts."""
    prompts = eval_prompts(ref, n, seed)
    batch = 10
    chunks = []
    for start in tqdm(range(0, n, batch), desc=f"{ref.name} prompts", disable=not progress):
        chunk = prompts[start : start + batch]
        chunks.append(outputs(pipe, ref, chunk, steps=steps, guidance=guidance, first_seed=start, batch=batch))
    return score(list(torch.cat(chunks)), prompts)


def growth(pipe, ref, work: str | Path, n: int = 50, **kwargs) -> list[dict]:
    """The prompt score of each EMA snapshot in `work/snapshots`, loaded into `pipe`'s transformer in turn, with
    the step and the training minutes up to it (the stages' own clocks, as `work/log.jsonl` records them)."""
    work = Path(work)
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    before = sum(r["elapsed"] for r in records if r.get("done") and r["stage"] != "transformer")
    snapshots = {r["snapshot"]: r for r in records if "snapshot" in r}  # a resumed run may log one twice
    if not snapshots:
        raise FileNotFoundError(f"no snapshots logged in {work}; train with --snapshot-every N")
    rows = []
    for name, record in sorted(snapshots.items(), key=lambda item: item[1]["step"]):
        pipe.transformer.load_state_dict(torch.load(work / "snapshots" / name, weights_only=True))
        result = prompt_following(pipe, ref, n, **kwargs)
        scores = {k: v for k, v in result.items() if k != "samples"}
        rows.append({"step": record["step"], "minutes": round((before + record["elapsed"]) / 60, 2), **scores})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accel.bench.prompt_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=references.NAMES)
    p.add_argument("--n", type=int, default=100, help="prompts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--path", default=None, help="a saved pipeline to score instead of the shipped one")
    p.add_argument("--device", default="cpu", help="where the pipeline runs (default: %(default)s)")
    p.add_argument("--growth", default=None, help="a training --work folder: score each of its snapshots")
    args = p.parse_args(argv)
    ref = references.reference(args.name)
    if args.path:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.path, dtype=torch.float32).to(args.device)
        pipe = references.configured(pipe, ref)
    else:
        pipe = references.load(args.name, device=args.device)
    kwargs = dict(seed=args.seed, steps=args.steps, guidance=args.guidance)
    if args.growth:
        json.dump(growth(pipe, ref, args.growth, args.n, **kwargs), sys.stdout, indent=1)
        print()
        return 0
    result = prompt_following(pipe, ref, args.n, **kwargs)
    json.dump({k: v for k, v in result.items() if k != "samples"}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
