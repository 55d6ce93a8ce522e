"""accel's node pack for ComfyUI: step caching, attention routes and W4 weights on ComfyUI's own model classes, and a
report.

ComfyUI is never a dependency of accel and this package imports nothing of ComfyUI: `accel comfy-install <ComfyUI
folder or base directory>` writes a two-line loader into its `custom_nodes/` folder, and only that loader, run by
ComfyUI, imports `accel.comfy.nodes` (which imports `comfy`). State lives on the patched `ModelPatcher` clone (its
wrappers and model options), never in a module global, so differently configured clones in one graph do not
interfere.
"""

from __future__ import annotations

from .install import LOADER_DIR, install, uninstall

__all__ = ["LOADER_DIR", "install", "uninstall"]
