"""accel's W4 layers on ComfyUI's native models, as ComfyUI object patches.

Each selected `nn.Linear` of the diffusion model gets a `W4Linear` (accel.quant: 4-bit codes, a scale and zero per
group) registered on the clone with `ModelPatcher.add_object_patch`. ComfyUI swaps object patches in when it loads
the clone and puts the originals back when it unloads it, so the base model and its other clones keep their 16-bit
layers, and loading, offloading, cloning and unloading work as for any patched model. The originals stay in memory
(they belong to the base model): this saves no memory while the base model is held, and the 4-bit layers' speed
is the kernels' (the PyTorch reference on the CPU, slow).
"""

from __future__ import annotations

from torch import nn

from ..pipelines.comfy_native import ComfyDiTAdapter
from ..quant.apply import NothingToQuantize, select_layers
from ..quant.config import QuantConfig
from ..quant.layer import W4Linear
from ..quant.recipe import quantize_weight

KEY = "accel_w4"
PREFIX = "diffusion_model."


class W4Session:
    """What one Accel W4 Weights node did (shared by the clone's later clones, like the other sessions)."""

    def __init__(self, family: str, config: QuantConfig, layers: dict[str, W4Linear], kept: dict[str, str], before):
        self.family, self.config, self.layers, self.kept = family, config, layers, kept
        self.bytes_before = before
        self.bytes_after = sum(sum(t.numel() * t.element_size() for t in w4.buffers()) for w4 in layers.values())
        self.device = None  # where the 4-bit layers were last moved

    def __deepcopy__(self, memo):
        return self

    # ComfyUI moves the modules that hold parameters (and may patch a clone in without loading it again); W4Linear
    # keeps its codes in buffers, so before every sampling run they go to the load device, and back when detached.
    def on_pre_run(self, patcher, *args, **kwargs):
        self._move(patcher.load_device)

    def on_detach(self, patcher, *args, **kwargs):
        self._move(patcher.offload_device)

    def _move(self, device) -> None:
        for layer in self.layers.values():
            layer.to(device)
        self.device = device

    def describe(self) -> str:
        return (
            f"W4 weights on {self.family}: {len(self.layers)} linear layers in 4 bits (group {self.config.group_size}), "
            f"{len(self.kept)} kept in 16-bit; {self.bytes_before / 2**20:.1f} MiB of their weights as "
            f"{self.bytes_after / 2**20:.1f} MiB"
        )

    def stats(self) -> dict:
        return {
            "layers": len(self.layers),
            "kept": len(self.kept),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def original_linears(model_patcher):
    """(name, module) of the diffusion model, with the original layer wherever a clone's object patch is swapped in
    right now (ComfyUI keeps the last model it ran loaded and patched)."""
    backup = model_patcher.object_patches_backup  # shared by all clones of one model
    for name, module in model_patcher.model.diffusion_model.named_modules():
        yield name, backup.get(PREFIX + name, module)


def apply_w4(model_patcher, adapter: ComfyDiTAdapter, config: QuantConfig):
    """A clone of `model_patcher` whose selected linear layers are W4 object patches (an earlier Accel W4 Weights
    replaced: layers are always quantized from the originals)."""
    import comfy.patcher_extension as ext

    diffusion_model = model_patcher.model.diffusion_model
    named = [(n, m) for n, m in original_linears(model_patcher) if not isinstance(m, W4Linear)]
    layers, kept = select_layers(diffusion_model, config, adapter.quant_exclude, named=named)
    if not layers:
        raise NothingToQuantize(
            f"no linear layer of {type(diffusion_model).__name__} is left to quantize ({len(kept)} kept in 16-bit); "
            "lower min_features or the group size"
        )
    clone = model_patcher.clone()
    for key in [k for k, v in clone.object_patches.items() if isinstance(v, W4Linear)]:
        del clone.object_patches[key]  # an earlier Accel W4 Weights on this model
    done, before = {}, 0
    for name, module in layers.items():
        done[name] = _quantize(module, config)
        before += sum(t.numel() * t.element_size() for t in module.parameters())
        clone.add_object_patch(PREFIX + name, done[name])
    session = W4Session(adapter.display_name, config, done, kept, before)
    for kind, callback in (
        (ext.CallbacksMP.ON_PRE_RUN, session.on_pre_run),
        (ext.CallbacksMP.ON_DETACH, session.on_detach),
    ):
        clone.remove_callbacks_with_key(kind, KEY)
        clone.add_callback_with_key(kind, KEY, callback)
    clone.set_attachments(KEY, session)
    return clone


def _quantize(module: nn.Linear, config: QuantConfig) -> W4Linear:
    weight = module.weight
    q = quantize_weight(
        weight,
        group_size=config.group_size,
        dtype=weight.dtype,
        search=config.search,
        rank=config.rank,
        int8_activations=config.activations == "int8",
    )
    return W4Linear.from_quantized(q, module.bias, config.group_size, config.kernel, config.activations)
