"""accel on diffusers' context parallelism (`model.enable_parallelism(config=ContextParallelConfig(...))`).

Order: enable parallelism first (or load with `from_pretrained(..., parallel_config=...)`), then `accel.patch`. At
patch time accel then sees the whole set-up, refuses what cannot run under it before any step does, and installs
its block hooks inside diffusers' split/gather hooks, so they see each rank's slice of the sequence. After
`accel.patch`, the model's `enable_parallelism` raises `ParallelismError` until `accel.unpatch`.

What runs under context parallelism (Ulysses / ring):
- step caching: both; every rank decides alike (`accel.caching.distributed`).
- attention routes ("int8", "sdpa", ...) and sparse attention: Ulysses, where after the all-to-all each rank runs
  ordinary attention over the whole sequence for its share of the heads, the SDPA call accel's router takes. Not
  ring: it merges partial attention over key blocks with their log-sum-exp, which accel's routes do not return.
  Sparse attention not where text and image tokens share the attention (FLUX): each rank joins its own text and
  image tokens before the all-to-all, so the text arrives in pieces between the image tokens.
- W4 weights: both (context parallelism replicates the weights).
- tensor parallelism (`TensorParallelConfig`): refused; it shards the weights accel's hooks and layers work on.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from . import _private
from .errors import ParallelismError

_ROUTES = ("attention", "sparse")


def context_config(model: nn.Module) -> Any | None:
    """The ContextParallelConfig applied to `model` (None: no context parallelism)."""
    return getattr(_private.parallel_config(model), "context_parallel_config", None)


def context_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group of the ranks that share one sequence of `model` (None: not context-parallel)."""
    cp = context_config(model)
    if cp is None or cp.ring_degree * cp.ulysses_degree <= 1:
        return None
    return _private.context_parallel_group(cp)


def describe(group: dist.ProcessGroup | None) -> str:
    """The report's note on a rank-consistent cache ('' without context parallelism)."""
    if group is None:
        return ""
    return (
        f", decided alike on {dist.get_world_size(group)} context-parallel ranks (change and error checks all-reduced)"
    )


def check_model(model: nn.Module) -> None:
    """Raise ParallelismError for a parallel set-up accel cannot serve at all."""
    config = _private.parallel_config(model)
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise ParallelismError(
            f"{type(model).__name__} runs with tensor parallelism (TensorParallelConfig), which shards the weights "
            "accel's hooks and 4-bit layers work on; accel supports context parallelism only "
            "(ContextParallelConfig): use that, or leave this model unpatched"
        )


def refusal(model: nn.Module, accelerator: str, adapter: Any = None) -> str | None:
    """Why `accelerator` (a patch keyword) cannot run under this model's context parallelism, or None."""
    cp = context_config(model)
    if cp is None or accelerator not in _ROUTES:
        return None
    if cp.ring_degree > 1:
        return (
            f"ring attention (ring_degree={cp.ring_degree}) merges partial attention over key blocks with their "
            "log-sum-exp, which accel's attention routes do not return; use ContextParallelConfig(ulysses_degree=...) "
            f"without ring, or {accelerator}=False"
        )
    position = getattr(getattr(adapter, "text_layout", None), "position", "none")
    if accelerator == "sparse" and position != "none":
        return (
            f"each rank joins its own text and image tokens before the all-to-all, so the sequence sparse attention sees "
            f"has the text in pieces between the image tokens, not as the {position} its search lays out; sparse=False "
            "here (attention='int8' does not depend on the token order)"
        )
    return None


def refuse_enable_parallelism(name: str, *args, **kwargs):
    """Stands in for `enable_parallelism` on a patched model."""
    raise ParallelismError(
        f"{name} is patched by accel; enable parallelism before patching: accel.unpatch(...), then "
        "model.enable_parallelism(config=...), then accel.patch(...) (accel checks at patch time what can run "
        "under the parallel set-up and places its hooks inside diffusers' context-parallel hooks)"
    )
