"""Step caching on ComfyUI's native DiTs, with `accel.caching`'s controller deciding when to reuse.

Everything is registered on one `ModelPatcher` clone, under the key "accel_step_cache":
- an OUTER_SAMPLE wrapper brackets each sampling run: a fresh `CacheController` for the run's step count;
- an APPLY_MODEL wrapper brackets each denoiser call, naming the CFG branch from ComfyUI's `cond_or_uncond`
  (cond and uncond batched together are one branch, "cond+uncond"; run separately they are two);
- block patches in `transformer_options["patches_replace"]["dit"]`: the head block measures how much its residual
  moved and asks the controller; on a reused step the tail blocks hand their inputs through unchanged;
- a DIFFUSION_MODEL wrapper stores the denoiser's output at computed steps and returns the controller's Taylor
  forecast of it at reused steps (accel's `forecast="output"`); for a model whose forward runs no such wrappers
  (MMDiT) an object patch of `diffusion_model.forward` does the same.

The session object that holds the controller is reached only through these registrations. `ModelPatcher.clone()`
deep-copies model options (where the block patches live) and copies wrapper lists, so the session declares itself
shared (`__deepcopy__` returns it): a clone made from the patched clone runs the same session, and every sampling
run starts from fresh state anyway.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from ..caching.config import CacheConfig
from ..caching.controller import CacheController
from ..pipelines.comfy_native import ComfyDiTAdapter, ComfyUNetAdapter
from ..presets import preset_configs

KEY = "accel_step_cache"
RUNS_KEPT = 20  # a long-running ComfyUI keeps the statistics of its latest runs only
BRANCH_NAMES = {0: "cond", 1: "uncond"}  # ComfyUI's COND and UNCOND in cond_or_uncond
BALANCED, FAST = (preset_configs(name)["cache"].target for name in ("balanced", "fast"))  # accel.patch's budgets


@dataclass(frozen=True)
class StepCacheSettings:
    """The node's inputs. `mode` "target": an error budget for the run (accel's presets `BALANCED`, the default, and
    `FAST`); "threshold": reuse while the head's accumulated relative change stays below `value`. 0 never reuses.
    Steps before `start_percent` of the run (at least 3) and after `end_percent` are computed; at 1.0 the end is
    as `accel.patch` has it (CacheConfig's default cooldown: the last step computed with a threshold only)."""

    mode: str = "target"
    value: float = BALANCED
    start_percent: float = 0.1
    end_percent: float = 1.0
    taylor_order: int = 2
    max_consecutive: int = 3

    def config(self, num_steps: int) -> CacheConfig:
        """accel's CacheConfig for a run of `num_steps` (CacheConfig checks every value)."""
        warmup = math.ceil(self.start_percent * num_steps)
        cooldown = math.ceil((1.0 - self.end_percent) * num_steps - 1e-9) or None
        budget = {"target": self.value} if self.mode == "target" else {"threshold": self.value}
        return CacheConfig(
            **budget,
            taylor_order=self.taylor_order,
            max_consecutive=self.max_consecutive,
            warmup=warmup,
            cooldown=cooldown,
            num_steps=num_steps,
        )

    def describe(self) -> str:
        return (
            f"{self.mode}={self.value}, steps {self.start_percent:.0%}-{self.end_percent:.0%} may be reused, "
            f"taylor_order={self.taylor_order}, max_consecutive={self.max_consecutive}"
        )


def branch_name(cond_or_uncond) -> str:
    if not cond_or_uncond:
        return "default"
    return "+".join(BRANCH_NAMES.get(int(c), f"cond{int(c)}") for c in cond_or_uncond)


class StepCacheSession:
    """The cache of one patched clone: its settings, the current run's controller, the finished runs."""

    def __init__(self, adapter: ComfyDiTAdapter | ComfyUNetAdapter, settings: StepCacheSettings):
        self.family = adapter.display_name
        if adapter.kind == "unet":
            self.head_text = f"the stem and input block {adapter.head_block} run every step"
        else:
            self.head_text = f"1 of {len(adapter.block_keys())} blocks runs every step"
        self.settings = settings
        settings.config(10)  # a bad value fails when the node runs, not in the middle of sampling
        self.controller: CacheController | None = None
        self.runs: deque[dict] = deque(maxlen=RUNS_KEPT)
        self.head_in = None

    def __deepcopy__(self, memo):
        return self  # shared by the clones of the patched clone, see the module docstring

    # -- ComfyUI wrappers ---------------------------------------------------------------------------------------

    def outer_sample(self, executor, *args, **kwargs):
        """One sampling run: `CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, ...)`."""
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        num_steps = max(1, int(sigmas.shape[-1]) - 1)
        controller = CacheController(self.settings.config(num_steps))
        controller.begin_call()
        self.controller = controller
        start = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            controller.end_call()
            self.controller = None
            self.head_in = None
            run = controller.calls[-1].to_dict()
            run["seconds"] = time.perf_counter() - start
            self.runs.append(run)

    def apply_model(
        self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw
    ):
        """One denoiser call (`BaseModel.apply_model`, the same signature in every family)."""
        controller = self.controller
        if controller is None:  # called outside a sampling run: no step to cache
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        controller.enter(branch_name((transformer_options or {}).get("cond_or_uncond")), managed=True)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        finally:
            controller.exit()

    def diffusion_model(self, executor, *args, **kwargs):
        """The denoiser's output: stored at a computed step, forecast at a reused one."""
        try:
            output = executor(*args, **kwargs)
        except SkipRest:  # a UNet stopped after its head: the step is reused
            output = None
        controller = self.controller
        if controller is None or not controller.active:
            return output
        if controller.reusing:
            (forecast,) = controller.cached()
            return forecast.clone()  # ComfyUI may work on it in place
        controller.store((output.detach(),), reference=(output,))
        return output

    # -- block patches ------------------------------------------------------------------------------------------

    def head(self, args: dict, run_block, start: bool, end: bool) -> dict:
        controller = self.controller
        if controller is None or not controller.active:
            return run_block(args)
        if start:
            self.head_in = args["img"].clone()  # ComfyUI's blocks add their residual to the stream in place
        out = run_block(args)
        if end:
            # The head's residual is what moves when a step matters; the raw stream also carries the slow input.
            controller.decide((out["img"] - self.head_in,))
        return out

    def tail(self, args: dict, run_block) -> dict:
        controller = self.controller
        if controller is not None and controller.reusing:
            return {name: args[name] for name in ("img", "txt") if name in args}
        return run_block(args)

    # -- what happened ------------------------------------------------------------------------------------------

    def describe(self) -> str:
        return f"step cache on {self.family}: {self.head_text}, output forecast; {self.settings.describe()}"


class SkipRest(Exception):
    """Raised by the UNet head patch on a reused step, caught by the DIFFUSION_MODEL wrapper: ComfyUI's UNet forward
    has no block replacement, so the rest of a reused step is skipped by leaving the forward."""


class UNetHeadPatch:
    """An "input_block_patch" (called after every input block of ComfyUI's UNet): records the head block's input,
    measures its residual, and ends a reused step there."""

    def __init__(self, session: StepCacheSession, head_block: int):
        self.session, self.head_block = session, head_block

    def __call__(self, h, transformer_options):
        session, block = self.session, transformer_options.get("block")
        if session.controller is None or not session.controller.active:
            return h
        if block == ("input", self.head_block - 1):
            session.head_in = h.clone()
        elif block == ("input", self.head_block):
            session.controller.decide((h - session.head_in,))
            if session.controller.reusing:
                raise SkipRest
        return h


class BlockPatch:
    """One block's entry in patches_replace["dit"]. Deep-copied with the model options; the session is shared."""

    def __init__(self, session: StepCacheSession, index: int, previous=None):
        self.session, self.index = session, index
        self.previous = previous  # a patch another node had put on this block: it still runs, inside ours

    def __call__(self, args: dict, extra: dict) -> dict:
        def run_block(block_args):
            if self.previous is not None:
                return self.previous(block_args, extra)
            return extra["original_block"](block_args)

        if self.index == 0:
            return self.session.head(args, run_block, start=True, end=True)
        return self.session.tail(args, run_block)


def apply_step_cache(model_patcher, adapter: ComfyDiTAdapter | ComfyUNetAdapter, settings: StepCacheSettings):
    """A clone of `model_patcher` with the step cache registered on it (an earlier Accel Step Cache replaced)."""
    import comfy.patcher_extension as ext

    session = StepCacheSession(adapter, settings)
    clone = model_patcher.clone()
    wrappers = {
        ext.WrappersMP.OUTER_SAMPLE: session.outer_sample,
        ext.WrappersMP.APPLY_MODEL: session.apply_model,
        ext.WrappersMP.DIFFUSION_MODEL: session.diffusion_model,
    }
    for kind, wrapper in wrappers.items():
        clone.remove_wrappers_with_key(kind, KEY)
        clone.add_wrapper_with_key(kind, KEY, wrapper)
    if adapter.kind == "unet":
        patches = clone.model_options["transformer_options"].get("patches", {})
        if "input_block_patch" in patches:  # an earlier Accel Step Cache's patch goes, others stay
            kept = [p for p in patches["input_block_patch"] if not isinstance(p, UNetHeadPatch)]
            clone.model_options["transformer_options"]["patches"] = {**patches, "input_block_patch": kept}
        clone.set_model_input_block_patch(UNetHeadPatch(session, adapter.head_block))
        clone.set_attachments(KEY, session)
        return clone
    replaced = clone.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for index, key in enumerate(adapter.block_keys()):
        previous = replaced.get(key)
        if isinstance(previous, BlockPatch):  # an earlier Accel Step Cache: replace it, keep what it wrapped
            previous = previous.previous
        clone.set_model_patch_replace(BlockPatch(session, index, previous), "dit", key[0], key[1])
    if not adapter.output_wrapper:
        forward = type(adapter.model).forward.__get__(adapter.model)
        clone.add_object_patch("diffusion_model.forward", ForwardPatch(session, forward))
    clone.set_attachments(KEY, session)
    return clone


class ForwardPatch:
    """The diffusion model's forward as an object patch, for models that run no DIFFUSION_MODEL wrappers."""

    def __init__(self, session: StepCacheSession, forward):
        self.session, self.forward = session, forward

    def __call__(self, *args, **kwargs):
        return self.session.diffusion_model(self.forward, *args, **kwargs)
