import os
import warnings

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # tiny models: 2 OpenMP threads on 2 shared cores thrash
warnings.filterwarnings("ignore", message=".*torchvision.*")


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
