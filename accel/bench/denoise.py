"""Step caching compared on a denoising loop: each variant runs a scenario's loop (`accel.bench.scenarios`) on the
same model, inputs and seed; one row each, with time, memory, denoiser passes computed/reused and the fidelity
of the final latent to the baseline's.

    scn = WanScenario(tiny=False, device=cuda, dtype=torch.bfloat16, seed=0)
    model, inputs = scn.build(), scn.make_inputs()
    variants = [Variant("baseline", kind="baseline"), diffusers_cache(0.1),
                Variant("accel thr 0.1", {"cache": CacheConfig(threshold=0.1, num_steps=50)})]
    rows = compare_denoise(scn, model, inputs, variants, steps=50, repeats=3, warmup=1)

Passes are counted twice: by a probe on the last transformer block (`PassCounter`), which runs only when that
block computes, and, for accel variants, by accel's report (one call per run); a disagreement lands in the row's
`notes`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from accel.bench import measure
from accel.bench.harness import Variant, applied
from accel.bench.metrics import latent_fidelity
from accel.bench.scenarios import PassCounter, Scenario

RERUN = "baseline-rerun"


@contextmanager
def _diffusers_first_block_cache(model: nn.Module, config: Any) -> Iterator[None]:
    model.enable_cache(config)
    try:
        yield
    finally:
        model.disable_cache()


def diffusers_cache(threshold: float) -> Variant:
    """diffusers' own First Block Cache: `model.enable_cache(FirstBlockCacheConfig(threshold=threshold))`."""
    from diffusers.hooks import FirstBlockCacheConfig

    return Variant(
        f"diffusers FBC {threshold:g}",
        {"config": FirstBlockCacheConfig(threshold=threshold)},
        kind="diffusers-fbc",
        install=_diffusers_first_block_cache,
    )


def variant_config(variant: Variant) -> Any:
    """The one config a caching variant installs (accel's CacheConfig or diffusers' config), or None."""
    return next(iter(variant.patch_kwargs.values()), None)


def _accel_checks(row: dict[str, Any], report, runs: int, passes: int, probed: int) -> None:
    calls = report.stats["cache"]["calls"]
    call = calls[-1]
    row["accel_report"] = dict(
        calls_recorded=len(calls),
        last_call=call,
        warnings=list(report.warnings),
        applied=[vars(a) for a in report.applied],
    )
    row["computed"], row["reused"] = call["computed"], call["reused"]
    row["computed_source"] = "accel report"
    if len(calls) != runs:
        row["notes"].append(f"accel recorded {len(calls)} calls for {runs} runs")
    bad = [c["computed"] + c["reused"] for c in calls if c["computed"] + c["reused"] != passes]
    if bad:
        row["notes"].append(f"accel calls with a pass count other than {passes}: {bad}")
    if call["computed"] != probed:
        row["notes"].append(f"accel report says {call['computed']} computed, the last-block probe counted {probed}")


