"""Visual token pruning for VLMs: fewer image and video tokens reach the language model.

`accel.patch(model, prune=PruneConfig(keep=64))` on LLaVA-1.5, LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL.
See `PruneConfig` for the knobs and `accel.pruning.unit` for how it hooks into the model.
"""

from __future__ import annotations

from .._unit import NotApplicable, PatchContext, register
from ..errors import UnsupportedModelError
from .config import PruneConfig
from .errors import PruneError
from .unit import PruneUnit, resolve_score


@register("prune", PruneConfig, order=50)
def install(ctx: PatchContext, config: PruneConfig) -> PruneUnit:
    adapter = ctx.adapter
    if adapter.kind != "vlm":
        raise NotApplicable(f"visual token pruning applies to vision-language models, not to {adapter.display_name}")
    _check_seams(adapter)
    unit = PruneUnit(adapter, config, resolve_score(adapter, config))
    if config.where == "in_lm":
        from .inlm import install_in_lm

        install_in_lm(unit)
    unit.install()
    return unit


def _check_seams(adapter) -> None:
    """The hooks need these modules; an unknown transformers layout fails here, before anything is changed."""
    try:
        adapter.multimodal_model()
        layer = adapter.language_layers()[0]
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "head_dim", "scaling"):
            getattr(attn, name)
        _ = layer.input_layernorm
    except AttributeError as err:
        import transformers

        raise UnsupportedModelError(
            f"visual token pruning does not know this {type(adapter.model).__name__} layout "
            f"(transformers {transformers.__version__}): {err}. Pass prune=False, or use a supported "
            "transformers version (5.x)"
        ) from err


__all__ = ["PruneConfig", "PruneError", "PruneUnit", "install"]
