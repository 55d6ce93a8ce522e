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

from ..pipelines.base import UNetAdapter
from .base import CannotCache, StepCache
from .config import CacheConfig
from .controller import CacheController


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


class UNetCache(StepCache):
    """DeepCache-style cache on one UNet."""

    def __init__(self, adapter: UNetAdapter, config: CacheConfig, steps_hint):
        self.down, mid, self.up = adapter.down_blocks(), adapter.mid_block(), adapter.up_blocks()
        if len(self.down) < 2 or len(self.up) < 2:
            raise CannotCache(
                f"{type(adapter.model).__name__} has {len(self.down)} down and {len(self.up)} up blocks; the UNet "
                "cache needs at least 2 of each"
            )
        self.skipped = [*self.down[1:], *([mid] if mid is not None else []), *self.up[:-2]]
        super().__init__(adapter, config, steps_hint)

    def block_hooks(self) -> list[tuple[nn.Module, ModelHook]]:
        return [
            (self.down[0], ShallowHook(self.controller)),
            *[(block, SkippedHook(self.controller, key)) for key, block in enumerate(self.skipped)],
            (self.up[-2], DeepFeatureHook(self.controller)),
        ]

    def summary(self) -> str:
        return f"deep-feature cache (DeepCache-style): {len(self.skipped) + 1} deep blocks reusable"
