"""`accel app`: the web app (accel.app), baseline vs accelerated side by side, served by gradio."""

from __future__ import annotations

import argparse

from accel.cli._common import UsageError, check_device, check_positive

NAME = "app"
HELP = 'the web app: baseline vs accelerated, side by side (needs gradio: pip install "accel[app]")'
DESCRIPTION = (
    "Serve a web page that runs your prompt with and without accel, with the same seed, and shows both outputs "
    "(an image slider, two videos, or two VLM answers), the time each took, denoiser passes computed and reused, "
    "peak memory, PSNR/SSIM against the baseline and the accel report. Models: the reference models, the tiny "
    "random zoo, and any local folder or Hub id from_pretrained can load. Also an API endpoint, compare, for "
    "gradio_client. Models load when first asked for (or at start with --model)."
)
EPILOG = """\
examples:
  accel app                                   http://127.0.0.1:7860, nothing loaded until asked
  accel app --model ref-flux --port 8080      ref-flux loaded at start
  accel app --host 0.0.0.0 --max-models 3     reachable from other machines, three models kept loaded
  accel app --share                           also a temporary public gradio.live link"""
INSTALL = 'accel app needs gradio: pip install -e ".[app]" in a checkout of accel, or pip install "accel[app]"'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link (off by default)")
    p.add_argument("--model", default=None, help="load this model at start (a listed name, a local folder or a Hub id)")
    p.add_argument(
        "--max-models", type=int, default=2, help="models kept loaded, least recently used dropped first (default: 2)"
    )
    p.add_argument(
        "--device", default=None, help="where reference and from_pretrained models run (default: cuda if available)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="largest number of denoising steps a request may ask for (default: 50)",
    )
    p.add_argument(
        "--max-size", type=int, default=None, help="largest image side in pixels a request may ask for (default: 512)"
    )
    p.add_argument("--max-frames", type=int, default=None, help="most frames a video request may ask for (default: 33)")
    p.add_argument(
        "--no-custom-models", action="store_true", help="offer the built-in models only (no folders or Hub ids)"
    )


def _limits(args):
    from accel.app.limits import Limits
    from accel.errors import ConfigError

    given = {"max_steps": args.max_steps, "max_size": args.max_size, "max_frames": args.max_frames}
    for name, value in given.items():
        check_positive("--" + name.replace("_", "-"), value)
    try:
        return Limits(**{name: value for name, value in given.items() if value is not None})
    except ConfigError as err:
        raise UsageError(str(err)) from None


def run(args) -> int:
    check_positive("--max-models", args.max_models)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if args.device is not None:
        check_device(args.device)
    limits = _limits(args)
    try:
        import gradio  # noqa: F401  (only to say how to install it)
    except ImportError:
        raise UsageError(INSTALL) from None
    from accel.app.ui import build_app, launch
    from accel.errors import AccelError

    try:
        demo = build_app(args.model, args.max_models, args.device, limits, allow_custom=not args.no_custom_models)
    except AccelError as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
