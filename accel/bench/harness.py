"""Side-by-side benchmark: the unpatched baseline and each accel variant, in one process, same seed.

    from accel.bench.harness import compare
    rows = compare(pipe, lambda seed: pipe(..., generator=torch.Generator().manual_seed(seed)).images,
                   ["lossless", "balanced", "fast"], repeats=3, warmup=1)
    for row in rows: print(row.to_dict())

`run_fn(seed)` must return the output to compare: float pixels in [0, 1] (`[B, C, H, W]` images or
`[B, F, C, H, W]` videos) or an `accel.zoo.VLMOutput`. For VLM outputs token agreement is computed over the
whole `sequences`, so return only the generated tokens for a strict number (`accel demo` does).

Each variant is `accel.patch(target, **kwargs)`, timed, and always unpatched again (also on error). An error in
a variant is recorded in its row (`row.error`) and the comparison goes on; an error in the baseline raises.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import accel
from accel.bench import measure, metrics
from accel.bench.host import to_json

BASELINE = "baseline"


@dataclass
class Variant:
    """A named way to run the target: `accel.patch(target, **patch_kwargs)`, e.g.
    `Variant("t0.1", {"cache": CacheConfig(threshold=0.1)})`. A reference that is not accel (e.g. diffusers' own
    cache) gives `install(target, **patch_kwargs)`, a context manager, and names its `kind`; kind "baseline"
    runs the target as it is."""

    name: str
    patch_kwargs: dict = field(default_factory=dict)
    kind: str = "accel"
    install: Callable[..., AbstractContextManager] | None = None


@contextmanager
def applied(target: Any, variant: Variant) -> Iterator[Any]:
    """`variant` installed on `target` for the block (always removed again); yields accel's handle or None."""
    if variant.install is not None:
        with variant.install(target, **variant.patch_kwargs):
            yield None
        return
    if variant.kind != "accel":
        yield None
        return
    handle = accel.patch(target, **variant.patch_kwargs)
    try:
        yield handle
    finally:
        if accel.get_handle(target) is handle:  # run_fn may have unpatched it itself
            accel.unpatch(target)


@dataclass
class Row:
    variant: str
    times_s: list[float]
    median_s: float | None
    speedup: float | None  # baseline median / this median, from the same compare() call
    peak_memory_bytes: int | None
    memory_kind: str  # "cuda" (max allocated) or "cpu-rss" (sampled process RSS)
    computed: int | None = None  # denoiser passes of the last timed call, summed over branches
    reused: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    lpips: float | None = None
    token_agreement: float | None = None
    first_token_kl: float | None = None
    applied: list[str] = field(default_factory=list)  # "accelerator: detail"
    skipped: list[str] = field(default_factory=list)  # "accelerator: reason"
    report: dict | None = None  # Report.to_dict() of the patched variant (None for the baseline)
    error: str | None = None

    def to_dict(self) -> dict:
        """JSON-safe dict (inf/nan floats become the strings "inf"/"nan")."""
        return to_json(self)


def as_variant(spec: str | Variant | tuple[str, dict]) -> Variant:
    """ "fast" -> Variant("fast", {"preset": "fast"}); (name, kwargs) -> Variant(name, kwargs)."""
    if isinstance(spec, Variant):
        return spec
    if isinstance(spec, str):
        return Variant(spec, {"preset": spec})
    name, kwargs = spec
    return Variant(name, dict(kwargs))


def output_kind(output: Any) -> str:
    """ "vlm" for a `VLMOutput`, "pixels" for a tensor; anything else cannot be compared."""
    from accel.zoo._base import VLMOutput

    if isinstance(output, VLMOutput):
        return "vlm"
    if isinstance(output, torch.Tensor):
        return "pixels"
    raise TypeError(
        f"cannot compare outputs of type {type(output).__name__}: run_fn must return a pixel tensor in [0, 1] "
        "or an accel.zoo.VLMOutput"
    )


