"""One tab of the page (Image, Video or VLM): its controls, its outputs, and their events."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from accel.app import views
from accel.app.capabilities import ATTENTION, quant_note
from accel.app.limits import Limits
from accel.app.models import LoadedModel, builtin_names
from accel.app.service import Service
from accel.app.settings import CACHE_MODES, Settings
from accel.errors import AccelError

log = logging.getLogger("accel.app")

TITLES = {"image": "Image", "video": "Video", "vlm": "VLM"}
PROMPTS = {
    "image": "a red circle on a navy background",
    "video": "a yellow square on a black background moving right",
    "vlm": "how many shapes are there ?",
}
ATTENTION_NAMES = {
    "default": "model's own",
    "sdpa": "SDPA",
    "int8": "INT8",
    "flash": "flash-attn",
    "xformers": "xFormers",
}
# Controls that depend on one capability (see accel.app.capabilities).
NEEDS = {"cache": "cache", "cache_value": "cache", "sparse": "sparse", "sparse_target": "sparse"}
NEEDS.update(prune="prune", prune_keep="prune", quant="quant")


@dataclass
class Tab:
    kind: str
    model: Any
    note: Any
    prompt: Any
    uploads: list = field(default_factory=list)  # VLM: image, video
    controls: dict = field(default_factory=dict)  # Settings field -> component
    why: Any = None
    button: Any = None
    shown: list = field(default_factory=list)  # the outputs themselves
    table: Any = None
    summary: Any = None
    report: Any = None
    details: Any = None
    plot: Any = None


def build_tab(kind: str, limits: Limits, choices: list[str], value: str | None, custom: bool) -> Tab:
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            tab = _inputs(kind, limits, choices, value, custom)
            tab.button = gr.Button("Compare", variant="primary")
        with gr.Column(scale=2):
            _outputs(tab)
    return tab


def _inputs(kind: str, limits: Limits, choices: list[str], value: str | None, custom: bool) -> Tab:
    model = gr.Dropdown(
        choices,
        value=value,
        label="model",
        allow_custom_value=custom,
        info="a built-in model" + (", a local folder or a Hub id (from_pretrained)" if custom else ""),
    )
    note = gr.Markdown("Pick a model: loading it shows which accelerators apply to it here.")
    label = "question" if kind == "vlm" else "prompt"
    prompt = gr.Textbox(PROMPTS[kind], label=label, max_lines=3)
    tab = Tab(kind, model, note, prompt)
    if kind == "vlm":
        tab.uploads = [
            gr.Image(type="filepath", sources=["upload"], label="image (optional)"),
            gr.Video(sources=["upload"], label="video (optional)"),
        ]
    c = tab.controls
    from accel.presets import PRESET_NAMES

    c["preset"] = gr.Radio(list(PRESET_NAMES), value="balanced", label="preset")
    with gr.Accordion("accelerators (override the preset)", open=True):
        _accelerator_controls(kind, c)
        tab.why = gr.Markdown()
    with gr.Accordion("run", open=True):
        if kind == "vlm":
            c["new_tokens"] = gr.Slider(1, limits.max_new_tokens, value=16, step=1, label="new tokens")
        else:
            c["steps"] = gr.Slider(0, limits.max_steps, value=0, step=1, label="steps (0: the model's default)")
            c["size"] = gr.Slider(0, limits.max_size, value=0, step=8, label="size in pixels (0: default)")
        if kind == "video":
            c["frames"] = gr.Slider(0, limits.max_frames, value=0, step=1, label="frames (0: default)")
        c["seed"] = gr.Number(0, precision=0, minimum=0, label="seed")
    return tab


def _accelerator_controls(kind: str, c: dict) -> None:
    if kind != "vlm":
        with gr.Row():
            c["cache"] = gr.Radio(list(CACHE_MODES), value="preset", label="step cache")
            c["cache_value"] = gr.Slider(0.0, 6.4, value=Settings.cache_value, step=0.05, label="target or threshold")
    attention = [(ATTENTION_NAMES[k], k) for k in ("default", *ATTENTION)]
    c["attention"] = gr.Dropdown(attention, value="default", label="attention route")
    if kind != "vlm":
        with gr.Row():
            c["sparse"] = gr.Checkbox(False, label="sparse attention")
            c["sparse_target"] = gr.Slider(
                0.5, 1.0, value=Settings.sparse_target, step=0.01, label="attention mass kept"
            )
    else:
        with gr.Row():
            c["prune"] = gr.Checkbox(False, label="fixed pruning budget (else the preset's)")
            c["prune_keep"] = gr.Slider(1, 576, value=64, step=1, label="visual tokens kept")
    c["quant"] = gr.Checkbox(False, label="W4 weights (4-bit)")


def _outputs(tab: Tab) -> None:
    if tab.kind == "image":
        tab.shown = [gr.ImageSlider(type="pil", label="baseline | accelerated (drag the handle)")]
    elif tab.kind == "video":
        with gr.Row():
            tab.shown = [
                gr.Video(label=side, autoplay=True, loop=True, interactive=False, elem_id=f"accel-video-{side}")
                for side in ("baseline", "accelerated")
            ]
    else:
        asked = gr.Image(label="what the model was asked about", interactive=False, height=256)
        with gr.Row():
            tab.shown = [
                asked,
                gr.Textbox(label="baseline answer", lines=3, interactive=False),
                gr.Textbox(label="accelerated answer", lines=3, interactive=False),
            ]
    tab.summary = gr.Markdown()
    tab.table = gr.Dataframe(headers=views.TABLE_HEADERS, interactive=False, label="metrics")
    with gr.Accordion("accel report (handle.report())", open=False):
        tab.report = gr.Code(language=None, label="report")
    with gr.Accordion("all numbers (JSON, as the compare API returns them)", open=False):
        tab.details = gr.JSON()
    y_title = "token agreement" if tab.kind == "vlm" else f"PSNR (dB; identical drawn at {views.PSNR_CAP:g})"
    tab.plot = gr.ScatterPlot(
        x="speedup",
        y="quality",
        color="model",
        x_title="speedup (x)",
        y_title=y_title,
        tooltip="all",
        label="this session's runs: speedup vs quality",
    )


def control_updates(tab: Tab, model: LoadedModel | None, attention: str = "default") -> list:
    """Updates of [note, why, *controls that depend on the model]: unusable ones disabled, the reasons listed
    (a checkbox or radio carries its reason, the slider beside it is only disabled). The attention route stays
    `attention` where the model can use it."""
    if model is None:
        return [gr.update()] * (2 + len(_dependent(tab)))
    caps = model.capabilities
    reasons = []
    updates = [gr.update(value=views.model_note(model))]
    for key in _dependent(tab):
        if key == "attention":
            usable = [k for k in ("default", *ATTENTION) if caps.get(f"attention:{k}") is None]
            reasons += [caps[f"attention:{k}"] for k in ATTENTION if caps.get(f"attention:{k}")]
            value = attention if attention in usable else "default"
            updates.append(gr.update(choices=[(ATTENTION_NAMES[k], k) for k in usable], value=value))
            continue
        reason = caps.get(NEEDS[key])
        main = not key.endswith(("_value", "_target", "_keep"))
        if reason and main:
            reasons.append(reason)
        info = quant_note(model) if key == "quant" else reason if main else None
        updates.append(gr.update(interactive=reason is None, info=info))
    reasons = list(dict.fromkeys(reasons))  # an attention route no model layer takes gives one reason per kernel
    why = "**Not available here:**\n" + "\n".join(f"- {r}" for r in reasons) if reasons else ""
    return [updates[0], gr.update(value=why), *updates[1:]]


def _dependent(tab: Tab) -> list[str]:
    return [key for key in tab.controls if key in NEEDS or key == "attention"]


def dependent_outputs(tab: Tab) -> list:
    """What `control_updates` updates, in its order."""
    return [tab.note, tab.why, *(tab.controls[k] for k in _dependent(tab))]


def wire(tab: Tab, service: Service, history, concurrency: int) -> None:
    """The tab's events: loading a picked model, the comparison, and the controls after it."""
    dependent = dependent_outputs(tab)

    def on_model(name: str):
        try:
            model = service.model(name, tab.kind)
        except AccelError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return control_updates(tab, model)

    def after_compare(name: str, attention: str):
        loaded = name.strip() if isinstance(name, str) else None
        model = service.pool.peek(loaded) if loaded else None
        return control_updates(tab, model, attention)

    inputs = {tab.model, tab.prompt, *tab.uploads, *tab.controls.values(), history}
    outputs = [*tab.shown, tab.summary, tab.table, tab.report, tab.details, tab.plot, history]
    common = dict(concurrency_limit=concurrency, concurrency_id="compare", api_visibility="private")
    tab.model.change(on_model, tab.model, dependent, **common)
    tab.button.click(_on_compare(tab, service, history), inputs, outputs, **common).then(
        after_compare, [tab.model, tab.controls["attention"]], dependent, queue=False, api_visibility="private"
    )


