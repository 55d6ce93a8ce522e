"""The cache's decision logic in isolation, on synthetic signals."""

import pytest
import torch

from accel.caching.config import CacheConfig
from accel.caching.controller import CacheController, relative_l1
from accel.caching.forecast import (
    SAMPLED,
    DeviceScalar,
    ErrorModel,
    TaylorForecast,
    extrapolate,
    forecast_error,
    sample,
)


def test_extrapolation_is_exact_for_polynomials_of_its_order():
    def poly(x):
        return torch.full((3,), 2.0 + 0.5 * x - 0.25 * x * x)

    points = [(s, (poly(s),)) for s in (1, 3, 4)]
    assert torch.allclose(extrapolate(points, 7)[0], poly(7))
    linear = [(s, (torch.full((2,), 3.0 * s),)) for s in (2, 5)]
    assert torch.allclose(extrapolate(linear, 9)[0], torch.full((2,), 27.0))
    assert extrapolate(linear[-1:], 9)[0] is linear[-1][1][0]


def test_relative_l1_and_device_scalar():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])
    assert DeviceScalar(relative_l1((a,), (b,))).get() == pytest.approx(0.25)


def test_error_model_estimates_what_each_order_would_miss():
    """Head and cached values on the same quadratic trajectory: each order's estimate, from the head's check at
    the previous step carried over by the spread, matches that order's actual forecast error."""

    def quadratic(step):
        return (torch.full((3,), 100.0 + 0.5 * step + 0.1 * step * step),)

    forecast, errors = TaylorForecast(max_order=2), ErrorModel(max_order=2)
    for step in (0, 2, 4, 5):  # computed steps
        errors.check_head(step, quadratic(step))
        errors.read(upto=step - 1)  # a lagged decision reads the previous step's check
        if forecast.has_values():
            errors.check_values(step, forecast.errors(step, quadratic(step), quadratic(step)))
        errors.computed(step, quadratic(step))
        forecast.update(step, quadratic(step))
    errors.check_head(6, quadratic(6))
    errors.read(upto=6)
    estimates = errors.estimates(8, forecast.orders())
    actual = [float(forecast_error(forecast.forecast(8, k), quadratic(8), quadratic(8))) for k in range(3)]
    assert estimates[2] == pytest.approx(0.0, abs=1e-6) and actual[2] == pytest.approx(0.0, abs=1e-6)
    for k in (0, 1):
        assert estimates[k] == pytest.approx(actual[k], rel=0.15), (k, estimates, actual)


def test_error_model_is_uncalibrated_until_a_computed_step_was_checked():
    errors = ErrorModel(max_order=1)
    assert errors.estimates(3, 0) == []
    errors.check_head(0, (torch.ones(2),))  # nothing stored yet: no check
    errors.computed(0, (torch.ones(2),))
    errors.check_head(1, (torch.full((2,), 2.0),))
    errors.read(upto=1)
    assert errors.estimates(2, 1) == [None]  # the head was checked, the cached values not yet
    errors.check_values(1, [torch.tensor(0.25)])
    errors.read(upto=1)
    assert errors.estimates(2, 1) == [pytest.approx(0.25 * 2)]  # ratio 0.25 / 0.5 of a head error 0.5 per step


def test_sample_keeps_a_strided_copy_of_a_large_head():
    big = torch.arange(3 * SAMPLED, dtype=torch.float32)
    (kept,) = sample((big,))
    assert kept.numel() == SAMPLED and kept[1] == 3 and kept.data_ptr() != big.data_ptr()
    small = torch.ones(5)
    assert sample((small, None)) == (small, None)


def _run(controller, features, names=("cond",)):
    """Drive a controller through one call; returns per-branch reuse flags."""
    controller.begin_call()
    flags = {name: [] for name in names}
    for feature in features:
        for name in names:
            controller.enter(name, num_steps=len(features), managed=True)
            reuse = controller.decide((feature,))
            if not reuse:
                controller.store((feature * 2,), reference=(feature * 3,))
            else:
                controller.cached()
            flags[name].append(reuse)
            controller.exit()
    controller.end_call()
    return flags


def _smooth(n=20):
    return [torch.full((4,), 1.0 + 0.01 * s) for s in range(n)]


def test_warmup_final_steps_and_max_consecutive_are_always_computed():
    config = CacheConfig(threshold=100.0, warmup=3, cooldown=2, max_consecutive=2)
    flags = _run(CacheController(config), _smooth())["cond"]
    assert flags[:3] == [False] * 3 and flags[-2:] == [False, False]
    run = longest = 0
    for f in flags:
        run = run + 1 if f else 0
        longest = max(longest, run)
    assert longest == 2


def test_default_cooldown_computes_the_last_step_with_a_threshold_only():
    # A smooth trajectory: everything after warm-up could be reused, so only the cooldown keeps the last step.
    with_threshold = _run(CacheController(CacheConfig(threshold=100.0, max_consecutive=100)), _smooth())["cond"]
    with_target = _run(CacheController(CacheConfig(target=100.0, max_consecutive=100)), _smooth())["cond"]
    assert with_threshold[-1] is False and with_threshold[-2] is True
    assert with_target[-1] is True
    assert CacheConfig(target=1.0, cooldown=1).cooldown_steps(20) == 1


def test_lagged_and_current_decisions_differ_only_by_one_step_of_signal():
    # A jump at step 10: "current" sees it at step 10, "lagged" one step later.
    features = [torch.ones(4) * (1.0 if s < 10 else 5.0) for s in range(16)]
    cfg = dict(threshold=0.5, warmup=2, cooldown=1, max_consecutive=100)
    current = _run(CacheController(CacheConfig(decision="current", **cfg)), features)["cond"]
    lagged = _run(CacheController(CacheConfig(decision="lagged", **cfg)), features)["cond"]
    assert current[10] is False and lagged[10] is True and lagged[11] is False


def test_branches_have_independent_state_and_calls_reset():
    controller = CacheController(CacheConfig(threshold=0.5))
    first = _run(controller, _smooth(), names=("cond", "uncond"))
    assert first["cond"] == first["uncond"]
    again = _run(controller, _smooth(), names=("cond", "uncond"))
    assert again == first
    stats = controller.calls[-1].branches
    assert set(stats) == {"cond", "uncond"} and stats["cond"].steps == 20


def test_target_mode_needs_calibration_and_respects_the_budget():
    controller = CacheController(CacheConfig(target=0.05, max_consecutive=100))
    _run(controller, _smooth())
    stats = controller.calls[-1].branches["cond"]
    assert "calibrating error estimate" in stats.reasons or stats.computed[:2] == [0, 1]
    assert stats.estimated_error <= 0.05 + 1e-9


def test_auto_branches_for_a_bare_model_from_repeated_timesteps():
    controller = CacheController(CacheConfig(threshold=0.5))
    seen = []
    for _call in range(2):
        for t in (900.0, 600.0, 300.0):
            for _ in range(2):  # cond then uncond, same timestep
                controller.enter(None, timestep=torch.tensor([t]))
                seen.append(sorted(controller.calls[-1].branches))
                controller.exit()
    assert len(controller.calls) == 2
    assert seen[-1] == ["branch1", "default"]


def test_statistics_of_a_long_running_process_stay_bounded():
    from accel.caching.controller import MAX_CALLS_KEPT

    controller = CacheController(CacheConfig(threshold=0.5))
    for _ in range(MAX_CALLS_KEPT + 5):
        _run(controller, _smooth(4))
    assert len(controller.calls) == MAX_CALLS_KEPT
