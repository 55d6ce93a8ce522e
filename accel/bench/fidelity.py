"""The fidelity benchmark of issue 12: accel's caches and sparse attention against the other caches, on the same
reference model, the same prompts and seeds, in one run (`accel bench --suite fidelity`, `benchmarks/fidelity.py`).

    result = run_fidelity(models=("ref-flux", "ref-wan"), seeds=4)
    print(markdown(result))
    plot(result, "benchmarks/fidelity.png")

For each model (`accel.zoo.reference`: the trained weights when they exist, else random weights with a warning),
the prompts are seeded domain prompts (`accel.zoo.shapes.sample_scenes(seeds, seed, video)`), prompt i generated
with seed `seed + i`. The unpatched pipeline runs each once: the reference outputs. Then every method of the ladder
(`accel.bench.fidelity_methods`) is installed, runs every prompt, and is removed. One row per (model, method), plain
JSON values:

    model, weights ("trained" | "random"), method, family, settings, note, status ("ok" | "unsupported: <why>")
    passes                total transformer passes of one generation (steps x CFG branches, counted on the baseline)
    computed              passes computed, mean over the prompts (`computed_per_seed`), counted as the method's
                          `counted_by` says ("probe": the last-block probe; "accel": accel's report)
    attention_computed    attention calls computed, as a share of the baseline's (a `to_q` probe)
    psnr_db               PSNR against the reference outputs from the MSE pooled over the prompts; null = identical
    psnr_db_per_seed      per prompt (null = identical); ssim, ssim_per_seed likewise (mean over the prompts)
    prompt_score          share of outputs with every attribute right (`accel.bench.prompt_score.score`), and
    prompt_score_detail   its per-attribute accuracy
    cpu_s_per_run         wall-clock seconds of one generation on this CPU (says little about GPU speed)
    sparsity              accel sparse attention only: mean share of key blocks skipped (accel's report)
    undo_restores         with check_undo: whether the pipeline's output equals the reference after removal
    notes                 warnings raised, a report/probe disagreement, a rebuild after a failure

A method that raises (at install or in a run) is recorded as unsupported with the error, removed, and the pipeline
rebuilt from the same weights, so a half-installed hook cannot leak into the next method.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from accel.bench import metrics
from accel.bench.fidelity_methods import (
    Method,
    Setup,
    Unsupported,
    all_methods,
    attention_probes,
    last_block_probe,
    select,
)
from accel.bench.prompt_score import score
from accel.errors import ConfigError
from accel.zoo import reference as references
from accel.zoo import shapes

WEIGHTS = ("auto", "trained", "random")
CALIBRATION_SEED = 7919  # MagCache calibrates on a prompt of this seed, not on an evaluation prompt
PLOT_CAP_DB = 60.0  # PSNR above this (or identical outputs) is drawn at the cap
COLUMNS = ("method", "family", "passes computed", "attention", "PSNR dB", "SSIM", "prompt score", "CPU s/run", "notes")


def pipeline_for(name: str, weights: str = "auto") -> tuple[Any, str]:
    """(pipeline, "trained" | "random"): `load(name)` when its weights exist (or `weights="trained"`), else
    `untrained(name)` with a warning that the numbers are on random weights."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    trained = (references.path(name) / "model_index.json").exists()
    if weights == "trained" or (weights == "auto" and trained):
        return references.load(name), "trained"
    if weights == "auto":
        warnings.warn(
            f"{name}: no trained weights at {references.path(name)}; its fidelity numbers are on RANDOM weights "
            f"(train them with `python -m accel.zoo.train {name}`)",
            stacklevel=2,
        )
    return references.untrained(name), "random"


