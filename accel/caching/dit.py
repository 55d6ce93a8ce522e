"""Step caching for diffusion transformers: first-block signal, Taylor forecast of the output or the tail residual.

Hooks (through diffusers' hook registry, all removable), besides the denoiser call hook every cache has
(`accel.caching.base`):
- on the head blocks: after the last head block, asks the controller whether to reuse;
- on the tail blocks: on a reused step each tail block hands its inputs through unchanged;
- `forecast="output"`: on a computed step the denoiser call hook records the denoiser's output, on a reused
  step it returns the forecast output instead (what the cheap output layers made of the unchanged hidden
  state is discarded);
- `forecast="residual"`: on a computed step the last tail block records its residual over the head's output, on
  a reused step it returns head output + forecast residual.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .. import _hooks
from ..pipelines.base import BlockIO, DiTAdapter
from .base import CannotCache, StepCache
from .config import CacheConfig
from .controller import CacheController


def _split(io: BlockIO, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if io.hidden_index is None:
        return output, None
    encoder = output[io.encoder_index] if io.encoder_index is not None else None
    return output[io.hidden_index], encoder


def _pack(io: BlockIO, hidden: torch.Tensor, encoder: torch.Tensor | None, template: Any = None):
    if io.hidden_index is None:
        return hidden
    out = list(template) if template is not None else [None] * io.num_outputs
    out[io.hidden_index] = hidden
    if io.encoder_index is not None:
        out[io.encoder_index] = encoder
    return tuple(out)


class _Shared:
    """What the head and tail hooks of one model pass each other within a step."""

    def __init__(self, controller: CacheController):
        self.controller = controller
        self.head_in: torch.Tensor | None = None
        self.head_out: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.last_output_template: Any = None


class HeadHook(ModelHook):
    def __init__(self, shared: _Shared, io: BlockIO, start: bool, end: bool):
        super().__init__()
        self.shared, self.io, self.start, self.end = shared, io, start, end

    def new_forward(self, module: nn.Module, *args, **kwargs):
        shared = self.shared
        if not shared.controller.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.start:
            shared.head_in = _hooks.get_arg(module, "hidden_states", args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.end:
            hidden, encoder = _split(self.io, output)
            shared.head_out = (hidden, encoder)
            # The head's residual is what moves when the step matters; the raw hidden state also
            # carries the slowly varying input.
            shared.controller.decide((hidden - shared.head_in,))
        return output


class TailHook(ModelHook):
    def __init__(self, shared: _Shared, io: BlockIO, last: bool, forecast_residual: bool):
        super().__init__()
        self.shared, self.io = shared, io
        self.last = last and forecast_residual  # the block that stores and returns the forecast residual

    def new_forward(self, module: nn.Module, *args, **kwargs):
        shared = self.shared
        controller = shared.controller
        if not controller.reusing:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.last and controller.active:
                hidden, encoder = _split(self.io, output)
                head_hidden, head_encoder = shared.head_out
                residuals = (
                    hidden - head_hidden,
                    encoder - head_encoder if encoder is not None and head_encoder is not None else None,
                )
                controller.store(residuals, reference=(hidden, encoder))
                shared.last_output_template = output if self.io.hidden_index is not None else None
            return output
        if not self.last:
            hidden = _hooks.get_arg(module, "hidden_states", args, kwargs)
            encoder = _hooks.get_arg(module, "encoder_hidden_states", args, kwargs)
            return _pack(self.io, hidden, encoder)
        head_hidden, head_encoder = shared.head_out
        res_hidden, res_encoder = controller.cached()
        hidden = head_hidden + res_hidden
        encoder = head_encoder + res_encoder if res_encoder is not None and head_encoder is not None else None
        return _pack(self.io, hidden, encoder, shared.last_output_template)


def forecast_output(controller: CacheController, output: Any) -> Any:
    """The denoiser's output as the scheduler gets it: stored on a computed step, forecast on a reused one.
    Handles a tuple (``return_dict=False``, what pipelines pass) and an output object with ``sample``."""
    if not controller.active:
        return output
    sample = output[0] if isinstance(output, tuple) else output.sample
    if controller.reusing:
        (sample,) = controller.cached()
        if isinstance(output, tuple):
            return (sample, *output[1:])
        output.sample = sample
        return output
    controller.store((sample.detach(),), reference=(sample,))
    return output


class DiTCache(StepCache):
    """First-block cache on one diffusion transformer."""

    def __init__(self, adapter: DiTAdapter, config: CacheConfig, steps_hint):
        self.blocks = adapter.blocks()
        if config.head_blocks >= len(self.blocks):
            raise CannotCache(
                f"CacheConfig.head_blocks={config.head_blocks} leaves no blocks to cache: "
                f"{type(adapter.model).__name__} has {len(self.blocks)} blocks"
            )
        self.forecasts_output = config.forecast == "output"
        super().__init__(adapter, config, steps_hint)
        if self.forecasts_output:
            self._call_hook.on_output = lambda output: forecast_output(self.controller, output)

    def block_hooks(self) -> list[tuple[nn.Module, ModelHook]]:
        shared = _Shared(self.controller)
        n, last = self.controller.config.head_blocks, len(self.blocks) - 1
        pairs: list[tuple[nn.Module, ModelHook]] = []
        for index, block in enumerate(self.blocks):
            io = self.adapter.block_io(block)
            if index < n:
                hook = HeadHook(shared, io, start=index == 0, end=index == n - 1)
            else:
                hook = TailHook(shared, io, last=index == last, forecast_residual=not self.forecasts_output)
            pairs.append((block, hook))
        return pairs

    def summary(self) -> str:
        head = self.controller.config.head_blocks
        what = "output" if self.forecasts_output else "tail residual"
        return f"first-block cache: {head} of {len(self.blocks)} blocks run every step, {what} forecast"
