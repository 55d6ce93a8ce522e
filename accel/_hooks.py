"""Reversible hooks on modules, through diffusers' hook registry.

diffusers' `HookRegistry` lets a hook replace a module's forward and take it out again. Removing a hook
leaves the registry object and an instance-level `forward` behind; `remove` cleans those up when accel
created them, so an unpatched module is the module it was.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ._private import ContextHook, delete_hook_registry, hook_order, hook_registry

__all__ = ["ContextHook", "HookSet", "ModelHook", "add", "get_arg", "invalidate_registry_caches", "remove"]

_CREATED_FLAG = "_accel_created_registry"
_HAD_FORWARD_FLAG = "_accel_had_instance_forward"


def add(module: nn.Module, hook: ModelHook, name: str) -> None:
    if hook_registry(module) is None:
        setattr(module, _CREATED_FLAG, True)
    if not hasattr(module, _HAD_FORWARD_FLAG):
        setattr(module, _HAD_FORWARD_FLAG, "forward" in module.__dict__)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)


def remove(module: nn.Module, name: str) -> None:
    registry = hook_registry(module)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    if module.__dict__.pop(_CREATED_FLAG, False):
        delete_hook_registry(module)
    if not module.__dict__.pop(_HAD_FORWARD_FLAG, True):
        module.__dict__.pop("forward", None)


# diffusers' context-parallel hooks (`enable_parallelism`) split a block's inputs and gather its outputs under these
# names; the hooks registered last wrap the others.
_CONTEXT_PARALLEL_HOOKS = ("cp_input---", "cp_output---")


def keep_context_parallel_outermost(module: nn.Module) -> None:
    """Re-register diffusers' context-parallel hooks of `module` after accel's, so that they wrap accel's: accel's
    block hooks then see the rank's slice, as if they had been installed before `enable_parallelism`. The denoiser
    itself is left alone: hooks there see the whole inputs, as the pipeline passes them."""
    registry = hook_registry(module)
    if registry is None:
        return
    order = hook_order(registry)
    first = next((i for i, name in enumerate(order) if name.startswith(_CONTEXT_PARALLEL_HOOKS)), len(order))
    moved = order[first:]
    hooks = {name: registry.get_hook(name) for name in moved}
    # Outermost first: diffusers' removal of an inner hook bypasses an outer hook that replaces forward.
    for name in reversed(moved):
        registry.remove_hook(name, recurse=False)
    cp_last = sorted(moved, key=lambda name: name.startswith(_CONTEXT_PARALLEL_HOOKS))
    for name in cp_last:
        registry.register_hook(hooks[name], name)


def invalidate_registry_caches(root: nn.Module) -> None:
    """diffusers caches which submodules carry hooks; adding or removing block hooks makes that stale."""
    registry = hook_registry(root)
    if registry is not None:
        registry.invalidate_child_registries_cache()


_PARAM_INDEX: dict[type, dict[str, int]] = {}


def get_arg(module: nn.Module, name: str, args: tuple, kwargs: dict[str, Any], default: Any = None) -> Any:
    """Argument `name` of a call to `module.forward`, whether it was passed by position or keyword."""
    if name in kwargs:
        return kwargs[name]
    cls = type(module)
    index = _PARAM_INDEX.get(cls)
    if index is None:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # drop self
        index = _PARAM_INDEX[cls] = {param: i for i, param in enumerate(params)}
    position = index.get(name)
    if position is None or position >= len(args):
        return default
    return args[position]


class HookSet:
    """Hooks that are installed and removed together under one name; `root` holds the registry cache."""

    def __init__(self, root: nn.Module, name: str, pairs: list[tuple[nn.Module, ModelHook]]):
        self.root, self.name, self.pairs = root, name, pairs

    def install(self) -> None:
        for module, hook in self.pairs:
            add(module, hook, self.name)
            if module is not self.root:
                keep_context_parallel_outermost(module)
        invalidate_registry_caches(self.root)

    def remove(self) -> None:
        for module, _ in reversed(self.pairs):
            remove(module, self.name)
        invalidate_registry_caches(self.root)