def measure_denoise(
    scn: Scenario,
    model: nn.Module,
    inputs: dict[str, Any],
    variant: Variant,
    steps: int,
    *,
    repeats: int,
    warmup: int,
    counter: PassCounter,
) -> tuple[dict[str, Any], torch.Tensor]:
    """(the variant's row, its last final latent on the CPU): `warmup` untimed and `repeats` timed runs of the
    loop (`measure.time_calls`), peak memory over the timed runs."""
    passes = steps * len(scn.branches)
    computed_per_run: list[int] = []
    latents: list[torch.Tensor] = []  # the first and the last run's

    def run() -> None:
        counter.n = 0
        out = scn.denoise(model, inputs, steps)
        computed_per_run.append(counter.n)
        if not latents:
            latents.append(out)
        latents[1:] = [out]

    with applied(model, variant) as handle:
        measure.time_calls(run, repeats=0, warmup=warmup, device=scn.device)
        with measure.PeakMemory(scn.device) as mem:
            times = measure.time_calls(run, repeats=repeats, warmup=0, device=scn.device)
        report = handle.report() if handle is not None else None
    first, last = (t.detach().float().cpu() for t in latents)
    row: dict[str, Any] = dict(
        name=variant.name,
        kind=variant.kind,
        config=variant_config(variant),
        runs_timed=repeats,
        runs_warmup=warmup,
        times_s=times,
        median_s=measure.median(times),
        peak_mem_bytes=mem.peak_bytes,
        peak_mem_kind=mem.device_kind,
        passes=passes,
        computed=computed_per_run[-1],
        reused=passes - computed_per_run[-1],
        computed_source="probe on the last block",
        computed_per_run=computed_per_run,
        # the same seed every run: a cache that keeps no state across calls gives the same latent every run
        run_to_run_max_abs_diff=float((first - last).abs().max()),
        notes=[],
    )
    if len(set(computed_per_run)) > 1:
        row["notes"].append(f"computed passes differ between runs: {computed_per_run}")
    if report is not None:
        _accel_checks(row, report, warmup + repeats, passes, computed_per_run[-1])
    return row, last


def compare_denoise(
    scn: Scenario,
    model: nn.Module,
    inputs: dict[str, Any],
    variants: list[Variant],
    steps: int,
    *,
    repeats: int,
    warmup: int,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
) -> list[dict[str, Any]]:
    """One row per variant, the first (the baseline) the reference for fidelity and speed-up. A variant of kind
    "baseline-rerun" runs once, untimed warm-up skipped. A failing variant other than the first is recorded in
    its row (`error`) and the others still run; `log(row)` is called as each row is done."""
    counter = PassCounter(scn.probe(model))
    rows: list[dict[str, Any]] = []
    ref = None
    try:
        for variant in variants:
            rerun = variant.kind == RERUN
            try:
                row, latent = measure_denoise(
                    scn,
                    model,
                    inputs,
                    variant,
                    steps,
                    repeats=1 if rerun else repeats,
                    warmup=0 if rerun else warmup,
                    counter=counter,
                )
            except Exception as err:  # noqa: BLE001  (one failing variant must not lose the others' measurements)
                if not rows:
                    raise
                traceback.print_exc()
                row = dict(
                    name=variant.name, kind=variant.kind, config=variant_config(variant), error=repr(err), notes=[]
                )
            else:
                ref = latent if ref is None else ref
                row.update(latent_fidelity(latent, ref))
                row["speedup"] = rows[0]["median_s"] / row["median_s"] if rows else 1.0
            rows.append(row)
            log(row)
    finally:
        counter.remove()
    return rows


COLUMNS = (
    ("variant", 22),
    ("median s", 9),
    ("speedup", 8),
    ("peak mem", 10),
    ("computed", 9),
    ("reused", 7),
    ("PSNR dB", 8),
    ("rel L1", 9),
)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_row(row: dict[str, Any]) -> str:
    """One table line of a `compare_denoise` row."""
    if "error" in row:
        return f"{row['name'].ljust(COLUMNS[0][1])}  FAILED: {row['error']}"
    if row["identical"] or (row["psnr_db"] is None and row["finite"]):
        psnr = "inf"
    else:
        psnr = "n/a" if row["psnr_db"] is None else f"{row['psnr_db']:.2f}"
    rel = "n/a" if row["rel_l1"] is None else f"{row['rel_l1']:.2e}"
    cells = (
        row["name"],
        f"{row['median_s']:.3f}",
        f"{row['speedup']:.2f}x",
        _gib(row["peak_mem_bytes"]),
        f"{row['computed']}/{row['passes']}",
        str(row["reused"]),
        psnr,
        rel,
    )
    text = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))
    return text + ("  ! " + "; ".join(row["notes"]) if row["notes"] else "")


def table_header() -> str:
    return "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(COLUMNS))


__all__ = [
    "COLUMNS",
    "compare_denoise",
    "diffusers_cache",
    "format_row",
    "measure_denoise",
    "table_header",
    "variant_config",
]
