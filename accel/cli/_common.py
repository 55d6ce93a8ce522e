"""What every `accel` subcommand shares: the one-line usage error, checks of arguments, the user's functions."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

TINY_WARNING = """\
=====================================================================================================
  TINY RANDOM-WEIGHT MODELS. These are untrained, tiny-config instances of the real architectures.
  * Fidelity columns (PSNR/SSIM, token agreement/KL) measure how close each accelerated output is to
    the UNACCELERATED output of the same model and seed, not image or text quality.
  * Timings of tiny models on CPU say little about real speed-ups: overheads dominate here. See
    benchmarks/ for measurements of real models on GPUs.
====================================================================================================="""


class UsageError(SystemExit):
    """A mistake on the command line or in the user's --pipeline/--runner function: `main` prints
    `accel: error: <message>` on one line and exits with status 2 (argparse's convention), no traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = " ".join(message.splitlines())

    def __str__(self) -> str:
        return f"accel: error: {self.message}"


def out(line: str) -> None:
    """Print a line of results without breaking up a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)


def add_timing_args(p: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    """--repeats, --warmup, --seed, --quiet (checked by `main` for every subcommand that has them)."""
    p.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed runs per variant (median reported; default {repeats})"
    )
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs before them (default {warmup})")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and of every run (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def settings(args: argparse.Namespace) -> dict:
    """The command line's settings, for a result's JSON."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "json")}


def split(value: str | None) -> list[str]:
    """ "a, b,,c" -> ["a", "b", "c"]."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def int_list(option: str, value: str) -> list[int]:
    try:
        values = [int(v) for v in split(value)]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, e.g. 64,128, got {value!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes positive integers, got {value!r}")
    return values


def check_names(kind: str, names: list[str], allowed) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise UsageError(f"unknown {kind} {names}; choose from: {', '.join(allowed)}")


def check_output(option: str, path: str | None) -> None:
    """Fail now, not after the run, if `path` cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a folder; give a file name, e.g. {os.path.join(path, 'results.json')}")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path!r}: no permission to write there")


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device; e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {device}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")


def check_positive(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{option} must be >= 1, got {value}")


def _import_user_module(option: str, spec: str, module_name: str):
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise UsageError(f"{option} {spec}: no such file {module_name!r}")
        file_spec = importlib.util.spec_from_file_location("accel_user_pipeline", module_name)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # MODULE names a module in the folder accel runs from, as with `python -m`
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module_name)


def load_user_function(option: str, spec: str) -> Callable:
    """FUNCTION of `option MODULE:FUNCTION` (or path/to/file.py:FUNCTION). Errors raised by the user's module
    itself keep their traceback; a missing module, file or function is a usage error."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"{option} takes MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    try:
        module = _import_user_module(option, spec, module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UsageError(
                f"{option} {spec}: no module named {err.name!r} (run accel from the folder that "
                "holds it, or give path/to/file.py:FUNCTION)"
            ) from None
        raise UsageError(f"{option} {spec}: importing {module_name!r} failed: {err}") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise UsageError(f"{option} {spec}: {module_name!r} has no {func_name!r}")
    if not callable(func):
        raise UsageError(f"{option} {spec}: {func_name!r} is a {type(func).__name__}, not a function")
    return func
