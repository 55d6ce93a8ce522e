"""accel's attention routes on ComfyUI's native models, through ComfyUI's per-model attention override
(`transformer_options["optimized_attention_override"]`), never by replacing ComfyUI's global attention function.

The override sees every attention call of the patched clone as ComfyUI's attention functions get it (q, k, v as
[B, N, heads*D], or [B, heads, N, D] with `skip_reshape`) and hands it to accel's dense route (`DenseAttention`:
"sdpa" or "int8", with its precision policy). Calls the route declines or leaves alone by rule (a mask, a call
outside the blocks, the policy's first/last steps) go back to ComfyUI's own attention function, exactly as without
the node. An APPLY_MODEL wrapper tells the route the step, from ComfyUI's sigma schedule (one host sync per
denoiser call, only when a step policy is set).
"""

from __future__ import annotations

import logging
from collections import Counter

from ..attention.config import AttentionConfig
from ..attention.dense import DenseAttention
from ..attention.route import AttentionCall
from ..attention.sparse import SparseConfig
from ..pipelines.base import AttentionSite
from ..pipelines.comfy_native import ComfyDiTAdapter
from .sparse import SparseStage
from .step_cache import branch_name

KEY = "accel_attention"
OVERRIDE = "optimized_attention_override"


class AttentionSession:
    """The attention route of one patched clone (shared by its later clones, as the step cache's session is)."""

    def __init__(self, adapter: ComfyDiTAdapter, config: AttentionConfig, previous=None, sparse: SparseConfig = None):
        self.adapter = adapter
        self.family = adapter.display_name
        self.text_position = adapter.text_layout.position
        self.names_blocks = adapter.names_blocks
        starts, total = {}, 0
        for name, blocks in zip(adapter.block_patch_names, adapter.block_lists()):
            starts[name.split("_")[0]] = total  # ComfyUI's block_type ("double", "single") -> first block number
            total += len(blocks)
        self.block_starts = starts
        self.warnings: list[str] = []
        self.dense = DenseAttention(config, self._warn, total)
        self.previous = previous  # an override another node set: declined calls still go through it
        self.sparse = SparseStage(sparse, self._warn) if sparse is not None else None  # instead of the dense route
        self.step: int | None = None
        self.num_steps: int | None = None
        self.grid = None  # sparse: the latent's token grid and the CFG branch of the current denoiser call
        self.branch = "default"
        self.calls_in_step = 0  # attention calls so far in the current denoiser call
        self.back_to_comfyui: Counter[str] = Counter()

    def __deepcopy__(self, memo):
        return self

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            logging.warning("accel: %s", message)

    # -- ComfyUI hooks --------------------------------------------------------------------------------------------

    def apply_model(
        self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw
    ):
        """Knows the step of each denoiser call, for the policy's dense first/last steps."""
        cfg, options = self.dense.config, transformer_options or {}
        sigmas = options.get("sample_sigmas")
        if (cfg.dense_first_steps or cfg.dense_last_steps or self.sparse) and sigmas is not None:
            self.num_steps = max(1, len(sigmas) - 1)
            self.step = int((sigmas - t.flatten()[0].to(sigmas)).abs().argmin())
        self.calls_in_step = 0
        if self.sparse is not None:
            self.grid = self.adapter.latent_grid((x,), {})
            self.branch = branch_name(options.get("cond_or_uncond"))
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        finally:
            self.step = self.num_steps = self.grid = None

    def override(self, func, *args, **kwargs):
        """ComfyUI's attention override: (its attention function, then that function's arguments)."""
        out = self._route(*args, **kwargs)
        if out is not None:
            return out
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    # -- one call -------------------------------------------------------------------------------------------------

    def _back(self, reason: str) -> None:
        self.back_to_comfyui[reason] += 1

    def _route(
        self, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kw
    ):
        options = kw.get("transformer_options") or {}
        self.calls_in_step += 1
        if mask is not None:
            return self._back("a mask (ComfyUI computes it)")
        if kw.get("var_length") or getattr(q, "is_nested", False) or q.ndim != (4 if skip_reshape else 3):
            return self._back("a layout accel does not take")
        block_type, index = options.get("block_type"), options.get("block_index")
        if block_type in self.block_starts and index is not None:
            block, name = self.block_starts[block_type] + index, f"{block_type}_blocks.{index}"
        elif not self.names_blocks:  # every attention call is in a block, but which one is not said: its position
            block, name = -1, f"attention call {self.calls_in_step}"
        else:
            return self._back("outside the blocks")
        if not skip_reshape:
            # [B, N, heads*D]; MMDiT passes v as [B, N, heads, D], which ComfyUI's functions reshape alike
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.text_position == "none":
            role = "self" if k.shape[-2] == q.shape[-2] else "cross"
        else:
            role = "joint"
        site = AttentionSite(name, None, block, role)
        call = AttentionCall(
            q, k, v, None, False, None, False, 0.0, site, self.step, self.num_steps, None, self.text_position
        )
        if self.sparse is not None:
            out, reason = self.sparse.offer(call, self.branch, self.grid)
            if out is None:
                return self._back(reason)
            return out if skip_output_reshape else out.transpose(1, 2).flatten(-2)
        route = self.dense.route
        reason = route.exempt(call)
        if reason is not None:
            route.exempted[reason] += 1
            return self._back(reason)
        for constraint in route.constraints:
            reason = constraint(call)
            if reason is not None:
                route.declined[reason] += 1
                route.on_decline(reason)
                return self._back(reason)
        out = route.compute(call)
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).flatten(-2)

    # -- what happened --------------------------------------------------------------------------------------------

    def describe(self) -> str:
        if self.sparse is not None:
            c = self.sparse.config
            return (
                f"sparse attention on {self.family} (mass target {c.target}, {c.block_q}x{c.block_k} blocks, first "
                f"{c.dense_fraction:.0%} of steps and cross-attention by ComfyUI)"
            )
        cfg = self.dense.config
        policy = []
        if cfg.dense_first_steps or cfg.dense_last_steps:
            policy.append(f"first {cfg.dense_first_steps} / last {cfg.dense_last_steps} steps by ComfyUI")
        extra = f" ({'; '.join(policy)})" if policy else ""
        return f"{cfg.kernel} attention on {self.family}{extra}"

    def stats(self) -> dict:
        stats = self.dense.stats()
        stats["back_to_comfyui"] = dict(self.back_to_comfyui)
        stats["warnings"] = list(self.warnings)
        if self.sparse is not None:
            stats["kernel"] = "sparse"
            stats["sparse"] = self.sparse.stats()
        return stats


def apply_attention(model_patcher, adapter: ComfyDiTAdapter, config: AttentionConfig, sparse: SparseConfig = None):
    """A clone of `model_patcher` whose attention calls go through accel's route (an earlier Accel Attention
    replaced, another node's override kept behind it). With `sparse`, self and joint attention run block-sparse
    instead of `config`'s dense route."""
    import comfy.patcher_extension as ext

    clone = model_patcher.clone()
    options = clone.model_options["transformer_options"]
    previous = options.get(OVERRIDE)
    if isinstance(getattr(previous, "__self__", None), AttentionSession):
        previous = previous.__self__.previous
    session = AttentionSession(adapter, config, previous, sparse)
    options[OVERRIDE] = session.override
    clone.remove_wrappers_with_key(ext.WrappersMP.APPLY_MODEL, KEY)
    clone.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, KEY, session.apply_model)
    clone.set_attachments(KEY, session)
    return clone
