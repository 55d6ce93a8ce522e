"""Which controls apply to a loaded model on this machine, and why the others do not.

The app does not decide this itself: it asks accel. Each accelerator is patched onto the model by keyword and
unpatched at once (`accel.patch` raises `NotApplicableError` with the installer's reason when it cannot serve the
model: pruning on a diffusion model, step caching on a VLM, ...). The machine is asked the way accel's kernels
ask it: an attention kernel's package (`accel.attention.dense.check_available`) and whether a Triton kernel can
run on the model's device (`accel._triton.usable`: a CUDA GPU, or the CPU interpreter with TRITON_INTERPRET=1).
INT8 and sparse attention are offered only where their Triton kernels run: elsewhere accel computes them with a
PyTorch reference, slower than the dense attention it replaces. W4 weights are offered everywhere (they save
memory; off a GPU the matmuls dequantize first, which is slower), with the kernel path in the note.
"""

from __future__ import annotations

import warnings

from accel.app.models import LoadedModel

ATTENTION = ("sdpa", "int8", "flash", "xformers")


def _trial(model: LoadedModel, **keyword) -> str | None:
    """Why `accel.patch(model.target, **keyword)` cannot apply (None: it can); unpatched again at once."""
    import accel
    from accel.errors import NotApplicableError, UnsupportedModelError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accel.patch(model.target, preset="lossless", **keyword)
    except (NotApplicableError, UnsupportedModelError) as err:
        return str(err).split(": ", 1)[-1] if isinstance(err, NotApplicableError) else str(err)
    accel.unpatch(model.target)
    return None


def _needs_triton(what: str, model: LoadedModel) -> str | None:
    from accel import _triton

    if _triton.available() and _triton.usable(model.device):
        return None
    return (
        f"{what} needs a CUDA GPU: its Triton kernel does not run on {model.device.type} here (accel would compute "
        "it with a PyTorch reference, slower than the attention it replaces)"
    )


def capabilities(model: LoadedModel) -> dict[str, str | None]:
    """{control: None if it can be used, else why not}; controls: "cache", "sparse", "prune", "quant" and
    "attention:<kernel>" for each kernel."""
    from accel import CacheConfig, PruneConfig, SparseConfig
    from accel.attention.dense import check_available

    found: dict[str, str | None] = {
        "cache": _trial(model, cache=CacheConfig()),
        "sparse": _trial(model, sparse=SparseConfig()) or _needs_triton("sparse attention", model),
        "prune": _trial(model, prune=PruneConfig()),
        "quant": None,
    }
    route = _trial(model, attention="sdpa")
    for kernel in ATTENTION:
        reason = route or check_available(kernel)
        if reason is None and kernel == "int8":
            reason = _needs_triton("INT8 attention", model)
        found[f"attention:{kernel}"] = reason
    return found


def quant_note(model: LoadedModel) -> str:
    """How 4-bit weights would run on the model's device (accel's own words)."""
    from accel.quant.kernels import describe_paths

    return describe_paths(model.device, "auto")
