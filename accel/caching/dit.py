"""Step caching for diffusion transformers: first-block signal, cached tail residual with Taylor forecast.

Hooks (through diffusers' hook registry, all removable):
- on the denoiser: marks the start and end of each denoiser call and which CFG branch it is;
- on the head blocks: after the last head block, asks the controller whether to reuse;
- on the tail blocks: on a reused step each tail block hands its inputs through unchanged and the last
  one returns head output + forecast residual; on a computed step the last one records the residual.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .. import _hooks
from ..errors import AccelError
from ..pipelines.base import BlockIO, DiTAdapter
from .config import CacheConfig
from .controller import CacheController

HOOK = "accel_cache"


class CannotCache(AccelError, ValueError):
    """This denoiser has too few blocks for the cache as configured (the message says why)."""


class DenoiserCallHook(_hooks.ContextHook):
    """Brackets each denoiser call for the controller and learns the CFG branch from `cache_context`."""

    def __init__(self, controller: CacheController, steps_hint):
        super().__init__()
        self.controller = controller
        self.steps_hint = steps_hint  # () -> int | None, from the pipeline's scheduler when known
        self.managed = False  # True while a patched pipeline call is running

    def new_forward(self, module: nn.Module, *args, **kwargs):
        ctx = self.cache_context()
        num_steps = getattr(ctx, "num_inference_steps", None) or self.steps_hint()
        self.controller.enter(
            getattr(ctx, "name", None),
            num_steps=num_steps,
            step_index=getattr(ctx, "step_index", None),
            timestep=None if self.managed else _hooks.get_arg(module, "timestep", args, kwargs),
            managed=self.managed,
        )
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.controller.exit()

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.controller.reset()
        return module


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
    def __init__(self, shared: _Shared, io: BlockIO, last: bool):
        super().__init__()
        self.shared, self.io, self.last = shared, io, last

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


class DiTCache:
    """Installs and removes the cache hooks on one diffusion transformer."""

    def __init__(self, adapter: DiTAdapter, config: CacheConfig, steps_hint):
        blocks = adapter.blocks()
        if config.head_blocks >= len(blocks):
            raise CannotCache(
                f"CacheConfig.head_blocks={config.head_blocks} leaves no blocks to cache: "
                f"{type(adapter.model).__name__} has {len(blocks)} blocks"
            )
        self.adapter = adapter
        self.controller = CacheController(config)
        self.call_hook = DenoiserCallHook(self.controller, steps_hint)
        shared = _Shared(self.controller)
        n = config.head_blocks
        pairs: list[tuple[nn.Module, ModelHook]] = [(adapter.model, self.call_hook)]
        for index, block in enumerate(blocks):
            io = adapter.block_io(block)
            if index < n:
                hook = HeadHook(shared, io, start=index == 0, end=index == n - 1)
            else:
                hook = TailHook(shared, io, last=index == len(blocks) - 1)
            pairs.append((block, hook))
        self.hooks = _hooks.HookSet(adapter.model, HOOK, pairs)
        self.num_blocks = len(blocks)

    def describe(self) -> str:
        cfg = self.controller.config
        mode = f"target={cfg.target}" if cfg.target is not None else f"threshold={cfg.threshold}"
        return (
            f"first-block cache: {cfg.head_blocks} of {self.num_blocks} blocks run every step, {mode}, "
            f"taylor_order={cfg.taylor_order}, max_consecutive={cfg.max_consecutive}, decision={cfg.decision}"
        )
