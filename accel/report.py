"""What accel did to a model, and what happened in the calls since: `handle.report()`.

The report knows no accelerator: each installed one writes its statistics under its keyword in `stats`, as
plain JSON values (numbers, strings, lists, dicts with string keys, None) with snake_case keys, and one
generic printer (`str(report)`, `print(handle)`) makes them readable. `Report.to_dict()` is the JSON layout the
app, the ComfyUI nodes and `accel bench` read. It is stable: a key is never renamed or removed, and a new one is
added here first. Below, `<name>` stands for a key that is data (a branch, a layer, a reason); `null` is None.
Counts run from `accel.patch` on unless a key says otherwise.

to_dict(), the top level:

    model            str: class name of the model accel patched (a pipeline's denoiser or VLM, or the model)
    family           str or null: the adapter's model family ("flux", "wan", "llava", ...), null when none fits
    preset           str: the preset `accel.patch` was given
    applied          list, one entry per installed accelerator, in install order:
        accelerator  str: its keyword ("cache", "attention", ...)
        module       str: class name of the model it was installed on
        detail       str: one line on what it does there
    skipped          list, one entry per registered accelerator not installed:
        accelerator  str: its keyword ("all" when accel does not support the model)
        reason       str: why: off (in the preset, or by keyword=False), or not applicable to this model
    warnings         list of str: fallbacks and caveats, each once
    stats            {accelerator: {...}}: each installed accelerator's statistics under its keyword, below;
                     one registered outside accel writes its own

stats["cache"], step caching (`accel.caching`):

    calls                     list: the most recent pipeline calls (at most 100), oldest first; a bare model's
                              call is one denoising loop, found from the timestep; each call:
        num_steps             int or null: denoising steps of the call, when the scheduler or config says
        computed              int: denoiser passes computed, summed over the CFG branches
        reused                int: denoiser passes whose tail was forecast instead of computed
        branches              {branch: {...}}: per CFG branch ("cond", "uncond"; "default" when unnamed)
            <branch>
                computed          list of int: indices of the steps computed
                reused            list of int: indices of the steps reused
                compute_reasons   {reason: int}: why steps were computed ("warm-up", "error budget", ...)
                estimated_error   float: relative error the forecasts are estimated to add, summed over the
                                  reused steps (0 until the forecast is calibrated)

stats["attention"], dense attention routes (`accel.attention`):

    kernel                    str: the dense route asked for (AttentionConfig.kernel): int8, sdpa, flash, xformers
    calls                     {path: int}: calls the route computed, by path: "int8" (Triton kernel),
                              "int8_reference" (its PyTorch reference, on CPU tensors), "sdpa",
                              "sdpa_<backend>" (AttentionConfig.sdpa_backend), "flash", "xformers"
    padded_head_dims          {"<head dim>-><kernel head dim>": int}: int8 calls whose head dim was zero-padded
                              to one the kernel has (also counted in calls)
    sdpa_by_rule              {rule: int}: calls the full-precision policy kept on SDPA (dense_blocks,
                              dense_first_steps, dense_last_steps, dense_roles, min_query_len), by rule
    sdpa_fallback             {reason: int}: calls the route cannot take, run by SDPA exactly as the model
                              asked, by the first failing constraint

stats["sparse"], sparse video attention (`accel.attention.sparse`):

    mean_sparsity             float or null: mean of sparsity_per_layer; null before any sparse call
    sparsity_per_layer        {layer: float}: share of key blocks skipped (0 to 1), mean over heads and sparse
                              calls, by block index (a string)
    sparsity_per_head         {layer: list of float}: the same per head
    sparse_calls              int: calls the block-sparse kernel (or its PyTorch reference) computed
    dense_warmup_steps        int: steps kept dense at the start of the latest pipeline call (dense_fraction)
    dense_warmup_calls        int: calls in such steps, left to the dense route
    searches                  int: pattern searches (one per attention module, CFG branch and search step)
    search_s                  float: seconds spent searching (CUDA event time on a GPU, host time elsewhere)
    head_orders               {order: int}: token orders chosen, one per batch row, head and search
    pattern_bytes_per_module  int or null: bytes of the latest patterns per attention module (CFG branches
                              summed); null before any search
    pattern_bytes_total       int: bytes of the latest patterns of every module and branch
    calls_left_dense          {reason: int}: self/joint attention calls the kernel cannot take, run dense

stats["prune"], visual token pruning (`accel.pruning`):

    calls                     int: prefills with visual tokens the pruning ran on
    visual_tokens_in_total    int: visual tokens those calls had, all rows
    visual_tokens_kept_total  int: visual tokens they kept
    last_call                 null before the first such call, else the latest one:
        visual_tokens_in      list of int: visual tokens per batch row
        visual_tokens_kept    list of int: kept per batch row
        sequence_in           int: sequence length the model was given
        sequence_out          int: sequence length the language model ran on
        video_tokens_merged   int: video tokens folded into the same place of an earlier frame

stats["quant"], W4 weight quantization (`accel.quant`; `QuantResult.stats()` of `accel.quant.quantize`):

    format                    the format asked for (QuantConfig):
        bits                  int: bits per weight code
        group_size            int: input features sharing one scale and offset
        search                bool: scale/offset search on (else round-to-nearest)
        rank                  int: rank of the 16-bit low-rank correction (0: none)
        activations           str: "16bit", or "int8" (per token, where the W4A8 GEMM runs)
    layers_quantized          int: linear layers now 4-bit
    layers_calibrated         int: of those, layers with activation statistics from QuantConfig.calibration
    layers_kept_16bit         {reason: int}: linear layers left in 16-bit, by reason
    layer_bytes_before        int: bytes of the quantized layers before
    layer_bytes_after         int: and after quantization
    model_bytes_before        int: bytes of the model's parameters and buffers before
    model_bytes_after         int: and after quantization
    kernel_path               str: which kernels run the 4-bit layers on this device, and why
    originals_kept            bool: the 16-bit layers are kept (on the CPU) for unpatch; false: one-way
    error                     relative error of each quantized layer:
        measure               str: "output" (on the calibration rows, when calibrated) or "weight"
        mean                  float: mean over layers
        max                   float: the largest
        max_layer             str or null: the layer with the largest
        per_layer             {layer: float}: by layer name
    w4a8_error                null unless activations are int8 and calibrated, else the output error with int8
                              activations, as in error:
        measure               str: "output"
        mean                  float
        max                   float
        max_layer             str or null
        per_layer             {layer: float}
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

WIDTH = 110  # printed lines wrap here
_IDENTIFIER = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


@dataclass
class Applied:
    accelerator: str
    module: str
    detail: str


@dataclass
class Skipped:
    accelerator: str
    reason: str


@dataclass
class Report:
    model: str
    family: str | None
    preset: str
    applied: list[Applied] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # accelerator keyword -> its statistics

    def to_dict(self) -> dict:
        """The report as JSON values, in the layout documented at the top of this module."""
        return {
            "model": self.model,
            "family": self.family,
            "preset": self.preset,
            "applied": [vars(a).copy() for a in self.applied],
            "skipped": [vars(s).copy() for s in self.skipped],
            "warnings": list(self.warnings),
            "stats": copy.deepcopy(self.stats),
        }

    def __str__(self) -> str:
        lines = [f"accel on {self.model} ({self.family or 'unsupported'}), preset {self.preset!r}"]
        for a in self.applied:
            lines.append(f"  applied  {a.accelerator:<9} {a.module}: {a.detail}")
        for s in self.skipped:
            lines.append(f"  skipped  {s.accelerator:<9} {s.reason}")
        if not self.applied:
            lines.append("  nothing applied: the model runs exactly as before")
        for w in self.warnings:
            lines.append(f"  warning  {w}")
        for name, values in self.stats.items():
            lines.append(f"  stats    {name}")
            lines += format_stats(values, "    ")
        return "\n".join(lines)


# -- the printer: any JSON value, no accelerator knowledge ------------------------------------------------


def format_stats(values: dict, indent: str = "") -> list[str]:
    """Readable lines for a dict of JSON values: one line per key, wrapped at WIDTH. A value nested three deep
    or more (a list of records, say) that does not fit on its line is expanded below its key, list entries
    numbered. snake_case keys print as words; a dict with any other key (layer names, reasons) is data and
    prints its keys as they are."""
    lines = []
    names = _key_names(values)
    for key, value in values.items():
        lines += _item(names[key], value, indent)
    return lines


def _item(name: str, value: Any, indent: str) -> list[str]:
    text = f"{name}: {_inline(value)}"
    if len(indent) + len(text) <= WIDTH or _depth(value) < 3:
        return _wrap(text, indent)
    lines = [f"{indent}{name}:"]
    if isinstance(value, dict):
        return lines + format_stats(value, indent + "  ")
    for n, entry in enumerate(value, 1):
        lines += _entry(f"{n}.", entry, indent + "  ")
    return lines


def _entry(label: str, value: Any, indent: str) -> list[str]:
    """A list entry: a dict's plain values on the label's line, its nested ones below."""
    if not isinstance(value, dict):
        return _wrap(f"{label} {_inline(value)}", indent)
    names = _key_names(value)
    plain = {k: v for k, v in value.items() if _depth(v) == 0}
    head = ", ".join(f"{names[k]}: {_inline(v)}" for k, v in plain.items())
    lines = _wrap(f"{label} {head}".rstrip(), indent)
    for key, item in value.items():
        if key not in plain:
            lines += _item(names[key], item, indent + " " * (len(label) + 1))
    return lines


def _key_names(values: dict) -> dict:
    """Printed names of a dict's keys: words for snake_case keys, the keys as they are in a dict of data."""
    readable = all(_IDENTIFIER.fullmatch(str(k)) for k in values)
    return {k: str(k).replace("_", " ") if readable else str(k) for k in values}


def _depth(value: Any) -> int:
    """0 for a plain value, 1 for a list or dict of plain values, and so on."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if items is None:
        return 0
    return 1 + max((_depth(v) for v in items), default=0)


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        names = _key_names(value)
        return "{" + ", ".join(f"{names[k]}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        if value and all(type(v) is int for v in value):
            return "[" + _int_runs(value) + "]"
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _int_runs(values: list[int]) -> str:
    """Runs of three or more consecutive integers as first..last (step indices stay short)."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            run = values[start:i]
            parts += [f"{run[0]}..{run[-1]}"] if len(run) >= 3 else [str(v) for v in run]
            start = i
    return ", ".join(parts)


def _wrap(text: str, indent: str) -> list[str]:
    """`text` in lines of at most WIDTH where it can, broken after a comma (never inside an entry)."""
    lines, line = [], indent
    for piece in re.split(r"(?<=, )", text):
        if line.strip() and len(line) + len(piece.rstrip()) > WIDTH:
            lines.append(line.rstrip())
            line = indent + "    "
        line += piece
    return lines + [line.rstrip()]
