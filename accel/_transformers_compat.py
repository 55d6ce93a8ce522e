"""Calls into transformers whose argument names changed between versions, resolved by signature.

transformers renamed the KV-cache argument of its models, decoder layers and mask builders more than once
(`past_key_value` in 4.5x decoder layers, `past_key_values`, then `cache`; a deprecated name is still
accepted for a while and converted inside the decorated forward). Hooks see the call's keyword arguments
before that conversion, so they ask the signature which name is current and also accept the older ones.
Signatures are inspected once per function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError

# Newest first: the name a forward declares wins, the others are deprecated aliases callers may still pass.
CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


@functools.cache
def _parameters(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _forward_parameters(module: nn.Module) -> tuple[str, ...]:
    return _parameters(type(module).forward)[1:]  # drop self


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` declares a parameter `name` (not counting **kwargs)."""
    return name in _parameters(fn)


def cache_kwarg_name(module: nn.Module) -> str:
    """The keyword `module.forward` takes its KV cache as ("cache" in transformers >= 5.24)."""
    params = _forward_parameters(module)
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{type(module).__name__}.forward takes no KV cache argument (none of {CACHE_NAMES}): an unknown transformers "
        "layout; use a supported transformers version"
    )


def get_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The KV cache of one call to `module.forward` (a forward pre-hook's args/kwargs), or None."""
    name = cache_kwarg_name(module)
    if kwargs.get(name) is not None:
        return kwargs[name]
    for alias in CACHE_NAMES:
        if kwargs.get(alias) is not None:
            return kwargs[alias]
    position = _forward_parameters(module).index(name)
    return args[position] if position < len(args) else None


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (`cache` / `past_key_values` field), or None."""
    for name in CACHE_NAMES[:2]:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def crop_cache(cache: Any, length: int) -> None:
    """Drop what `cache` holds after its first `length` tokens. Older `crop` takes the length to keep, newer
    ones the number of tokens to remove, as a negative count."""
    current = cache_length(cache)
    if current <= length:
        return
    cache.crop(length if accepts(type(cache).crop, "max_length") else length - current)


def cache_length(cache: Any, layer_idx: int | None = None) -> int:
    """Tokens already in `cache` (0 for None), of one layer when `layer_idx` is given."""
    if cache is None:
        return 0
    return int(cache.get_seq_length() if layer_idx is None else cache.get_seq_length(layer_idx))


def create_causal_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Any,
    position_ids: torch.Tensor | None = None,
    layer_idx: int | None = None,
):
    """`transformers.masking_utils.create_causal_mask` under whichever argument names it has.

    `layer_idx` sizes the mask against that layer's cache; versions without the argument size it against the
    first layer, so asking for another layer there raises (see `supports_mask_layer`)."""
    from transformers.masking_utils import create_causal_mask as create

    params = _parameters(create)
    kwargs: dict[str, Any] = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    kwargs[next(name for name in CACHE_NAMES if name in params)] = cache
    if "cache_position" in params:  # older versions take the new tokens' absolute indices
        past = cache_length(cache, layer_idx)
        kwargs["cache_position"] = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
    if layer_idx is not None:
        if not supports_mask_layer():
            raise UnsupportedModelError("this transformers' create_causal_mask cannot size a mask for one cache layer")
        kwargs["layer_idx"] = layer_idx
    return create(**kwargs)


def supports_mask_layer() -> bool:
    """Whether `create_causal_mask` takes `layer_idx` (a mask for a cache layer other than the first)."""
    from transformers.masking_utils import create_causal_mask as create

    return accepts(create, "layer_idx")


__all__ = [
    "CACHE_NAMES",
    "accepts",
    "cache_kwarg_name",
    "cache_length",
    "create_causal_mask",
    "crop_cache",
    "get_cache",
    "output_cache",
    "supports_mask_layer",
]
