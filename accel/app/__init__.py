"""The web app: baseline vs accelerated, side by side, for images, videos and VLM answers (issue 14).

    from accel.app import build_app
    build_app(preload="ref-flux").launch()          # or: accel app --model ref-flux

gradio is an extra (`pip install "accel[app]"`); it is imported when the app is built, not with this package.
The parts: `models` (what can be loaded and how each runs), `pool` (the LRU of loaded models), `capabilities`
(which accelerators apply, asked of accel), `settings` and `limits` (one request and its bounds), `compare` (the
comparison and its metrics), `service` (all of it without gradio), `media` (files), `views`, `ui`, `ui_tab` (the
page).
"""

from __future__ import annotations

from accel.app.limits import AppInputError, Limits
from accel.app.settings import Settings


def build_app(preload=None, max_models=2, device=None, limits=None, allow_custom=True):
    """The app as a `gr.Blocks` (imports gradio); the parameters are `accel.app.ui.build_app`'s."""
    from accel.app.ui import build_app as build

    return build(preload, max_models, device, limits, allow_custom)


__all__ = ["AppInputError", "Limits", "Settings", "build_app"]
