"""accel: one line to make diffusers pipelines and transformers VLMs faster, at a measured cost."""

from .api import Handle, get_handle, patch, unpatch
from .attention import AttentionConfig
from .attention.sparse import SparseConfig
from .caching import CacheConfig
from .errors import (
    AccelError,
    AlreadyPatchedError,
    ConfigError,
    ConfigTypeError,
    CopyError,
    NotApplicableError,
    NotPatchedError,
    ParallelismError,
    UnsupportedModelError,
)
from .presets import PRESET_NAMES
from .pruning import PruneConfig
from .quant import QuantConfig

__version__ = "0.1.0"

__all__ = [
    "AccelError",
    "AlreadyPatchedError",
    "AttentionConfig",
    "CacheConfig",
    "ConfigError",
    "ConfigTypeError",
    "CopyError",
    "Handle",
    "NotApplicableError",
    "NotPatchedError",
    "PRESET_NAMES",
    "ParallelismError",
    "PruneConfig",
    "QuantConfig",
    "SparseConfig",
    "UnsupportedModelError",
    "get_handle",
    "patch",
    "unpatch",
]