class _Counter:
    """Calls of some modules (forward pre-hooks)."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.n = 0
        self._handles = [m.register_forward_pre_hook(self._hit) for m in modules]

    def _hit(self, module, args) -> None:
        self.n += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Subject:
    """One reference pipeline with its pass and attention probes; `rebuild()` makes it afresh from the weights."""

    def __init__(self, name: str, weights: str, steps: int | None, guidance: float | None):
        self.name, self.ref = name, references.reference(name)
        self.kwargs = self.ref.call_kwargs(steps=steps, guidance=guidance)
        self.pipe, self.weights = pipeline_for(name, weights)
        self._count()

    def _count(self) -> None:
        self.passes = _Counter([last_block_probe(self.pipe.transformer)])
        self.attention = _Counter(attention_probes(self.pipe.transformer))

    def rebuild(self) -> None:
        self.passes.remove()
        self.attention.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-weights warning was given at the first build
            self.pipe, _ = pipeline_for(self.name, self.weights)
        self._count()

    def generate(self, text: str, seed: int) -> tuple[torch.Tensor, int, int]:
        """(output [1, 3, H, W] or [1, F, 3, H, W] in [0, 1] on the CPU, passes computed, attention calls)."""
        self.passes.n = self.attention.n = 0
        out = self.pipe(text, generator=torch.Generator().manual_seed(seed), **self.kwargs)
        pixels = out.images if self.ref.kind == "image" else out.frames
        return pixels.detach().float().cpu(), self.passes.n, self.attention.n


def _reason(err: BaseException) -> str:
    if isinstance(err, Unsupported):
        return str(err)
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _warning_notes(caught: list) -> list[str]:
    seen: list[str] = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        text = str(w.message).strip().splitlines()[0]
        text = text if len(text) <= 160 else text[:159] + "…"
        if text not in seen:
            seen.append(text)
    return seen[:3]


def _accel_count(pipe, probed: int, row: dict) -> int:
    """Passes computed by accel's report (the probe's count without a cache), its sparsity, and a note when the
    report and the probe disagree."""
    import accel

    stats = accel.get_handle(pipe).report().stats
    if "sparse" in stats and stats["sparse"]["mean_sparsity"] is not None:
        row.setdefault("sparsity_per_seed", []).append(stats["sparse"]["mean_sparsity"])
    calls = stats.get("cache", {}).get("calls")
    if not calls:
        return probed
    computed = calls[-1]["computed"]
    if computed != probed:
        row["notes"].append(f"accel report says {computed} computed, the last-block probe counted {probed}")
    return computed


def _run_method(method: Method, subject: _Subject, prompts, seeds, setup: Setup, bar, row: dict) -> list:
    """The method's outputs for every prompt (row filled with the counts and times), removed again at the end."""
    outputs = []
    undo = method.apply(subject.pipe, setup)
    try:
        for text, seed in zip(prompts, seeds):
            start = time.perf_counter()
            out, probed, attention = subject.generate(text, seed)
            row["cpu_s_per_seed"].append(time.perf_counter() - start)
            counted = _accel_count(subject.pipe, probed, row) if method.counted_by == "accel" else probed
            row["computed_per_seed"].append(counted)
            row["attention_per_seed"].append(attention)
            outputs.append(out)
            bar.update(1)
    finally:
        undo()
    return outputs


def _fidelity(row: dict, outputs: list, reference: list, prompts: list, base_attention: int) -> None:
    psnrs = [metrics.psnr(o, r) for o, r in zip(outputs, reference)]
    mse = sum(0.0 if math.isinf(p) else 10 ** (-p / 10) for p in psnrs) / len(psnrs)
    scored = score([o[0] for o in outputs], prompts)
    n = len(outputs)
    row.update(
        computed=sum(row["computed_per_seed"]) / n,
        attention_computed=sum(row["attention_per_seed"]) / n / base_attention if base_attention else None,
        psnr_db=None if mse == 0 else 10 * math.log10(1 / mse),
        psnr_db_per_seed=[None if math.isinf(p) else p for p in psnrs],
        ssim_per_seed=[metrics.ssim(o, r) for o, r in zip(outputs, reference)],
        prompt_score=scored["overall"],
        prompt_score_detail={k: scored[k] for k in ("colour", "shape", "background", "motion")},
        cpu_s_per_run=sum(row["cpu_s_per_seed"]) / n,
    )
    row["ssim"] = sum(row["ssim_per_seed"]) / n
    if "sparsity_per_seed" in row:
        row["sparsity"] = sum(row["sparsity_per_seed"]) / len(row["sparsity_per_seed"])


