"""Text tables and the JSON document of the side-by-side comparisons (`accel demo`, `accel bench`,
`accel bench-vlm`): what the `accel` command prints and writes, usable from Python too.

    result = bench_family("flux", ["fast"], steps=4, repeats=1, warmup=0)    # accel.bench.family
    print("\\n".join(table_header() + table_lines(result)))
    write_json("flux.json", results_doc("bench", settings, [result], total_s, "cpu", tiny=True))

A *result* is one target's comparison: {"family", "model", "kind", "steps", "rows"}, its rows `harness.Row`s
or `vlm.VLMRow`s. The reference models' comparison (`accel demo`, accel.bench.reference_demo) has its own table,
device-independent columns first:

    result = run_reference("ref-flux", pipe, prompt, ["fast"], steps=8)
    print("\\n".join(reference_table_header() + reference_table_lines(result) + [REFERENCE_LEGEND]))
    write_json("demo.json", reference_doc("demo", settings, [result], total_s, {"ref-flux": "demo-ref-flux.png"}))
"""

from __future__ import annotations

import math
from typing import Any

from accel.bench.measure import format_bytes

TINY_NOTE = (
    "Tiny random-weight models: fidelity numbers measure closeness to the unaccelerated output of the same model "
    "and seed, not quality; timings of tiny models on CPU say little about real speed (see benchmarks/)."
)

COLUMNS = (
    ("family", 15),
    ("variant", 9),
    ("time", 8),
    ("speedup", 7),
    ("comp/reuse", 10),
    ("fidelity vs baseline", 26),
)
VLM_COLUMNS = (
    ("variant", 10),
    ("visual kept/in", 14),
    ("seq to LM", 9),
    ("prefill", 9),
    ("speedup", 7),
    ("TTFT", 9),
    ("decode", 12),
    ("peak memory", 20),
    ("first-token KL", 14),
    ("agreement", 9),
)


# Device-independent columns first (passes, attention blocks, FLOPs), then quality, then what this CPU took.
REFERENCE_COLUMNS = (
    ("model", 8),
    ("variant", 9),
    ("passes comp/reuse", 17),
    ("attn kept", 9),
    ("FLOPs saved", 11),
    ("PSNR dB", 7),
    ("SSIM", 5),
    ("prompt", 6),
    ("CPU s", 7),
    ("CPU x", 5),
)
REFERENCE_LEGEND = (
    "passes: transformer passes computed/reused (CFG branches summed); attn kept: attention key blocks computed "
    "in sparse calls ('-': no sparse attention); FLOPs saved: estimated share of the baseline's transformer "
    "FLOPs (accel.bench.reference_demo); PSNR/SSIM: against the baseline's output; prompt: share of the prompt's "
    "attributes read right (accel.bench.prompt_score); CPU s: median wall-clock seconds on this CPU, CPU x: "
    "speed-up on it (tiny models: timings say little)."
)
UNTRAINED_NOTE = (
    "Random weights (no trained weights in the package) for: {models}. Their outputs are noise: PSNR/SSIM only "
    "measure closeness to the same model's unaccelerated output and the prompt score is chance."
)


def _fidelity(row) -> str:
    if row.token_agreement is not None:
        return f"tokens {row.token_agreement:.0%}  KL {row.first_token_kl:.2g}"
    if row.psnr is None:
        return "-"
    psnr = "inf" if math.isinf(row.psnr) else f"{row.psnr:.1f}"
    text = f"PSNR {psnr} dB  SSIM {row.ssim:.3f}"
    return text + (f"  LPIPS {row.lpips:.3f}" if row.lpips is not None else "")


def _applied(row) -> str:
    if row.error:
        return f"ERROR {row.error}"
    if row.report is None:
        return "unpatched reference"
    if row.applied:
        # "cache: first-block cache: 1 of 5 blocks ..." -> "cache (first-block cache)"
        parts = [a.partition(": ") for a in row.applied]
        return ", ".join(f"{name} ({detail.split(':')[0]})" if detail else name for name, _, detail in parts)
    reason = row.skipped[0].split(": ", 1)[1] if row.skipped else ""
    return f"nothing applied ({reason})" if reason else "nothing applied"


def _line(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS)) + "  " + cells[-1]


def table_header() -> list[str]:
    """The heading and rule of the preset table."""
    head = _line([name for name, _ in COLUMNS] + ["applied"])
    return [head, "-" * len(head)]


def table_lines(result: dict) -> list[str]:
    """One line per `harness.Row` of `result`: time, speed-up, computed/reused passes, fidelity, what applied."""
    lines = []
    for row in result["rows"]:
        lines.append(
            _line(
                [
                    result["family"],
                    row.variant,
                    f"{row.median_s:.2f} s" if row.median_s is not None else "-",
                    f"{row.speedup:.2f}x" if row.speedup is not None else "-",
                    f"{row.computed}/{row.reused}" if row.computed is not None else "-",
                    _fidelity(row),
                    _applied(row),
                ]
            )
        )
    return lines


