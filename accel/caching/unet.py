"""Step caching for UNets (SD1.5, SDXL), DeepCache-style.

Every step runs conv_in, the shallowest down block (whose output change is the signal) and the last
up block. On a reused step the deep branch (deeper down blocks, mid block, all up blocks but the last)
is not run: the deeper down blocks and the mid block hand back their last outputs (their values are
not used by anything that runs), and the second-to-last up block returns its forecast output, the
deep feature the last up block combines with the fresh shallow skip connections.
"""

from __future__ import annotations

from diffusers.hooks import ModelHook
from torch import nn

from .. import _hooks
from ..pipelines.base import UNetAdapter
from .config import CacheConfig
from .controller import CacheController
from .dit import HOOK, CannotCache, DenoiserCallHook


class ShallowHook(ModelHook):
    def __init__(self, controller: CacheController):
        super().__init__()
        self.controller = controller

    def new_forward(self, module: nn.Module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.controller.active:
            self.controller.decide((output[0],))
        return output


class SkippedHook(ModelHook):
    """A deep block whose output nothing fresh reads on reused steps."""

    def __init__(self, controller: CacheController, key: int):
        super().__init__()
        self.controller, self.key = controller, key

    def new_forward(self, module: nn.Module, *args, **kwargs):
        controller = self.controller
        if controller.reusing:
            return controller.extras[self.key]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if controller.active:
            controller.extras[self.key] = output
        return output


class DeepFeatureHook(ModelHook):
    """The second-to-last up block: its output is the cached, forecast deep feature."""

    def __init__(self, controller: CacheController):
        super().__init__()
        self.controller = controller

    def new_forward(self, module: nn.Module, *args, **kwargs):
        controller = self.controller
        if controller.reusing:
            return controller.cached()[0]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if controller.active:
            controller.store((output,), reference=(output,))
        return output


class UNetCache:
    def __init__(self, adapter: UNetAdapter, config: CacheConfig, steps_hint):
        unet = adapter.model
        down, mid, up = adapter.down_blocks(), adapter.mid_block(), adapter.up_blocks()
        if len(down) < 2 or len(up) < 2:
            raise CannotCache(
                f"{type(unet).__name__} has {len(down)} down and {len(up)} up blocks; the UNet cache needs "
                "at least 2 of each"
            )
        self.adapter = adapter
        self.controller = CacheController(config)
        self.call_hook = DenoiserCallHook(self.controller, steps_hint)
        skipped = [*down[1:], *([mid] if mid is not None else []), *up[:-2]]
        self.hooks = _hooks.HookSet(unet, HOOK, [
            (unet, self.call_hook),
            (down[0], ShallowHook(self.controller)),
            *[(block, SkippedHook(self.controller, key)) for key, block in enumerate(skipped)],
            (up[-2], DeepFeatureHook(self.controller)),
        ])
        self.num_skipped = len(skipped) + 1

    def describe(self) -> str:
        cfg = self.controller.config
        mode = f"target={cfg.target}" if cfg.target is not None else f"threshold={cfg.threshold}"
        return (
            f"deep-feature cache (DeepCache-style): {self.num_skipped} deep blocks reusable, {mode}, "
            f"taylor_order={cfg.taylor_order}, max_consecutive={cfg.max_consecutive}, decision={cfg.decision}"
        )
