"""accel: one line to make diffusers pipelines and transformers VLMs faster, at a measured cost."""

from .api import Handle, get_handle, patch, unpatch
from .caching import CacheConfig
from .errors import AccelError, AlreadyPatchedError, NotPatchedError, UnsupportedModelError
from .presets import PRESET_NAMES

__version__ = "0.1.0"

__all__ = [
    "AccelError",
    "AlreadyPatchedError",
    "CacheConfig",
    "Handle",
    "NotPatchedError",
    "PRESET_NAMES",
    "UnsupportedModelError",
    "get_handle",
    "patch",
    "unpatch",
]