def _on_compare(tab: Tab, service: Service, history):
    def on_compare(data: dict, progress=gr.Progress(track_tqdm=True)):  # noqa: B008  (gradio's convention)
        values = {key: data[component] for key, component in tab.controls.items()}
        uploads = [data[u] for u in tab.uploads] + [None, None]
        progress(0, desc="loading the model")
        try:
            settings = Settings(**values)
            model, result = service.compare(tab.kind, data[tab.model], data[tab.prompt], settings, *uploads[:2])
            shown = _shown(tab, service, model, result)
        except AccelError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:
            log.exception("comparison failed")
            raise gr.Error(f"the comparison failed: {type(err).__name__}: {err}") from None
        runs = [*data[history], views.run_point(result.metrics)]
        report = result.accelerated.report
        return [
            *shown,
            views.summary(result.metrics),
            views.table(result.metrics),
            str(report),
            result.metrics,
            _plot_frame(views.plot_rows(runs, tab.kind)),
            runs,
        ]

    return on_compare


def _shown(tab: Tab, service: Service, model: LoadedModel, result) -> list:
    from accel.app import media

    if tab.kind == "vlm":
        return [result.baseline.output.picture, result.baseline.output.text, result.accelerated.output.text]
    if tab.kind == "image":
        pixels = result.baseline.output.pixels
        scale = media.display_scale(pixels)
        return [(media.to_pil(pixels, scale), media.to_pil(result.accelerated.output.pixels, scale))]
    return list(service.write_outputs(model, result, display=True))


def _plot_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows, columns=["kind", "model", "settings", "speedup", "quality"])


def default_model(kind: str, preload: str | None, preload_kind: str | None) -> str:
    return preload if preload and preload_kind == kind else builtin_names(kind)[0]
