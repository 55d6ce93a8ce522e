"""`accel demo`: the reference models (accel.zoo.reference), baseline vs each preset, on CPU; or, with
--families/--tiny, every tiny random-weight family (or those named) as before."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from accel.cli._common import (
    TINY_WARNING,
    UsageError,
    add_timing_args,
    check_names,
    check_output,
    out,
    settings,
    split,
)

NAME = "demo"
HELP = "offline CPU demo: the reference models (or the tiny families), baseline vs each preset"
DESCRIPTION = (
    "Offline, on CPU: on the reference models ref-flux (images) and ref-wan (clips), trained here on a toy "
    "shapes domain, run the unpatched baseline and each preset with the same prompt and seed; print passes "
    "computed/reused, attention blocks kept, estimated FLOPs saved, PSNR/SSIM against the baseline, the prompt "
    "score and CPU time, and write the outputs side by side (PNG/GIF) next to the JSON. On the reference VLM "
    "ref-vlm: accuracy on held-out questions about the same domain, visual tokens kept, prefill FLOPs and time. "
    "With --families or --tiny: the tiny random-weight families instead, as before."
)
EPILOG = """\
examples:
  accel demo                                              ref-flux, ref-wan and ref-vlm, every preset
  accel demo --prompt "a green ring on a beige background" --steps 10
  accel demo --video-prompt "a white cross on a gray background moving up" --models ref-wan
  accel demo --tiny                                       every tiny random-weight family
  accel demo --families flux,wan --presets fast"""
REFERENCE_ONLY = ("--models", "--prompt", "--video-prompt")
VLM = "ref-vlm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from accel.presets import PRESET_NAMES

    p.add_argument("--models", help=f"comma-separated reference models (default: {','.join(_model_names())})")
    p.add_argument(
        "--prompt",
        help="ref-flux's prompt: 'a {colour} {shape} on a {background} background' "
        "(default: 'a red circle on a navy background')",
    )
    p.add_argument(
        "--video-prompt",
        help="ref-wan's prompt: the same plus ' moving {left|right|up|down}' "
        "(default: 'a yellow square on a black background moving right')",
    )
    p.add_argument("--families", help="the tiny random-weight families instead, comma-separated (as before)")
    p.add_argument("--tiny", action="store_true", help="every tiny random-weight family instead")
    p.add_argument("--presets", default=",".join(PRESET_NAMES), help="comma-separated presets (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (VLMs: new tokens); default per model")
    p.add_argument("--json", default="accel-demo.json", help="where to write the results (default: %(default)s)")
    add_timing_args(p, repeats=1, warmup=1)


def run(args) -> int:
    if args.families or args.tiny:
        given = [o for o in REFERENCE_ONLY if getattr(args, o[2:].replace("-", "_")) is not None]
        if given:
            them = "it" if len(given) == 1 else "them"
            raise UsageError(f"--families/--tiny run the tiny families, which take no {', '.join(given)}; drop {them}")
        return _run_tiny(args)
    return _run_reference(args)


def _check_prompt(option: str, text: str, video: bool) -> str:
    from accel.errors import AccelError
    from accel.zoo.shapes import parse_prompt

    try:
        motion = parse_prompt(text)["motion"]
    except AccelError as err:
        raise UsageError(f"{option}: {err}") from None
    if video and motion is None:
        raise UsageError(f"{option} {text!r}: ref-wan makes clips; append ' moving left|right|up|down'")
    if not video and motion is not None:
        raise UsageError(f"{option} {text!r}: ref-flux makes still images; drop ' moving {motion}'")
    return text


def _model_names() -> tuple[str, ...]:
    from accel.zoo import reference, reference_vlm

    return (*reference.NAMES, reference_vlm.NAME)


def _prompts(args, models: list[str]) -> dict[str, str]:
    from accel.bench.reference_demo import PROMPTS

    flux = _check_prompt("--prompt", args.prompt or PROMPTS["ref-flux"], video=False)
    wan = _check_prompt("--video-prompt", args.video_prompt or PROMPTS["ref-wan"], video=True)
    return {m: {"ref-flux": flux, "ref-wan": wan}[m] for m in models if m in PROMPTS}


def gallery_path(json_path: str, model: str, kind: str) -> Path:
    """accel-demo.json -> accel-demo-ref-flux.png (images) / accel-demo-ref-wan.gif (clips), same folder."""
    path = Path(json_path)
    return path.with_name(f"{path.stem}-{model}.{'gif' if kind == 'video' else 'png'}")


def _write_gallery(json_path: str, result: dict) -> str:
    from accel.bench.gallery import write_clip_row, write_image_row

    rows = {row.variant: row for row in result["rows"]}
    labels = []
    for variant in result["outputs"]:
        row = rows[variant]
        passes = row.passes_computed + row.passes_reused
        labels.append(f"{variant} {row.passes_computed}/{passes} passes" if variant != "baseline" else variant)
    samples = [output[0] for output in result["outputs"].values()]  # first (only) sample of each
    path = gallery_path(json_path, result["model"], result["kind"])
    write = write_clip_row if result["kind"] == "video" else write_image_row
    return str(write(path, samples, labels))


def _run_reference(args) -> int:
    from tqdm.auto import tqdm

    from accel.bench.host import write_json
    from accel.bench.reference_demo import build, run_reference
    from accel.bench.tables import REFERENCE_LEGEND, reference_doc, reference_table_header, reference_table_lines
    from accel.presets import PRESET_NAMES
    from accel.zoo.reference import path

    models, presets = split(args.models) or list(_model_names()), split(args.presets)
    check_names("reference model", models, _model_names())
    vlm = VLM in models
    models = [m for m in models if m != VLM]
    check_names("preset", presets, PRESET_NAMES)
    prompts = _prompts(args, models)
    check_output("--json", args.json)
    out(
        f"baseline vs {', '.join(presets)} on {', '.join(models)}, same prompt and seed, CPU, "
        f"{args.repeats} timed run(s) after {args.warmup} warm-up run(s) each\n"
    )
    start, results, galleries = time.perf_counter(), [], {}
    pipes = {model: build(model, seed=args.seed) for model in models}
    for model, (_, trained) in pipes.items():
        if not trained:
            out(
                f"WARNING: no trained weights for {model} at {path(model)}; running it with random weights, so its "
                f"pictures are noise (train them: python -m accel.zoo.train {model})"
            )
    for line in reference_table_header() if models else []:
        out(line)
    bar = tqdm(
        total=(len(models) + vlm) * (1 + len(presets)),
        desc="accel demo",
        unit="run",
        disable=True if args.quiet else None,
    )
    try:
        for model, (pipe, trained) in pipes.items():
            bar.set_postfix_str(model)
            result = run_reference(
                model, pipe, prompts[model], presets, steps=args.steps, seed=args.seed, repeats=args.repeats,
                warmup=args.warmup, trained=trained, on_run=lambda _: bar.update(),
            )  # fmt: skip
            results.append(result)
            galleries[model] = _write_gallery(args.json, result)
            for line in reference_table_lines(result):
                out(line)
        if models:  # the legend belongs to the diffusion table, before the VLM's
            out("\n" + REFERENCE_LEGEND)
        vlm_result = _run_vlm(args, presets, bar) if vlm else None
    finally:
        bar.close()
    out("")
    for model, prompt in prompts.items():
        out(f"{model} ({prompt!r}): {galleries[model]}")
    total = time.perf_counter() - start
    doc = reference_doc(NAME, settings(args), results, total, galleries)
    if vlm_result is not None:
        doc["vlm"] = vlm_result
    write_json(args.json, doc)
    out(f"\ntotal {total:.1f} s; JSON written to {args.json}")
    return 0


def _run_vlm(args, presets: list[str], bar) -> dict:
    from accel.bench.vlm_demo import run_vlm_demo, table_lines

    bar.set_postfix_str(VLM)
    result = run_vlm_demo(presets, seed=args.seed, repeats=args.repeats, on_run=lambda _: bar.update())
    if result["weights"] != "trained":
        out(f"WARNING: no trained weights for {VLM}; its answers are guesses (train: python -m accel.zoo.train_vlm)")
    for line in table_lines(result):
        out(line)
    return result


def _run_tiny(args) -> int:
    from tqdm.auto import tqdm

    from accel import zoo
    from accel.bench.family import bench_family
    from accel.bench.host import write_json
    from accel.bench.tables import results_doc, table_header, table_lines
    from accel.presets import PRESET_NAMES

    families = split(args.families) or list(zoo.FAMILIES)
    presets = split(args.presets)
    check_names("family", families, zoo.FAMILIES)
    check_names("preset", presets, PRESET_NAMES)
    check_output("--json", args.json)
    out(TINY_WARNING)
    out(
        f"baseline vs {', '.join(presets)} on {len(families)} tiny families, CPU, "
        f"{args.repeats} timed run(s) after {args.warmup} warm-up run(s) each\n"
    )
    for line in table_header():
        out(line)
    start = time.perf_counter()
    results = []
    for family in tqdm(families, desc="accel demo", unit="family", disable=True if args.quiet else None):
        result = bench_family(
            family,
            presets,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            progress=not args.quiet,
        )
        results.append(result)
        for line in table_lines(result):
            out(line)
    total = time.perf_counter() - start
    write_json(args.json, results_doc(NAME, settings(args), results, total, "cpu", tiny=True))
    out(f"\ntotal {total:.1f} s; JSON written to {args.json}")
    return 0
