"""Baseline vs presets (and attention routes) on one tiny zoo family, in one process, same seed: what `accel demo`
and `accel bench --family` run.

    result = bench_family("flux", ["balanced", "fast"], attention=["int8"], steps=6, repeats=1, warmup=1)
    for row in result["rows"]: print(row.variant, row.speedup, row.psnr)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from accel.bench.harness import Variant, compare

VLM_NEW_TOKENS = 8  # new tokens of a VLM family's run, unless `steps` says otherwise


def tiny_run_fn(tiny, steps: int | None) -> Callable[[int], Any]:
    """run_fn(seed) of a zoo model; VLM outputs keep only the generated tokens (so agreement is not inflated by
    the shared prompt)."""
    if tiny.kind == "vlm":
        from accel.zoo import VLMOutput

        new = steps or VLM_NEW_TOKENS

        def run_vlm(seed: int) -> VLMOutput:
            out = tiny.run(seed, max_new_tokens=new)
            return VLMOutput(sequences=out.sequences[:, -new:], first_logits=out.first_logits)

        return run_vlm
    overrides = {"num_inference_steps": steps} if steps else {}
    return lambda seed: tiny.run(seed, **overrides)


def preset_variants(presets: Sequence[str], attention: Sequence[str] = ()) -> list[Variant]:
    """One variant per preset, then one per attention route alone ("attn-int8": the "lossless" preset plus
    `attention=route`, so its column shows what the kernel costs and saves)."""
    # strict=False: a family accel cannot patch shows up as "nothing applied" instead of aborting the run.
    variants = [Variant(p, {"preset": p, "strict": False}) for p in presets]
    variants += [Variant(f"attn-{k}", {"preset": "lossless", "attention": k}) for k in attention]
    return variants


def bench_family(
    family: str,
    presets: Sequence[str],
    *,
    attention: Sequence[str] = (),
    steps: int | None = None,
    repeats: int = 1,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """The comparison of one zoo family on CPU: {"family", "model", "kind", "steps", "rows"} (`harness.Row`s,
    baseline first); `steps`: denoising steps, or new tokens for a VLM (default: the family's)."""
    from accel import zoo

    tiny = zoo.build(family, seed=seed)
    rows = compare(
        tiny.obj,
        tiny_run_fn(tiny, steps),
        preset_variants(presets, attention),
        repeats=repeats,
        warmup=warmup,
        device="cpu",
        seed=seed,
        progress=progress,
        desc=family,
    )
    steps = steps or (tiny.default_steps if tiny.kind != "vlm" else VLM_NEW_TOKENS)
    return {"family": family, "model": tiny.name, "kind": tiny.kind, "steps": steps, "rows": rows}


__all__ = ["VLM_NEW_TOKENS", "bench_family", "preset_variants", "tiny_run_fn"]
