"""`accel comfy-install`: put (or remove) the loader of accel's nodes in a ComfyUI `custom_nodes/` folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import AccelError

LOADER_DIR = "accel-nodes"  # a hyphen: never importable as a package named accel, even on sys.path
MARKER = "# Written by `accel comfy-install`"
LOADER = f"""{MARKER}; remove with `accel comfy-install --uninstall <this ComfyUI>`.
from accel.comfy.nodes import *  # noqa: F401,F403  (ComfyUI's python must have accel installed)
"""


class InstallError(AccelError, ValueError):
    """The folder is not a ComfyUI folder or base directory, or holds a loader accel did not write."""


def custom_nodes_dir(target: str | Path) -> Path:
    """`custom_nodes/` of a ComfyUI folder or base directory (or that folder itself)."""
    path = Path(target).expanduser().resolve()
    if not path.is_dir():
        raise InstallError(f"{path} is not a folder: pass ComfyUI's folder or the --base-directory it runs with")
    if path.name == "custom_nodes":
        return path
    if (path / "custom_nodes").is_dir():
        return path / "custom_nodes"
    raise InstallError(
        f"{path} has no custom_nodes folder: pass ComfyUI's folder or its --base-directory "
        f"(for a new base directory: mkdir {path / 'custom_nodes'})"
    )


def _loader(target: str | Path) -> Path:
    return custom_nodes_dir(target) / LOADER_DIR / "__init__.py"


def _check_ours(loader: Path) -> None:
    if not loader.read_text().startswith(MARKER):
        raise InstallError(f"{loader} was not written by accel comfy-install: move it away first")


def install(target: str | Path) -> Path:
    """Write the loader; returns its path. Rewriting an existing loader of accel's is fine."""
    loader = _loader(target)
    if loader.exists():
        _check_ours(loader)
    elif loader.parent.exists():
        raise InstallError(f"{loader.parent} exists and is not accel's loader: move it away first")
    loader.parent.mkdir(exist_ok=True)
    loader.write_text(LOADER)
    return loader


def uninstall(target: str | Path) -> Path | None:
    """Remove the loader (and its folder, with ComfyUI's __pycache__); returns what was removed, None if absent."""
    loader = _loader(target)
    if not loader.exists():
        return None
    _check_ours(loader)
    folder = loader.parent
    loader.unlink()
    cache = folder / "__pycache__"
    if cache.is_dir():
        for file in cache.iterdir():
            file.unlink()
        cache.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()
    return folder
