"""The `accel` command. One module per subcommand, each with `NAME`, `HELP`, `DESCRIPTION` (and `EPILOG`, shown
as written, when it has examples), `add_arguments(parser)` and `run(args) -> exit status`; adding a subcommand
is one module and one entry in `COMMANDS`.

    accel demo                                   the reference models, baseline vs each preset (accel.cli.demo)
    accel bench --family flux | --pipeline M:F   one family or your own pipeline (accel.cli.bench)
    accel bench --suite fidelity                 every cache vs its peers on the reference models
    accel bench-vlm --family llava --keep 8,4    visual token pruning on a tiny VLM (accel.cli.bench_vlm)
    accel eval --model ID --keep 192,128,64      pruning accuracy on lmms-eval tasks (accel.cli.eval)
    accel app --model ref-flux                   the web app, baseline vs accelerated (accel.cli.app)
    accel comfy-install ~/ComfyUI                the ComfyUI nodes' loader into custom_nodes (accel.cli.comfy_install)

The comparisons, tables and JSON are accel.bench's; this package parses and checks the arguments. A mistake in
them ends as one line `accel: error: ...` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from accel.cli._common import UsageError, check_positive

# modules of accel.cli, in the order `accel --help` lists them
COMMANDS = ("demo", "bench", "bench_vlm", "eval", "app", "comfy_install")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel", description="Benchmark accel presets against the unaccelerated baseline."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        _add_command(sub, importlib.import_module(f"accel.cli.{name}"))
    return parser


def _add_command(sub, command) -> None:
    """The subparser of one subcommand module, its arguments, and its `run` as `func`."""
    options = {"help": command.HELP, "description": command.DESCRIPTION}
    epilog = getattr(command, "EPILOG", None)
    if epilog:  # examples keep their line breaks and indentation
        options.update(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = sub.add_parser(command.NAME, **options)
    command.add_arguments(p)
    p.set_defaults(func=command.run)


def _check_common(args: argparse.Namespace) -> None:
    """The options several subcommands share (absent ones are skipped)."""
    check_positive("--repeats", getattr(args, "repeats", None))
    warmup = getattr(args, "warmup", None)
    if warmup is not None and warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    check_positive("--steps", getattr(args, "steps", None))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_common(args)
        warnings.filterwarnings("ignore", message=".*Nothing was patched")  # the row says "nothing applied"
        # transformers' notices (e.g. image processors without torchvision) would break up the table.
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        return args.func(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        raise


__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]
