"""accel's ComfyUI nodes, in both of ComfyUI's node APIs. Imported only by the loader `accel comfy-install` writes
(ComfyUI runs it), so importing `comfy` here is fine.

Each node is described once (`NodeSpec`: id, display name, inputs, outputs, what it runs) and both APIs are built
from that: the V3 schema (`comfy_api.latest`: `io.ComfyNode` classes and `comfy_entrypoint`) where this ComfyUI
has it, else `NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS`. ComfyUI reads NODE_CLASS_MAPPINGS first when a
module has both, so the module exports exactly one of the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..attention.config import AttentionConfig
from ..attention.sparse import SparseConfig
from ..pipelines.comfy_native import find_comfy_adapter
from ..quant.config import QuantConfig
from .attention import apply_attention
from .quant import apply_w4
from .report import report_text
from .step_cache import BALANCED, FAST, StepCacheSettings, apply_step_cache

CATEGORY = "accel"


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple  # (name, type, options): type "MODEL", "FLOAT", "INT", "*" (anything) or a tuple of choices
    outputs: tuple[tuple[str, str], ...]  # (type, name)
    run: Callable  # (**inputs) -> tuple of outputs, or (outputs, ui text) for an output node
    output_node: bool = False


def _step_cache(model, mode, value, start_percent, end_percent, taylor_order, max_consecutive):
    settings = StepCacheSettings(mode, value, start_percent, end_percent, taylor_order, max_consecutive)
    return (apply_step_cache(model, find_comfy_adapter(model.model.diffusion_model), settings),)


def _attention(model, route, dense_first_steps, dense_last_steps, sparse_target, sparse_block_q, sparse_block_k):
    kernel = "sdpa" if route == "sparse" else route
    config = AttentionConfig(kernel=kernel, dense_first_steps=dense_first_steps, dense_last_steps=dense_last_steps)
    sparse = None
    if route == "sparse":
        sparse = SparseConfig(target=sparse_target, block_q=sparse_block_q, block_k=sparse_block_k)
    return (apply_attention(model, find_comfy_adapter(model.model.diffusion_model), config, sparse),)


def _w4(model, group_size, min_features):
    config = QuantConfig(group_size=group_size, min_features=min_features)
    return (apply_w4(model, find_comfy_adapter(model.model.diffusion_model), config),)


def _report(model, after=None):
    text = report_text(model)
    return (text,), text


def _percent(default: float, tooltip: str) -> dict:
    return {"default": default, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip}


STEP_CACHE = NodeSpec(
    "AccelStepCache",
    "Accel Step Cache",
    "Skips the expensive blocks of the diffusion model on steps where its first block barely changed, and "
    "forecasts the output instead (accel's step cache, on ComfyUI's own FLUX, Chroma, Wan, HunyuanVideo, LTX-Video "
    "SD3 and SD1.5/SDXL models). Value 0 changes nothing.",
    (
        (
            "model",
            "MODEL",
            {"tooltip": "The diffusion model to cache (FLUX, Chroma, Wan, HunyuanVideo, LTX-Video, SD3, SD1.5/SDXL)."},
        ),
        (
            "mode",
            ("target", "threshold"),
            {"default": "target", "tooltip": "target: an error budget for the run; threshold: a raw change limit"},
        ),
        (
            "value",
            "FLOAT",
            {
                "default": BALANCED,
                "min": 0.0,
                "max": 10.0,
                "step": 0.01,
                "tooltip": f"target: {BALANCED:g} balanced, {FAST:g} fast; threshold: 0.05-0.2 typical. "
                "0 never reuses a step.",
            },
        ),
        ("start_percent", "FLOAT", _percent(0.1, "Steps before this fraction of the run are always computed.")),
        (
            "end_percent",
            "FLOAT",
            _percent(1.0, "Steps after this fraction are always computed (a threshold: also the last)."),
        ),
        ("taylor_order", "INT", {"default": 2, "min": 0, "max": 3, "tooltip": "Highest forecast order (0: reuse)."}),
        ("max_consecutive", "INT", {"default": 3, "min": 1, "max": 50, "tooltip": "Most reused steps in a row."}),
    ),
    (("MODEL", "model"),),
    _step_cache,
)

ATTENTION = NodeSpec(
    "AccelAttention",
    "Accel Attention",
    "Computes the attention of this model's blocks with accel's route: sdpa (torch's), int8 (INT8 Q·K), or sparse "
    "(block-sparse self and joint attention with a searched pattern; the first quarter of the steps dense). Triton "
    "kernels on CUDA GPUs; on the CPU their PyTorch references, slow, to preview quality. Only this model: "
    "ComfyUI's global attention is untouched. Calls the route does not take (masks, calls outside the blocks, the "
    "dense first/last steps) run ComfyUI's own attention.",
    (
        (
            "model",
            "MODEL",
            {"tooltip": "The diffusion model (FLUX, Chroma, Wan, HunyuanVideo, LTX-Video, SD3, SD1.5/SDXL)."},
        ),
        (
            "route",
            ("int8", "sdpa", "sparse"),
            {"default": "int8", "tooltip": "int8: accel's INT8 attention; sdpa: torch's; sparse: block-sparse."},
        ),
        (
            "dense_first_steps",
            "INT",
            {"default": 0, "min": 0, "max": 1000, "tooltip": "The first steps keep ComfyUI's own attention."},
        ),
        (
            "dense_last_steps",
            "INT",
            {"default": 0, "min": 0, "max": 1000, "tooltip": "The last steps keep ComfyUI's own attention."},
        ),
        (
            "sparse_target",
            "FLOAT",
            {
                "default": SparseConfig.target,
                "min": 0.01,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "sparse: attention mass each query block keeps (1.0 keeps every block).",
            },
        ),
        ("sparse_block_q", "INT", {"default": 128, "min": 16, "max": 256, "step": 16, "tooltip": "sparse: query tile"}),
        ("sparse_block_k", "INT", {"default": 64, "min": 16, "max": 256, "step": 16, "tooltip": "sparse: key tile"}),
    ),
    (("MODEL", "model"),),
    _attention,
)

W4 = NodeSpec(
    "AccelQuantizeW4",
    "Accel W4 Weights",
    "Stores the linear layers of the diffusion model's blocks in 4 bits (accel's W4 layers; embedders and output "
    "layers stay 16-bit) as ComfyUI model patches: the model still loads, offloads, clones and unloads as usual, and "
    "other uses of the same model keep their 16-bit weights. On CUDA GPUs accel's Triton kernels run them; on the "
    "CPU the PyTorch reference (slow, to preview quality).",
    (
        (
            "model",
            "MODEL",
            {"tooltip": "The diffusion model (FLUX, Chroma, Wan, HunyuanVideo, LTX-Video, SD3, SD1.5/SDXL)."},
        ),
        (
            "group_size",
            "INT",
            {"default": 128, "min": 16, "max": 256, "step": 16, "tooltip": "16, 32, 64, 128 or 256 weights per scale"},
        ),
        (
            "min_features",
            "INT",
            {"default": 256, "min": 1, "max": 65536, "tooltip": "Smaller layers stay 16-bit."},
        ),
    ),
    (("MODEL", "model"),),
    _w4,
)

REPORT = NodeSpec(
    "AccelReport",
    "Accel Report",
    "Shows what accel applied to a model and, for each sampling run, the steps computed and reused.",
    (
        ("model", "MODEL", {"tooltip": "The model the sampler ran (or the Accel node's output it came from)."}),
        ("after", "*", {"tooltip": "Connect the sampler's output (or the decoded image): the report waits for it."}),
    ),
    (("STRING", "report"),),
    _report,
    output_node=True,
)

SPECS = (STEP_CACHE, ATTENTION, W4, REPORT)


# -- the legacy API -------------------------------------------------------------------------------------------------


def legacy_node(spec: NodeSpec) -> type:
    def input_types(cls):
        return {
            "required": {
                name: (kind if isinstance(kind, str) else list(kind), opts) for name, kind, opts in spec.inputs
            }
        }

    def run(self, **inputs):
        result = spec.run(**inputs)
        if spec.output_node:
            outputs, text = result
            return {"ui": {"text": [text]}, "result": outputs}
        return result

    return type(
        spec.node_id,
        (),
        {
            "INPUT_TYPES": classmethod(input_types),
            "RETURN_TYPES": tuple(kind for kind, _ in spec.outputs),
            "RETURN_NAMES": tuple(name for _, name in spec.outputs),
            "FUNCTION": "run",
            "CATEGORY": CATEGORY,
            "DESCRIPTION": spec.description,
            "OUTPUT_NODE": spec.output_node,
            "run": run,
        },
    )


def legacy_mappings() -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS."""
    return {s.node_id: legacy_node(s) for s in SPECS}, {s.node_id: s.display_name for s in SPECS}