def memory_lines(result: dict) -> list[str]:
    """Per row with a measured peak: the peak memory and every timed run's time."""
    return [
        f"  {row.variant:<9} peak memory {format_bytes(row.peak_memory_bytes)} ({row.memory_kind}), "
        f"times {', '.join(f'{t:.3f}' for t in row.times_s)} s"
        for row in result["rows"]
        if row.peak_memory_bytes is not None
    ]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _db(value: float | None) -> str:
    return "-" if value is None else ("inf" if math.isinf(value) else f"{value:.1f}")


def _reference_line(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, REFERENCE_COLUMNS)) + "  " + cells[-1]


def reference_table_header() -> list[str]:
    """The heading and rule of the reference models' table (`accel demo`)."""
    head = _reference_line([name for name, _ in REFERENCE_COLUMNS] + ["applied"])
    return [head, "-" * len(head)]


def reference_table_lines(result: dict) -> list[str]:
    """One line per `reference_demo.DemoRow` of `result`: passes computed/reused, attention blocks kept,
    estimated FLOPs saved, PSNR, SSIM, prompt score, CPU seconds and speed-up, what was applied."""
    lines = []
    for row in result["rows"]:
        passes = f"{row.passes_computed}/{row.passes_reused}" if row.passes_computed is not None else "-"
        cells = [result["model"], row.variant, passes, _percent(row.attention_blocks_kept)]
        cells += [_percent(row.flops_saved), _db(row.psnr), "-" if row.ssim is None else f"{row.ssim:.3f}"]
        cells += [_percent(row.prompt_score), "-" if row.cpu_s is None else f"{row.cpu_s:.2f}"]
        cells += ["-" if row.cpu_speedup is None else f"{row.cpu_speedup:.2f}", _applied(row)]
        lines.append(_reference_line(cells))
    return lines


def reference_doc(
    command: str, settings: dict, results: list[dict], total_s: float, galleries: dict[str, str]
) -> dict[str, Any]:
    """The JSON of `accel demo` on the reference models: command, `warning` (null when every model is trained),
    `machine`, settings, total time, `models` (per model: model, family, kind, trained, weights, prompt, steps,
    seed, gallery, flop_profile) and one flat row per variant and model (`DemoRow.to_dict()` plus model,
    family, kind, prompt, steps; fields in accel.bench.reference_demo)."""
    from accel.bench.host import environment, to_json

    untrained = [r["model"] for r in results if not r["trained"]]
    keys = ("model", "family", "kind", "prompt", "steps")
    return {
        "command": command,
        "warning": UNTRAINED_NOTE.format(models=", ".join(untrained)) if untrained else None,
        "machine": environment("cpu"),
        "settings": settings,
        "total_time_s": round(total_s, 3),
        "models": [
            {
                **{k: r[k] for k in keys},
                "trained": r["trained"],
                "weights": r["weights"],
                "seed": r["seed"],
                "gallery": galleries.get(r["model"]),
                "flop_profile": to_json(r["profile"]),
            }
            for r in results
        ],
        "rows": [{**{k: r[k] for k in keys}, **row.to_dict()} for r in results for row in r["rows"]],
    }


def vlm_table_lines(rows) -> list[str]:
    """Heading, rule and one line per `vlm.VLMRow`: visual tokens kept, sequence to the language model, prefill,
    speed-up, time to first token, decode speed, peak memory, first-token KL and greedy agreement."""

    def line(cells):
        return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, VLM_COLUMNS))

    head = line([name for name, _ in VLM_COLUMNS])
    out = [head, "-" * len(head)]
    for r in rows:
        kept = f"{r.visual_tokens_kept}/{r.visual_tokens_in}" if r.visual_tokens_kept is not None else "all"
        out.append(
            line(
                [
                    r.variant,
                    kept,
                    str(r.sequence_to_lm),
                    f"{r.prefill_s * 1e3:.1f} ms",
                    f"{r.prefill_speedup:.2f}x",
                    f"{r.ttft_s * 1e3:.1f} ms",
                    f"{r.decode_tokens_per_s:.1f} tok/s" if r.decode_tokens_per_s is not None else "-",
                    f"{format_bytes(r.peak_memory_bytes)} ({r.memory_kind})"
                    if r.peak_memory_bytes is not None
                    else "-",
                    f"{r.first_token_kl:.3g}",
                    f"{r.token_agreement:.0%}",
                ]
            )
        )
    return out


def results_doc(
    command: str, settings: dict, results: list[dict], total_s: float, device: str, tiny: bool
) -> dict[str, Any]:
    """The JSON of a comparison run: command, `warning` (tiny models), `machine` (`host.environment`), settings,
    total time, and one flat row per variant and target, each with its target's family, model, kind, steps."""
    from accel.bench.host import environment

    return {
        "command": command,
        "warning": TINY_NOTE if tiny else None,
        "machine": environment(device),
        "settings": settings,
        "total_time_s": round(total_s, 3),
        "rows": [
            {"family": r["family"], "model": r["model"], "kind": r["kind"], "steps": r["steps"], **row.to_dict()}
            for r in results
            for row in r["rows"]
        ],
    }


__all__ = [
    "REFERENCE_LEGEND",
    "TINY_NOTE",
    "memory_lines",
    "reference_doc",
    "reference_table_header",
    "reference_table_lines",
    "results_doc",
    "table_header",
    "table_lines",
    "vlm_table_lines",
]