def _measure(method: Method, subject: _Subject, work: dict, bar, check_undo: bool) -> dict:
    """One row: the method over every prompt, or why it could not run."""
    row: dict[str, Any] = dict(
        model=subject.name,
        weights=subject.weights,
        method=method.name,
        family=method.family,
        settings=method.settings,
        note=method.note,
        counted_by=method.counted_by,
        status="ok",
        passes=work["passes"],
        computed_per_seed=[],
        attention_per_seed=[],
        cpu_s_per_seed=[],
        notes=[],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outputs = _run_method(method, subject, work["prompts"], work["seeds"], work["setup"], bar, row)
        except Exception as err:  # noqa: BLE001  (an unsupported method is a row, not the end of the run)
            row["status"] = f"unsupported: {_reason(err)}"
            bar.update(len(work["seeds"]) - len(row["computed_per_seed"]))
            subject.rebuild()
            row["notes"].append("pipeline rebuilt from its weights after the failure")
            return row
        row["notes"] += _warning_notes(caught)
    _fidelity(row, outputs, work["reference"], work["prompts"], work["base_attention"])
    if check_undo:
        out, _, _ = subject.generate(work["prompts"][0], work["seeds"][0])
        row["undo_restores"] = bool(torch.equal(out, work["reference"][0]))
    return row


def _model_rows(name: str, chosen: list[Method], opts: dict, bar) -> list[dict]:
    subject = _Subject(name, opts["weights"], opts["steps"], opts["guidance"])
    video = subject.ref.kind == "video"
    prompts = [shapes.prompt(s) for s in shapes.sample_scenes(opts["seeds"], opts["seed"], video=video)]
    seeds = [opts["seed"] + i for i in range(len(prompts))]
    reference, passes, attention = [], set(), set()
    bar.set_description(f"{name} reference")
    for text, seed in zip(prompts, seeds):
        out, probed, attn = subject.generate(text, seed)
        reference.append(out)
        passes.add(probed)
        attention.add(attn)
    if len(passes) != 1 or len(attention) != 1:
        raise RuntimeError(f"{name}: the unpatched pipeline computed {passes} passes / {attention} attention calls")
    calibration = shapes.prompt(shapes.sample_scenes(1, CALIBRATION_SEED, video=video)[0])
    setup = Setup(
        steps=subject.kwargs["num_inference_steps"],
        guidance=subject.kwargs.get("guidance_scale", subject.kwargs.get("true_cfg_scale")),
        calibrate=lambda: subject.generate(calibration, CALIBRATION_SEED),
    )
    work = dict(
        prompts=prompts,
        seeds=seeds,
        reference=reference,
        passes=passes.pop(),
        base_attention=attention.pop(),
        setup=setup,
    )
    rows = []
    for method in chosen:
        bar.set_description(f"{name} {method.name}")
        rows.append(_measure(method, subject, work, bar, opts["check_undo"]))
    return rows


def run_fidelity(
    models: Sequence[str] = references.NAMES,
    seeds: int = 4,
    steps: int | None = None,
    guidance: float | None = None,
    methods: Sequence[str | Method] | None = None,
    seed: int = 0,
    weights: str = "auto",
    progress: bool = True,
    check_undo: bool = False,
) -> dict:
    """Rows of every (model, method) and the settings they were made with (see the module docstring).

    `methods`: Method objects, or names/families of `fidelity_methods.all_methods()` (all of them when None).
    `steps` / `guidance`: the reference's own (`ref.steps`, `ref.guidance`) when None."""
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    for name in models:
        references.reference(name)  # an unknown name fails before anything runs
    if seeds < 1 or (steps is not None and steps < 1):
        raise ConfigError(f"seeds and steps must be >= 1, got seeds={seeds}, steps={steps}")
    if methods is not None and all(isinstance(m, Method) for m in methods):
        chosen = list(methods)
    else:
        chosen = select(all_methods(), None if methods is None else list(methods))
    opts = dict(seeds=seeds, steps=steps, guidance=guidance, seed=seed, weights=weights, check_undo=check_undo)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # FasterCache's "experimental" notice would break up the bar
    rows: list[dict] = []
    try:
        with tqdm(total=len(models) * len(chosen) * seeds, disable=not progress, unit="gen") as bar:
            for name in models:
                rows += _model_rows(name, chosen, opts, bar)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    settings = dict(models=list(models), **{k: v for k, v in opts.items() if k != "check_undo"})
    return dict(suite="fidelity", settings=settings, rows=rows)


def _cell_psnr(row: dict) -> str:
    return "inf" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"


def _cells(row: dict) -> list[str]:
    notes = "; ".join(([row["note"]] if row["note"] else []) + row["notes"])
    if row["status"] != "ok":
        return [row["method"], row["family"], row["status"], "", "", "", "", "", notes]
    share = row["computed"] / row["passes"]
    extra = f", sparsity {row['sparsity']:.0%}" if "sparsity" in row else ""
    attention = "n/a" if row["attention_computed"] is None else f"{row['attention_computed']:.0%}{extra}"
    if row.get("undo_restores") is False:
        notes = "; ".join(filter(None, [notes, "output after removal differs from the baseline"]))
    return [
        row["method"],
        row["family"],
        f"{row['computed']:.1f}/{row['passes']} ({share:.0%})",
        attention,
        _cell_psnr(row),
        f"{row['ssim']:.3f}",
        f"{row['prompt_score']:.0%}",
        f"{row['cpu_s_per_run']:.2f}",
        notes.replace("|", "/"),
    ]


def markdown(result: dict) -> str:
    """The rows as one markdown table per model, with what they were measured on."""
    s = result["settings"]
    lines = []
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        first = rows[0]
        weights = "trained weights" if first["weights"] == "trained" else "RANDOM weights (no trained weights found)"
        lines += [
            f"**{model}**, {weights}: {first['passes']} transformer passes per generation, {s['seeds']} seeded "
            f"prompts (seed {s['seed']}). PSNR/SSIM against the unpatched output of the same prompt and seed; "
            "prompt score: share of outputs with every attribute right; CPU s/run: wall-clock seconds on this CPU.",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
        ]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """PSNR against the share of passes computed, one line per family and one panel per model, as a PNG.
    Needs matplotlib (ImportError, with how to get it, when it is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the fidelity plot needs matplotlib: pip install matplotlib") from None
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in result["rows"] if r["model"] == model and r["status"] == "ok" and r["family"] != "baseline"]
        colours = plt.get_cmap("tab20").colors  # more families than the default cycle's 10 colours
        for i, family in enumerate(dict.fromkeys(r["family"] for r in rows)):
            points = sorted(
                (r["computed"] / r["passes"], PLOT_CAP_DB if r["psnr_db"] is None else min(PLOT_CAP_DB, r["psnr_db"]))
                for r in rows
                if r["family"] == family
            )
            ours = family.startswith("accel")
            style = dict(ls="-", lw=2, marker="s") if ours else dict(ls="--", lw=1, marker="o")
            ax.plot(*zip(*points), color=colours[i % len(colours)], label=family, **style)
        weights = rows[0]["weights"] if rows else "?"
        ax.set(
            title=f"{model} ({weights} weights)",
            xlabel="share of transformer passes computed",
            ylabel=f"PSNR vs baseline, dB (capped at {PLOT_CAP_DB:g})",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _peer(row: dict) -> bool:
    return row["status"] == "ok" and not row["family"].startswith(("accel", "baseline"))


def comparison(result: dict) -> list[str]:
    """One line per accel cache row: its PSNR against the best peer's among the peer rows computing no more passes
    (the issue's "at equal passes computed" check), and the check of `balanced` (at most 60% of the passes, at
    least 30 dB, prompt score within 2 points of the baseline's)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        base = next((r for r in rows if r["family"] == "baseline" and r["status"] == "ok"), None)
        for row in rows:
            if row["status"] != "ok" or row["family"] not in ("accel preset", "accel threshold", "accel target"):
                continue
            peers = [p for p in rows if _peer(p) and p["computed"] <= row["computed"]]
            best = max(peers, key=lambda p: math.inf if p["psnr_db"] is None else p["psnr_db"], default=None)
            versus = (
                "no peer computes as few passes" if best is None else f"best peer {best['method']} {_cell_psnr(best)}"
            )
            lines.append(
                f"{model} {row['method']}: {row['computed']:.1f}/{row['passes']} at {_cell_psnr(row)} dB; {versus}"
            )
            if row["method"] == "accel balanced" and base is not None:
                ok = row["computed"] <= 0.6 * row["passes"] and (row["psnr_db"] is None or row["psnr_db"] >= 30)
                ok = ok and abs(row["prompt_score"] - base["prompt_score"]) <= 0.02
                lines.append(
                    f"{model} balanced target (<=60% passes, >=30 dB, prompt score +-2 points): {'met' if ok else 'NOT met'}"
                )
    return lines
