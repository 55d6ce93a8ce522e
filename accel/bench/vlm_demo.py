"""`accel demo` on `ref-vlm`: the unpatched model and each preset, as `accel.patch(vlm, preset=...)` applies it, on
the first questions of the held-out set (three quarters images, a quarter videos): accuracy, visual tokens kept,
prefill FLOPs and CPU prefill time (`accel.bench.pruning_accuracy` measures them the same way for its table)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from accel.bench import pruning_accuracy as pa
from accel.zoo import reference_vlm, scenes_multi

NAME = reference_vlm.NAME
QUESTIONS = 48


def run_vlm_demo(
    presets: Sequence[str],
    questions: int = QUESTIONS,
    seed: int = 0,
    repeats: int = 1,
    on_run: Callable[[str], None] | None = None,
) -> dict:
    """{"model", "weights", "questions", "rows"}: one row for the unpatched model ("baseline") and one per preset."""
    model, processor, kind = pa.load_model("auto", seed)
    n_videos = questions // 4
    held = scenes_multi.held_out(questions - n_videos, n_videos)
    image = next(q for q in held if not q.video)
    rows, baseline = [], None
    for preset in [None, *presets]:
        method = None if preset is None else pa.Method(preset, "preset", {"preset": preset})
        result = pa.evaluate(model, processor, held, method, 1.0, seed=seed, batch_size=16)
        row = pa.result_row(method, 1.0, result, model.config, baseline)
        row["variant"] = "baseline" if preset is None else preset
        row["applied"] = "-" if preset is None else ", ".join(row["applied"]) or "nothing"
        row["prefill_ms_image"] = round(pa.prefill_ms(model, processor, image, method, 1.0, repeats, seed), 2)
        baseline = baseline or row
        rows.append(row)
        if on_run is not None:
            on_run(row["variant"])
    return {"model": NAME, "weights": kind, "questions": len(held), "rows": rows}


def table_lines(result: dict) -> list[str]:
    """The demo's VLM table: one line per variant."""
    lines = [
        f"\n{NAME} ({result['weights']} weights), {result['questions']} held-out questions:",
        f"{'variant':<10} {'applied':<14} {'accuracy':>8} {'of base':>8} {'tokens/img':>10} {'tokens/vid':>10} "
        f"{'GFLOPs/img':>10} {'prefill ms':>10}",
    ]
    for r in result["rows"]:
        share = f"{r['share_of_keep_all']:.1%}" if "share_of_keep_all" in r else "-"  # none when base is 0
        lines.append(
            f"{r['variant']:<10} {r['applied']:<14} {r['accuracy']:>8.1%} {share:>8} "
            f"{r.get('tokens_kept_per_image', 0):>10.0f} {r.get('tokens_kept_per_video', 0):>10.0f} "
            f"{r.get('prefill_gflops_image', 0):>10.3f} {r['prefill_ms_image']:>10.1f}"
        )
    return lines
