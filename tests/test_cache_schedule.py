"""Which steps the cache reuses and what it forecasts them with, on synthetic trajectories: CFG branches share one
schedule, a target reuses where the forecast is estimated to be right, and a reused step is forecast at order 1
where the trajectory is smooth and by plain reuse where it is not."""

import torch

from accel.caching.config import CacheConfig
from accel.caching.controller import CacheController

STEPS = 20


def _drive(config, trajectories, heads=None):
    """One call through the controller. `trajectories`: branch -> the exact cached value at each step (the head sees
    the same values unless `heads` gives its own). Returns branch -> [(reused, relative error of what it got)]."""
    controller = CacheController(config)
    controller.begin_call()
    heads = heads or trajectories
    out = {name: [] for name in trajectories}
    for step in range(STEPS):
        for name, values in trajectories.items():
            controller.enter(name, num_steps=STEPS, managed=True)
            reuse = controller.decide((heads[name][step],))
            if reuse:
                (got,) = controller.cached()
                error = float((got - values[step]).abs().sum() / values[step].abs().sum())
            else:
                controller.store((values[step],), reference=(values[step],))
                error = 0.0
            out[name].append((reuse, error))
            controller.exit()
    controller.end_call()
    return out, controller.calls[-1]


def _line(step):
    return torch.tensor([10.0 + step, 5.0 - 0.5 * step, 3.0])


def _bumpy(step):
    """A line with an irregular stretch at steps 8-12, where no forecast can follow."""
    bump = [0.0, 3.0, -2.0, 4.0, -3.0][step - 8] if 8 <= step <= 12 else 0.0
    return _line(step) + torch.tensor([bump, -bump, bump])


def test_cfg_branches_share_one_schedule():
    """The first branch to reach a step decides it for the other: a change threshold that only the second branch's
    signal would exceed does not split the schedule."""
    smooth = [torch.full((4,), 1.0 + 0.001 * s) for s in range(STEPS)]
    jumpy = [torch.full((4,), 1.0 + 0.5 * (s % 2)) for s in range(STEPS)]
    flags, call = _drive(CacheConfig(threshold=0.1, max_consecutive=2), {"cond": smooth, "uncond": jumpy})
    assert [r for r, _ in flags["cond"]] == [r for r, _ in flags["uncond"]]
    assert call.branches["uncond"].reused and call.branches["uncond"].reused == call.branches["cond"].reused
    # the other way round the jumpy branch leads, and nothing is reused after the warm-up's forecasts fail
    flags, call = _drive(CacheConfig(threshold=0.1, max_consecutive=2), {"uncond": jumpy, "cond": smooth})
    assert not call.branches["cond"].reused
    assert call.branches["cond"].reasons.get("computed with another branch", 0) > 0


def test_a_target_reuses_where_the_forecast_is_estimated_right():
    """On a line with an irregular stretch, a target reuses on the line (forecast exactly, at order 1) and computes
    the stretch. (Decisions from this step's head: a lagged one would see the stretch a step late.)"""
    values = [_bumpy(s) for s in range(STEPS)]
    flags, call = _drive(CacheConfig(target=0.5, max_consecutive=3, decision="current"), {"cond": values})
    reused = [s for s, (r, _) in enumerate(flags["cond"]) if r]
    assert len(reused) >= 6
    assert not set(reused) & {9, 10, 11, 12, 13}
    # on the line, away from the stretch's points, forecast at order 1: exactly
    assert all(error < 1e-5 for step, (r, error) in enumerate(flags["cond"]) if r and not 9 <= step <= 15)
    assert call.branches["cond"].estimated_error <= 0.5


def test_order_follows_the_trajectory():
    """A line is forecast at order 1, exactly; on noise, extrapolating would amplify it, and the reused steps get
    about what repeating the last computed value (order 0) gives."""
    line = [_line(s) for s in range(STEPS)]
    flags, _ = _drive(CacheConfig(threshold=10.0, max_consecutive=1), {"cond": line})
    assert any(r for r, _ in flags["cond"]) and all(e < 1e-5 for r, e in flags["cond"] if r)

    gen = torch.Generator().manual_seed(0)
    noisy = [10.0 + 0.5 * torch.randn(64, generator=gen) for _ in range(STEPS)]
    flags, _ = _drive(CacheConfig(threshold=10.0, max_consecutive=2), {"cond": noisy})
    got, order0, order1 = [], [], []
    computed = []
    for step, (reused, error) in enumerate(flags["cond"]):
        if not reused:
            computed.append(step)
            continue
        a, b = computed[-2], computed[-1]
        line_through = noisy[b] + (noisy[b] - noisy[a]) * (step - b) / (b - a)
        got.append(error)
        order0.append(float((noisy[b] - noisy[step]).abs().sum() / noisy[step].abs().sum()))
        order1.append(float((line_through - noisy[step]).abs().sum() / noisy[step].abs().sum()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert len(got) >= 5 and mean(order0) < mean(order1) and mean(got) < (mean(order0) + mean(order1)) / 2


def test_a_larger_target_reuses_more_within_its_budget():
    values = [_line(s) + torch.sin(torch.tensor(0.4 * s)) for s in range(STEPS)]
    reused = []
    for target in (0.0, 0.01, 0.1, 1.0):
        _, call = _drive(CacheConfig(target=target, max_consecutive=3), {"cond": values})
        stats = call.branches["cond"]
        assert stats.estimated_error <= target + 1e-9
        reused.append(len(stats.reused))
    assert reused == sorted(reused) and reused[0] == 0 and reused[-1] > reused[1]


def test_warmup_computes_at_least_three_steps():
    """Three computed steps before the first reuse: an order-1 forecast has been checked once."""
    assert CacheConfig(warmup=0).warmup_steps(STEPS) == 3
    assert CacheConfig(warmup=0.1).warmup_steps(50) == 5


def test_the_comfy_nodes_schedule_ends_as_accel_patch_does():
    """The ComfyUI node at its defaults computes the same warm-up and final steps as the `balanced` preset; a
    threshold keeps its final step, and `end_percent` below 1 computes the steps after it."""
    from accel.comfy.step_cache import StepCacheSettings
    from accel.presets import preset_configs

    n = 20
    preset, node = preset_configs("balanced")["cache"], StepCacheSettings().config(n)
    assert (node.target, node.warmup_steps(n), node.cooldown_steps(n)) == (preset.target, 3, 0)
    assert preset.cooldown_steps(n) == 0
    assert StepCacheSettings(mode="threshold", value=0.1).config(n).cooldown_steps(n) == 1
    assert StepCacheSettings(end_percent=0.8).config(n).cooldown_steps(n) == 4