def fidelity(output: Any, reference: Any) -> dict[str, float | None]:
    """Closeness of `output` to the baseline's `reference`: PSNR/SSIM/LPIPS for pixels, token agreement and
    first-token KL for `VLMOutput`s."""
    if output_kind(reference) == "vlm":
        return {
            "token_agreement": metrics.token_agreement(reference.sequences, output.sequences),
            "first_token_kl": metrics.first_token_kl(reference.first_logits, output.first_logits),
        }
    return {
        "psnr": metrics.psnr(output, reference),
        "ssim": metrics.ssim(output, reference),
        "lpips": metrics.lpips_or_none(output, reference),
    }


def _timed(run_fn: Callable[[int], Any], seed: int, repeats: int, warmup: int, device) -> tuple[list[float], Any, Any]:
    """(wall times of the timed calls, output of the last call, PeakMemory over warm-up and timed calls)."""
    last: list[Any] = [None]

    def call() -> None:
        last[0] = run_fn(seed)

    with measure.PeakMemory(device) as mem:
        times = measure.time_calls(call, repeats=repeats, warmup=warmup, device=device)
    return times, last[0], mem


def _summaries(report) -> tuple[list[str], list[str]]:
    applied = [f"{a.accelerator}: {a.detail}" for a in report.applied]
    skipped = [f"{s.accelerator}: {s.reason}" for s in report.skipped]
    return applied, skipped


def run_variant(
    target: Any,
    run_fn: Callable[[int], Any],
    variant: Variant,
    reference: Any,
    *,
    repeats: int,
    warmup: int,
    device,
    seed: int,
) -> Row:
    """Patch `target` with `variant`, time `run_fn`, unpatch (always), and compare with `reference`."""
    row = Row(variant.name, [], None, None, None, "")
    try:
        with applied(target, variant) as handle:
            times, output, mem = _timed(run_fn, seed, repeats, warmup, device)
            report = handle.report() if handle is not None else None
        row.times_s, row.median_s = times, measure.median(times)
        row.peak_memory_bytes, row.memory_kind = mem.peak_bytes, mem.device_kind
        if report is not None:
            calls = report.stats.get("cache", {}).get("calls")
            if calls:
                row.computed, row.reused = calls[-1]["computed"], calls[-1]["reused"]
            row.applied, row.skipped = _summaries(report)
            row.report = report.to_dict()
        for key, value in fidelity(output, reference).items():
            setattr(row, key, value)
    except Exception as err:  # noqa: BLE001  (recorded in the row, the other variants still run)
        row.error = f"{type(err).__name__}: {err}"
        row.report = {"traceback": traceback.format_exc()}
    return row


def compare(
    target: Any,
    run_fn: Callable[[int], Any],
    variants: Sequence[str | Variant | tuple[str, dict]] = ("lossless", "balanced", "fast"),
    *,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> list[Row]:
    """Run the unpatched baseline, then each variant, on `target` via `run_fn(seed)`; one `Row` each (baseline
    first). `warmup` untimed calls precede the `repeats` timed calls of every variant and of the baseline.
    `target` is what is passed to `accel.patch` (a pipeline or model); it must not be patched already."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if accel.get_handle(target) is not None:
        raise accel.AlreadyPatchedError(
            "compare() needs the unpatched target as its baseline; call accel.unpatch first"
        )
    from tqdm.auto import tqdm

    variants = [as_variant(v) for v in variants]
    # disable=None: bars only on a terminal
    bar = tqdm(
        total=1 + len(variants), desc=desc or "compare", unit="variant", disable=None if progress else True, leave=False
    )
    try:
        bar.set_postfix_str(BASELINE)
        times, reference, mem = _timed(run_fn, seed, repeats, warmup, device)
        base = Row(BASELINE, times, measure.median(times), 1.0, mem.peak_bytes, mem.device_kind)
        output_kind(reference)  # fail early on an output that cannot be compared
        rows = [base]
        bar.update()
        for variant in variants:
            bar.set_postfix_str(variant.name)
            row = run_variant(
                target, run_fn, variant, reference, repeats=repeats, warmup=warmup, device=device, seed=seed
            )
            if row.median_s:
                row.speedup = base.median_s / row.median_s
            rows.append(row)
            bar.update()
    finally:
        bar.close()
    return rows


__all__ = ["BASELINE", "Row", "Variant", "applied", "as_variant", "compare", "fidelity", "output_kind", "run_variant"]