# -- the V3 API -----------------------------------------------------------------------------------------------------


def _v3_input(io, name: str, kind, opts: dict):
    if not isinstance(kind, str):
        return io.Combo.Input(name, options=list(kind), **opts)
    types = {"MODEL": io.Model, "FLOAT": io.Float, "INT": io.Int, "*": io.AnyType}
    return types[kind].Input(name, **opts)


def v3_node(spec: NodeSpec) -> type:
    from comfy_api.latest import io, ui

    outputs = {"MODEL": io.Model, "STRING": io.String}

    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=CATEGORY,
            description=spec.description,
            inputs=[_v3_input(io, *item) for item in spec.inputs],
            outputs=[outputs[kind].Output(display_name=name) for kind, name in spec.outputs],
            is_output_node=spec.output_node,
        )

    def execute(cls, **inputs):
        result = spec.run(**inputs)
        if spec.output_node:
            values, text = result
            return io.NodeOutput(*values, ui=ui.PreviewText(text))
        return io.NodeOutput(*result)

    node = type(spec.node_id, (io.ComfyNode,), {})
    node.define_schema = classmethod(define_schema)
    node.execute = classmethod(execute)
    return node


def v3_extension():
    from comfy_api.latest import ComfyExtension

    nodes = [v3_node(s) for s in SPECS]

    class AccelExtension(ComfyExtension):
        async def get_node_list(self):
            return nodes

    return AccelExtension()


def has_v3() -> bool:
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    return True


if has_v3():

    async def comfy_entrypoint():
        """ComfyUI's V3 entry point."""
        return v3_extension()

    __all__ = ["comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = legacy_mappings()
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
