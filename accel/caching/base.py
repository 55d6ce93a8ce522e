"""What every step cache shares: its controller, the hook that brackets each denoiser call, the hook set that
installs and removes all its hooks together, and its description. `DiTCache` and `UNetCache` add only which
blocks get which hook."""

from __future__ import annotations

from diffusers.hooks import ModelHook
from torch import nn

from .. import _hooks, parallel
from ..errors import AccelError
from ..pipelines.base import Adapter
from . import distributed
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
        self.on_output = lambda output: output  # a cache that forecasts the denoiser's output swaps it here
        self.group = None  # the context-parallel group whose ranks must decide alike (accel.parallel)

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
            with distributed.scope(self.group):
                return self.on_output(self.fn_ref.original_forward(*args, **kwargs))
        finally:
            self.controller.exit()

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.controller.reset()
        return module


class StepCache:
    """A step cache on one denoiser. Subclasses check the denoiser and set what `block_hooks` and `summary` need
    before calling `__init__`, which builds the controller and the hooks (installed by `install`)."""

    def __init__(self, adapter: Adapter, config: CacheConfig, steps_hint):
        self.adapter = adapter
        self.controller = CacheController(config)
        self._call_hook = DenoiserCallHook(self.controller, steps_hint)
        self._call_hook.group = parallel.context_group(adapter.model)
        pairs = [(adapter.model, self._call_hook), *self.block_hooks()]
        self._hooks = _hooks.HookSet(adapter.model, HOOK, pairs)

    def block_hooks(self) -> list[tuple[nn.Module, ModelHook]]:
        """(block, hook) for every block this cache hooks."""
        raise NotImplementedError

    def summary(self) -> str:
        """What this kind of cache runs and reuses, for `describe`."""
        raise NotImplementedError

    def describe(self) -> str:
        cfg = self.controller.config
        mode = f"target={cfg.target}" if cfg.target is not None else f"threshold={cfg.threshold}"
        ranks = parallel.describe(self._call_hook.group)
        return (
            f"{self.summary()}, {mode}, taylor_order={cfg.taylor_order}, max_consecutive={cfg.max_consecutive}, "
            f"decision={cfg.decision}{ranks}"
        )

    def install(self) -> None:
        self._hooks.install()

    def remove(self) -> None:
        self._hooks.remove()

    def begin_call(self) -> None:
        """A patched pipeline call starts: fresh state, and call boundaries come from the pipeline."""
        self.controller.begin_call()
        self._call_hook.managed = True

    def end_call(self) -> None:
        self.controller.end_call()
        self._call_hook.managed = False

    def calls(self) -> list[dict]:
        """Statistics of the most recent pipeline calls, oldest first, as the report's JSON values."""
        return [call.to_dict() for call in self.controller.calls]
