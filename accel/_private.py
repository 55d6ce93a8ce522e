"""Every private attribute of diffusers, transformers and torch that accel uses, and why it must.

Each has no public equivalent in the versions accel supports; each was checked against diffusers 0.41.0 and
0.42.1, transformers 5.17.0, 5.24.0 and 5.25.0 (CI), torch 2.13. Anything else accel reads from these libraries is
their public API. A new version that renames one of these breaks only this module.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

# StateManager and BaseState are not exported by `diffusers.hooks`; their defining module is the one diffusers'
# own cache hooks import them from.
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

# diffusers stores a module's HookRegistry in this attribute. Its one public accessor,
# `HookRegistry.check_if_exists_or_initialize`, creates a registry when there is none; accel must also ask
# whether one exists (so that unpatching leaves none behind that accel made) and delete the one it made.
_REGISTRY_ATTR = "_diffusers_hook"


def hook_registry(module: nn.Module) -> HookRegistry | None:
    """The module's diffusers hook registry, or None when it has none (never creates one)."""
    return getattr(module, _REGISTRY_ATTR, None)


def delete_hook_registry(module: nn.Module) -> None:
    """Remove the (empty) registry accel created on `module`."""
    delattr(module, _REGISTRY_ATTR)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ContextHook(ModelHook):
    """A diffusers hook that sees the `CacheContext` a pipeline sets with `model.cache_context(name, ...)`.

    diffusers hands that context only to hooks whose class sets `_is_stateful` (there is no public switch),
    through a `StateManager` attribute of the hook; `StateManager.context` is public. Subclasses that keep
    state override `reset_state`, which diffusers calls at the end of a pipeline call.
    """

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self._context_manager = StateManager(_NoState)

    def cache_context(self) -> Any | None:
        """The pipeline's cache context of the current denoiser call (name, step_index, ...), or None."""
        try:
            return self._context_manager.context
        except ValueError:  # no cache_context() around this call
            return None

    def reset_state(self, module: nn.Module) -> nn.Module:
        return module


def attention_backend(processor: Any) -> str | None:
    """The diffusers attention backend a processor was set to (`model.set_attention_backend`), None for the
    default. diffusers sets it and resets it publicly but has no getter."""
    return getattr(processor, "_attention_backend", None)


# transformers keeps a config's attention implementation in this attribute. accel switches a model to its own
# implementation with the public `set_attn_implementation`, and must give back each (sub-)config's exact
# earlier value, None included; `set_attn_implementation` cannot set None and validates what it sets.
_ATTN_IMPLEMENTATION_ATTR = "_attn_implementation_internal"


def attention_implementations(model: nn.Module) -> list[tuple[Any, str | None]]:
    """(config, attention implementation) of every config of `model` and its submodules, each once."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, _ATTN_IMPLEMENTATION_ATTR):
            configs[id(config)] = config
    return [(config, getattr(config, _ATTN_IMPLEMENTATION_ATTR)) for config in configs.values()]


def restore_attention_implementation(config: Any, implementation: str | None) -> None:
    setattr(config, _ATTN_IMPLEMENTATION_ATTR, implementation)


def tensor_version(tensor: torch.Tensor) -> int:
    """torch's in-place modification counter of a tensor: tells a reused tensor whose values changed from
    one that did not, without reading it (no public API exposes it)."""
    return tensor._version


def keep_in_fp32_modules(model: nn.Module) -> list[str]:
    """Submodule names a diffusers or transformers class keeps in float32 when loaded in another dtype: a class
    attribute from_pretrained reads, with no public getter (the zoo casts its tiny models the same way)."""
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])


# diffusers records `enable_parallelism`'s resolved ParallelConfig on the model in this attribute (no public getter),
# and the context-parallel config keeps its device meshes in private fields set by its `setup`. These were checked
# against 0.42.1 only (where accel's context-parallel tests run; earlier releases' `setup` sets the same mesh fields);
# accel reads them only on a model with parallelism enabled.
_PARALLEL_CONFIG_ATTR = "_parallel_config"


def parallel_config(model: nn.Module) -> Any | None:
    """The ParallelConfig `enable_parallelism` applied to `model`, or None."""
    return getattr(model, _PARALLEL_CONFIG_ATTR, None)


def context_parallel_group(cp_config: Any) -> Any:
    """The process group over all context-parallel ranks (ring x ulysses): those that share one sequence."""
    return cp_config._flattened_mesh.get_group()


def hook_order(registry: HookRegistry) -> list[str]:
    """Hook names of a registry, innermost first (the registry keeps the order only in a private list)."""
    return list(registry._hook_order)
