"""Grid arithmetic shared by the DiT adapters."""

from __future__ import annotations

from .base import LatentGrid


def grid_from_5d(shape, patch_t: int, patch_hw: int, frames_dim: int) -> LatentGrid:
    """Latent [B, C, F, H, W] (frames_dim=2) or [B, F, C, H, W] (frames_dim=1) to a token grid."""
    height, width = shape[-2], shape[-1]
    return LatentGrid(shape[frames_dim] // patch_t, height // patch_hw, width // patch_hw)
