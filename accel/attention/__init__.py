"""Attention: accel's INT8 kernel and the route that puts it (or SDPA, flash-attn, xFormers) into a model.

`accel.patch(pipe, attention="int8")` or `attention=AttentionConfig(...)`; the kernels are also usable
directly (`int8_attention`, with `int8_attention_reference` beside it).
"""

from __future__ import annotations

from .._unit import NotApplicable, PatchContext, Unit, register
from ..errors import ConfigError
from ..report import Report
from .config import KERNELS, AttentionConfig
from .int8 import int8_attention, int8_attention_reference


class AttentionUnit(Unit):
    def __init__(self, router, dense):
        self.router, self.dense = router, dense

    def describe(self) -> str:
        cfg = self.dense.config
        sites = self.router.sites
        roles = ", ".join(sorted({s.role for s in sites}))
        policy = []
        if cfg.dense_blocks:
            policy.append(f"blocks {list(cfg.dense_blocks)} in full precision")
        if cfg.dense_first_steps or cfg.dense_last_steps:
            policy.append(f"first {cfg.dense_first_steps} / last {cfg.dense_last_steps} steps in full precision")
        if cfg.dense_roles:
            policy.append(f"roles {list(cfg.dense_roles)} in full precision")
        extra = f"; {'; '.join(policy)}" if policy else ""
        return f"{cfg.kernel} attention on {len(sites)} attention modules ({roles}){extra}"

    def remove(self) -> None:
        from . import route

        self.router.reset_dense()
        route.release(self.router)

    def update_report(self, report: Report) -> None:
        report.stats["attention"] = self.dense.stats()


def _kernel_name(value):
    # accel.patch(attention="int8") is AttentionConfig(kernel="int8")
    return AttentionConfig(kernel=value) if isinstance(value, str) else value


@register("attention", AttentionConfig, order=20, parse=_kernel_name, accepts="a kernel name: " + ", ".join(KERNELS))
def install(ctx: PatchContext, config: AttentionConfig) -> AttentionUnit:
    from . import route
    from .dense import DenseAttention, check_available

    problem = check_available(config.kernel)
    if problem is not None:
        raise NotApplicable(problem)
    if (config.dense_first_steps or config.dense_last_steps) and not ctx.clock.available:
        ctx.warn(
            "attention: dense_first_steps/dense_last_steps need a patched pipeline; a bare model has no step count"
        )
    router = route.get_or_install(ctx)
    num_blocks = 1 + max(site.block for site in router.sites if site.role != "vision")
    try:
        dense = DenseAttention(config, ctx.warn_now, num_blocks)
    except ConfigError:
        route.release(router)
        raise
    router.set_dense(dense.route)
    return AttentionUnit(router, dense)


__all__ = ["AttentionConfig", "AttentionUnit", "install", "int8_attention", "int8_attention_reference"]
