"""The dependency versions CI tests accel with, and the warnings `accel.patch` gives outside them."""

from __future__ import annotations

import functools
from importlib import metadata

from packaging.version import InvalidVersion, Version

# Per package: (lowest, newest) version CI ran the tests with. The lowest is pyproject.toml's lower bound,
# which the lower-bound job of .ci/run installs exactly (tests/test_versions.py keeps the two equal); the
# newest is what the main job resolved when this table was last raised. pyproject.toml sets no upper
# bound: a newer release is allowed, with a warning, since it is the one most likely to change internals
# accel hooks into.
TESTED = {
    "torch": ("2.13.0", "2.13.0"),
    "transformers": ("5.17.0", "5.25.0"),
    "diffusers": ("0.41.0", "0.42.1"),
    "accelerate": ("1.1.0", "1.16.0"),
}


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _message(package: str, text: str, lowest: str, newest: str) -> str | None:
    """The warning for `package` at version `text`, or None when that version was tested."""
    low, new = Version(lowest), Version(newest)
    tested = f"{lowest} to {new.major}.{new.minor}.x"
    fix = f"install {package}>={lowest},<{new.major}.{new.minor + 1}"
    try:
        installed = Version(text)
    except InvalidVersion:
        return (
            f"{package} reports version {text!r}, which accel cannot compare with the versions it is "
            f"tested with ({tested}); if patching fails, {fix}"
        )
    # Patch releases of the newest tested minor count as tested: they fix bugs, they do not move internals.
    if installed.release < low.release:
        side = "older than"
    elif installed.release[:2] > new.release[:2]:
        side = "newer than"
    else:
        return None
    return (
        f"{package} {text} is {side} the versions accel is tested with ({tested}); it may work, but if "
        f"patching fails or outputs change, {fix}"
    )


@functools.cache
def _warnings() -> tuple[str, ...]:
    found = []
    for package, (lowest, newest) in TESTED.items():
        text = _installed(package)
        message = None if text is None else _message(package, text, lowest, newest)
        if message is not None:
            found.append(message)
    return tuple(found)


def check_versions() -> list[str]:
    """One warning per installed dependency outside its tested range (checked once per process)."""
    return list(_warnings())
