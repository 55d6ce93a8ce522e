"""`accel comfy-install`: the loader of accel's ComfyUI nodes into a ComfyUI folder or base directory."""

from __future__ import annotations

import argparse

from accel.cli._common import UsageError

NAME = "comfy-install"
HELP = "put accel's ComfyUI nodes into a ComfyUI's custom_nodes folder (or take them out with --uninstall)"
DESCRIPTION = (
    "Write a two-line loader, custom_nodes/accel-nodes/__init__.py, that imports accel.comfy.nodes when ComfyUI "
    "starts. ComfyUI must run with a Python that has accel installed. --uninstall removes the loader again."
)
EPILOG = """\
examples:
  accel comfy-install ~/ComfyUI                  ComfyUI's own folder
  accel comfy-install /data/comfy-base           a folder ComfyUI runs with --base-directory
  accel comfy-install --uninstall ~/ComfyUI"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="ComfyUI's folder, its --base-directory, or their custom_nodes folder")
    p.add_argument("--uninstall", action="store_true", help="remove the loader instead")


def run(args: argparse.Namespace) -> int:
    from accel.comfy.install import InstallError, install, uninstall

    try:
        if args.uninstall:
            removed = uninstall(args.target)
            print(f"removed {removed}" if removed else f"nothing to remove: no accel loader under {args.target}")
        else:
            print(f"wrote {install(args.target)}; restart ComfyUI to load the Accel nodes")
    except InstallError as err:
        raise UsageError(str(err)) from None
    return 0
