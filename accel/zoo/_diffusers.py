"""What the diffusers builders (`accel.zoo.image`, `accel.zoo.video`) share: prompt embeddings in place of text
encoders, and the cast `from_pretrained(torch_dtype=...)` does (the benchmark scenarios cast the same way)."""

from __future__ import annotations

import torch
from torch import nn

from accel import _private


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Normal draws from `gen` made in float32, then cast: the same values at every dtype."""
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def prompt_embeds(
    gen: torch.Generator, seq: int, dim: int, dtype: torch.dtype, pooled_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """Random prompt embeddings [1, seq, dim] and negatives, with pooled ones [1, pooled_dim] when asked, in the
    order prompt, pooled, negative, negative pooled (the values depend on it)."""
    embeds = {"prompt_embeds": randn(gen, 1, seq, dim, dtype=dtype)}
    if pooled_dim:
        embeds["pooled_prompt_embeds"] = randn(gen, 1, pooled_dim, dtype=dtype)
    embeds["negative_prompt_embeds"] = randn(gen, 1, seq, dim, dtype=dtype)
    if pooled_dim:
        embeds["negative_pooled_prompt_embeds"] = randn(gen, 1, pooled_dim, dtype=dtype)
    return embeds


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the way ``from_pretrained(torch_dtype=dtype)`` loads: floating parameters and persistent buffers go to
    ``dtype`` except those under the class's ``_keep_in_fp32_modules`` (Wan: rope, time_embedder,
    scale_shift_table, norm1-3), which stay float32. Non-persistent buffers (e.g. Wan's rope tables) stay as built.
    (``ModelMixin.to(dtype)`` would cast everything, and warn.)"""
    if dtype == torch.float32:
        return
    keep = set(_private.keep_in_fp32_modules(model))
    persistent = set(model.state_dict().keys())

    def target(name: str) -> torch.dtype:
        return torch.float32 if keep & set(name.split(".")) else dtype

    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(target(prefix + pname))
        for bname, b in list(mod.named_buffers(recurse=False)):
            full = prefix + bname
            if b is not None and b.is_floating_point() and full in persistent:
                setattr(mod, bname, b.to(target(full)))
