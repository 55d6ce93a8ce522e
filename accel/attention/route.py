"""One place where a patched model's attention is rerouted: the router.

The router sees every `scaled_dot_product_attention` call made inside the attention modules the adapter
names (`Adapter.attention_sites`) and nowhere else: not in a VAE, a text encoder or another model.

- diffusers: a hook (diffusers' hook registry) on each attention module runs its forward under a
  `TorchFunctionMode` that catches the SDPA call. This covers processors that call SDPA directly
  (SD3, CogVideoX, UNets) and those that go through diffusers' dispatcher with its default "native"
  backend (FLUX, Wan, HunyuanVideo, LTX). The dispatcher itself cannot take a new backend: its
  registry is keyed by a closed enum, so registering there is not possible without patching diffusers.
- transformers: an attention function registered through `AttentionInterface` ("accel") with the SDPA
  mask builder; the model's `attn_implementation` is switched to it and back on removal. The function
  runs transformers' own SDPA integration under the same mode, so GQA, causal flags and masks are
  exactly transformers' own.

Routes compute the calls. Stages (sparse attention) see a call first and may answer it; otherwise the dense
route chosen by `attention=` (the INT8 kernel, SDPA, flash-attn or xFormers) computes it, and SDPA when there
is none. Units plug routes in through the router's methods (`set_dense`, `add_stage`, ...). A route declares
its constraints, functions that name the reason it cannot take a call (or None); the router checks them in
order and counts a failing call under its reason, and the call goes on to the next route.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import _hooks, _private
from .._unit import PatchContext
from ..errors import ModelStateError
from ..pipelines.base import AttentionSite, LatentGrid

HOOK = "accel_attention"
TRANSFORMERS_NAME = "accel"
_SDPA = F.scaled_dot_product_attention


@dataclass
class AttentionCall:
    """One attention call, in SDPA's layout: query [B, H, Sq, D], key/value [B, Hkv, Sk, D]."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    dropout_p: float
    site: AttentionSite
    step: int | None  # denoising step of the current pipeline call (None: bare model or a VLM)
    num_steps: int | None
    branch: str | None  # CFG branch ("cond"/"uncond") when the pipeline names it through cache_context
    text_position: str  # "prefix" | "suffix" | "none" (diffusion transformers), "none" otherwise
    _grid: Callable[[], LatentGrid | None] = field(repr=False, default=lambda: None)

    @property
    def layer(self) -> int:
        return self.site.block

    @property
    def role(self) -> str:
        return self.site.role

    @property
    def grid(self) -> LatentGrid | None:
        """Visual token grid of this denoiser call (computed once per call, on first use)."""
        return self._grid()

    @property
    def text_tokens(self) -> int:
        """Text tokens in the key sequence of a joint attention call (0 otherwise)."""
        grid = self.grid
        if self.role != "joint" or grid is None:
            return 0
        return max(self.key.shape[-2] - grid.tokens, 0)

    def sdpa(self) -> torch.Tensor:
        """The call computed exactly as the model asked for it."""
        return _SDPA(
            self.query,
            self.key,
            self.value,
            attn_mask=self.attn_mask,
            dropout_p=self.dropout_p,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
        )


Constraint = Callable[[AttentionCall], str | None]  # why a route cannot take this call, or None


def _no_reason(call: AttentionCall) -> None:
    return None


def _no_warning(reason: str) -> None:
    pass


@dataclass(eq=False)
class Route:
    """A way to compute attention calls, as the router sees it.

    compute: the call's output, or None to pass it on (a stage only; the dense route answers every call it takes).
    constraints: checked in order before `compute`; the first reason returned declines the call, which the
        router counts in `declined` and hands to `on_decline` (a warning, say).
    exempt: a call this route leaves alone by its own rule rather than by failing (cross-attention for sparse,
        the full-precision policy for the dense route); checked first, counted in `exempted`.
    """

    name: str
    compute: Callable[[AttentionCall], torch.Tensor | None]
    constraints: Sequence[Constraint] = ()
    exempt: Constraint = _no_reason
    on_decline: Callable[[str], None] = _no_warning
    exempted: Counter[str] = field(default_factory=Counter)
    declined: Counter[str] = field(default_factory=Counter)


class _Intercept(TorchFunctionMode):
    """Active only while one attention module runs: hands its SDPA call to the router."""

    def __init__(self, router: AttentionRouter, site: AttentionSite):
        super().__init__()
        self.router, self.site, self.seen = router, site, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            self.seen += 1
            return self.router.dispatch(self.site, *args, **kwargs)
        return func(*args, **kwargs)


class _SiteHook(_hooks.ModelHook):
    def __init__(self, router: AttentionRouter, site: AttentionSite):
        super().__init__()
        self.router, self.site = router, site

    def new_forward(self, module: nn.Module, *args, **kwargs):
        intercept = _Intercept(self.router, self.site)
        with intercept:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if not intercept.seen:
            self.router.note_unrouted(self.site)
        return out


class _DenoiserHook(_hooks.ContextHook):
    """Per denoiser call: forget the cached grid, learn the CFG branch from diffusers' cache_context."""

    def __init__(self, router: AttentionRouter):
        super().__init__()
        self.router = router

    def new_forward(self, module: nn.Module, *args, **kwargs):
        self.router.begin_denoiser_call(args, kwargs, getattr(self.cache_context(), "name", None))
        return self.fn_ref.original_forward(*args, **kwargs)


