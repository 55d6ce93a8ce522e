"""Fixtures shared by the ComfyUI checks, loaded as a pytest plugin (`-p comfy_fixtures`) by
tests/test_comfy_native.py: each check module runs on every tiny family, from the same untouched model."""

from __future__ import annotations

import pytest
from comfy_tiny import FAMILIES, sample, tiny_model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def base(family):
    """The family's tiny model and its sample without accel."""
    model = tiny_model(family)
    return model, sample(model, family)
