"""Shared test helpers: the tiny zoo models built once per session and their unpatched outputs."""

DIFFUSION_FAMILIES = ["flux", "sd3", "sd15", "sdxl", "wan", "hunyuan_video", "cogvideox", "ltx"]
TWO_CALL_CFG = {"flux", "wan", "hunyuan_video"}  # cond and uncond as separate transformer calls

_BUILT = {}


def tiny(family: str):
    """One tiny model per family per test session; tests unpatch what they patch."""
    from accel.zoo import build

    if family not in _BUILT:
        _BUILT[family] = build(family)
    return _BUILT[family]


_BASELINES = {}


def baseline(family: str, **overrides):
    """The unpatched output of `tiny(family).run(0, **overrides)`, computed once per test session."""
    key = (family, tuple(sorted(overrides.items())))
    if key not in _BASELINES:
        _BASELINES[key] = tiny(family).run(0, **overrides)
    return _BASELINES[key]