class AttentionRouter:
    """Reroutes the attention of one patched model; shared by the `attention` and `sparse` units."""

    def __init__(self, ctx: PatchContext):
        self.ctx = ctx
        self.adapter = ctx.adapter
        self.clock = ctx.clock
        self.sites = self.adapter.attention_sites()
        if not self.sites:
            raise ModelStateError(f"{self.adapter.display_name} exposes no attention modules to reroute")
        self._dense: Route | None = None  # None: SDPA as the model asked
        self._stages: list[Route] = []
        self.users = 0
        self.text_position = getattr(getattr(self.adapter, "text_layout", None), "position", "none")
        self._branch: str | None = None
        self._grid_args: tuple | None = None
        self._grid: LatentGrid | None = None
        self._grid_known = False
        self._unrouted: set[str] = set()
        self._hooks: _hooks.HookSet | None = None
        self._saved_implementations: list[tuple[Any, str | None]] = []

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        if self.adapter.kind == "vlm":
            self._install_transformers()
        else:
            self._install_diffusers()

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for config, implementation in reversed(self._saved_implementations):
            _private.restore_attention_implementation(config, implementation)
        self._saved_implementations.clear()
        for site in self.sites:
            site.module.__dict__.pop(_SITE_ATTR, None)

    def _install_diffusers(self) -> None:
        for site in self.sites:
            backend = _private.attention_backend(getattr(site.module, "processor", None))
            if backend not in (None, "native"):
                raise ModelStateError(
                    f"{site.name} uses diffusers attention backend {backend!r}; accel reroutes attention from the "
                    "default backend: call model.reset_attention_backend() first, or leave attention= unset"
                )
        pairs = [(self.ctx.model, _DenoiserHook(self))] + [(site.module, _SiteHook(self, site)) for site in self.sites]
        self._hooks = _hooks.HookSet(self.ctx.model, HOOK, pairs)
        self._hooks.install()

    def _install_transformers(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(TRANSFORMERS_NAME, _transformers_attention)
        AttentionMaskInterface.register(TRANSFORMERS_NAME, sdpa_mask)
        for site in self.sites:
            site.module.__dict__[_SITE_ATTR] = (self, site)
        self._saved_implementations = _private.attention_implementations(self.ctx.model)
        try:
            self.ctx.model.set_attn_implementation(TRANSFORMERS_NAME)
        except Exception:
            self.remove()
            raise

    # -- routes ----------------------------------------------------------------------------------
    def set_dense(self, route: Route) -> None:
        """The route that computes every call no stage answers."""
        self._dense = route

    def reset_dense(self) -> None:
        """Back to SDPA exactly as the model asked."""
        self._dense = None

    @property
    def dense_kernel(self) -> str:
        return self._dense.name if self._dense is not None else "sdpa"

    def add_stage(self, route: Route) -> None:
        """A route offered every call before the dense route, in the order added."""
        self._stages.append(route)

    def remove_stage(self, route: Route) -> None:
        self._stages.remove(route)

    # -- calls -----------------------------------------------------------------------------------
    def begin_denoiser_call(self, args: tuple, kwargs: dict, branch: str | None) -> None:
        self._branch = branch
        self._grid_args = (args, kwargs)
        self._grid_known = False

    def _current_grid(self) -> LatentGrid | None:
        if not self._grid_known:
            self._grid_known = True
            self._grid = None
            if self._grid_args is not None:
                try:
                    self._grid = self.adapter.latent_grid(*self._grid_args)
                except NotImplementedError:
                    self._grid = None
        return self._grid

    def dispatch(
        self,
        site: AttentionSite,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ) -> torch.Tensor:
        call = AttentionCall(
            query,
            key,
            value,
            attn_mask,
            bool(is_causal),
            scale,
            bool(enable_gqa),
            float(dropout_p),
            site,
            self.clock.step,
            self.clock.num_steps if self.clock.available else None,
            self._branch,
            self.text_position if self.adapter.kind == "dit" else "none",
            self._current_grid,
        )
        for route in (*self._stages, self._dense):
            if route is not None:
                out = self._offer(route, call)
                if out is not None:
                    return out
        return call.sdpa()

    @staticmethod
    def _offer(route: Route, call: AttentionCall) -> torch.Tensor | None:
        reason = route.exempt(call)
        if reason is not None:
            route.exempted[reason] += 1
            return None
        for constraint in route.constraints:
            reason = constraint(call)
            if reason is not None:
                route.declined[reason] += 1
                route.on_decline(reason)
                return None
        return route.compute(call)

    def note_unrouted(self, site: AttentionSite) -> None:
        if site.name in self._unrouted:
            return
        self._unrouted.add(site.name)
        message = (
            f"attention: {site.name} made no scaled_dot_product_attention call, so accel did not change it "
            "(its processor uses another attention path)"
        )
        self.ctx.warn_now(message)


# transformers' attention function finds its router from the module it is called with.
# Stored on the module (not in a global table, which would keep the model alive through the router).
_SITE_ATTR = "_accel_attention_site"


def _transformers_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    entry = module.__dict__.get(_SITE_ATTR)
    if entry is None:  # an attention module accel did not patch (e.g. the model was unpatched meanwhile)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    router, site = entry
    with _Intercept(router, site):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def get_or_install(ctx: PatchContext) -> AttentionRouter:
    """The router of the model being patched; created and installed on first use."""
    router = ctx.shared.get("attention_router")
    if router is None:
        router = AttentionRouter(ctx)
        router.install()
        ctx.shared["attention_router"] = router
    router.users += 1
    return router


def release(router: AttentionRouter) -> None:
    """A unit stops using the router; the last one removes it."""
    router.users -= 1
    if router.users == 0:
        router.remove()
        router.ctx.shared.pop("attention_router", None)
