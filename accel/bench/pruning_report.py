"""Tables, plot and files of the pruning accuracy benchmark (`accel.bench.pruning_accuracy`), and the
`accel bench --suite pruning` command that writes them to a folder:

    accel bench --suite pruning --out benchmarks/results/pruning --questions 300

writes `pruning.json` (the result), `pruning.md` (both tables) and `pruning.png` (accuracy vs tokens kept).
"""

from __future__ import annotations

import json
from pathlib import Path

from accel.bench.pruning_accuracy import RATIOS


def _share(ratio: float) -> str:
    return f"{100 * ratio:g}%"


RATIO_HEADER = ("keep-all", *map(_share, RATIOS))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary_table(result: dict) -> list[str]:
    """Accuracy (%) per method and budget; keep-all in its own column; a method of several draws: their mean (range)."""
    rows = [r for r in result["rows"] if r["method"] != "keep-all"]
    keep_all = next(r for r in result["rows"] if r["method"] == "keep-all")
    lines = [
        f"| method | {' | '.join(RATIO_HEADER)} |",
        "|---" * (len(RATIO_HEADER) + 1) + "|",
        f"| keep-all | {_pct(keep_all['accuracy'])} |" + " |" * (len(RATIO_HEADER) - 1),
    ]
    for name in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for ratio in RATIOS:
            row = next((r for r in rows if r["method"] == name and r["keep_ratio"] == ratio), None)
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append("unsupported")
            elif "accuracy_range" in row:  # the mean of several draws, and their range
                low, high = row["accuracy_range"]
                cells.append(f"{_pct(row['accuracy'])} ({_pct(low)}-{_pct(high)})")
            else:
                cells.append(_pct(row["accuracy"]))
        lines.append(f"| {name} | | {' | '.join(cells)} |")
    return lines


DETAIL = (
    ("method", "method"),
    ("keep", "keep_ratio"),
    ("tokens/image", "tokens_kept_per_image"),
    ("tokens/video", "tokens_kept_per_video"),
    ("accuracy %", "accuracy"),
    ("images %", "images"),
    ("videos %", "videos"),
    ("of keep-all", "share_of_keep_all"),
    ("GFLOPs image", "prefill_gflops_image"),
    ("GFLOPs video", "prefill_gflops_video"),
    ("ms image", "prefill_ms_image"),
    ("ms video", "prefill_ms_video"),
)
_PERCENT = {"accuracy", "images", "videos", "share_of_keep_all", "keep_ratio"}


def detail_table(result: dict) -> list[str]:
    """Every row: tokens kept, accuracy, prefill FLOPs and CPU time; unsupported rows say why."""
    lines = [f"| {' | '.join(h for h, _ in DETAIL)} |", "|---" * len(DETAIL) + "|"]
    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(
                f"| {row['method']} | {_pct(row['keep_ratio'])} | {row['status']} |" + " |" * (len(DETAIL) - 3)
            )
            continue
        cells = []
        for _, key in DETAIL:
            value = row.get(key)
            if key == "method":
                cells.append(str(value))
            elif key in _PERCENT:
                cells.append(_pct(value))
            elif isinstance(value, float):
                cells.append(f"{value:.1f}" if key.startswith(("tokens", "prefill_ms")) else f"{value:.3f}")
            else:
                cells.append("-" if value is None else str(value))
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def markdown(result: dict) -> str:
    head = (
        f"{result['model']} ({result['weights']} weights), {result['questions']} held-out questions "
        f"({result['images']} on images of 256 visual tokens, {result['videos']} on videos of 512)"
    )
    return "\n".join([head, "", *summary_table(result), "", *detail_table(result)]) + "\n"


def plot(result: dict, path: str | Path) -> str:
    """Accuracy against the share of visual tokens kept, one line per method, keep-all as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the pruning plot needs matplotlib: pip install matplotlib") from None
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    keep_all = next(r for r in ok if r["method"] == "keep-all")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = plt.get_cmap("tab10").colors
    for i, name in enumerate(dict.fromkeys(r["method"] for r in ok if r["method"] != "keep-all")):
        points = sorted((r["keep_ratio"], 100 * r["accuracy"]) for r in ok if r["method"] == name)
        points.append((1.0, 100 * keep_all["accuracy"]))
        ours = name.startswith("accel")
        style = dict(ls="-", lw=2, marker="s") if ours else dict(ls="--", lw=1.5, marker="o")
        ax.plot(*zip(*points), color=colours[i % len(colours)], label=name, **style)
    ax.axhline(100 * keep_all["accuracy"], color="gray", ls=":", lw=1, label="keep-all")
    ax.set_xscale("log", base=2)
    ticks = sorted({*RATIOS, 1.0})
    ax.set_xticks(ticks, [_share(t) for t in ticks])
    ax.set(
        title=f"{result['model']} ({result['weights']} weights): {result['questions']} held-out questions",
        xlabel="visual tokens kept (256 per image, 512 per video at 100%)",
        ylabel="accuracy %",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write(result: dict, folder: str | Path) -> dict[str, str]:
    """pruning.json, pruning.md and (with matplotlib) pruning.png in `folder`; returns what was written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"json": str(folder / "pruning.json"), "markdown": str(folder / "pruning.md")}
    (folder / "pruning.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "pruning.md").write_text(markdown(result))
    try:
        written["plot"] = plot(result, folder / "pruning.png")
    except ImportError as err:
        written["plot"] = f"none: {err}"
    return written
