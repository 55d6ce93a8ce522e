import os
import warnings

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # tiny models: 2 OpenMP threads on 2 shared cores thrash
warnings.filterwarnings("ignore", message=".*torchvision.*")

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


@pytest.fixture
def patched():
    """accel.patch that is always undone at the end of the test, even when it fails."""
    import accel

    handles = []

    def _patch(obj, *args, **kwargs):
        handle = accel.patch(obj, *args, **kwargs)
        handles.append(obj)
        return handle

    yield _patch
    for obj in handles:
        if accel.get_handle(obj) is not None:
            accel.unpatch(obj)
