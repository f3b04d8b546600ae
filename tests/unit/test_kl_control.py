"""Unit tests for lightning_rlhf.kl_control (fixed and adaptive KL coefficient controllers)."""

from __future__ import annotations

import copy

import pytest

from lightning_rlhf.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def reference_update(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019, eq. 2: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / H)."""
    e = kl / target - 1.0
    if e > 0.2:
        e = 0.2
    if e < -0.2:
        e = -0.2
    return beta * (1.0 + e * n_steps / horizon)


def test_fixed_controller_is_constant():
    ctl = FixedKLController(0.05)
    assert ctl.value == 0.05 and isinstance(ctl.value, float)
    for kl, n in [(0.0, 1), (100.0, 256), (-3.0, 10_000), (6.0, 0)]:
        assert ctl.update(kl, n) is None
        assert ctl.value == 0.05


def test_fixed_controller_casts_int_to_float():
    ctl = FixedKLController(1)
    assert isinstance(ctl.value, float) and ctl.value == 1.0


def test_fixed_controller_state_dict_round_trip():
    ctl = FixedKLController(0.2)
    state = copy.deepcopy(ctl.state_dict())
    assert state == {"value": 0.2}
    other = FixedKLController(0.9)
    other.load_state_dict(state)
    assert other.value == 0.2


def test_adaptive_controller_hand_values():
    # beta0 = 0.1, target = 6, horizon = 10000
    # step 1: kl = 7, n = 256:   e = 7/6 - 1 = 1/6 (inside the clip)
    #         beta = 0.1 * (1 + (1/6) * 256 / 10000) = 0.1 * 1.0042666... = 0.10042666...
    # step 2: kl = 12, n = 512:  e = 12/6 - 1 = 1 -> clipped to 0.2
    #         beta = 0.10042666... * (1 + 0.2 * 0.0512) = 0.10042666... * 1.01024
    # step 3: kl = 0, n = 1000:  e = -1 -> clipped to -0.2
    #         beta = ... * (1 - 0.2 * 0.1) = ... * 0.98
    # step 4: kl = 6 (on target), any n: e = 0 -> unchanged
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(7.0, 256)
    b1 = 0.1 * (1 + (1 / 6) * 256 / 10000)
    assert ctl.value == pytest.approx(b1, rel=1e-12)
    assert ctl.value == pytest.approx(0.10042666666666667, rel=1e-12)
    ctl.update(12.0, 512)
    b2 = b1 * 1.01024
    assert ctl.value == pytest.approx(b2, rel=1e-12)
    ctl.update(0.0, 1000)
    b3 = b2 * 0.98
    assert ctl.value == pytest.approx(b3, rel=1e-12)
    ctl.update(6.0, 5000)
    assert ctl.value == pytest.approx(b3, rel=1e-12)


def test_adaptive_controller_error_is_clipped():
    # any kl above 1.2 * target gives the same (maximal) increase, any kl below 0.8 * target the
    # same (maximal) decrease: beta * (1 +- 0.2 * n / H)
    for kl in (7.2 + 1e-9, 10.0, 1e6):
        ctl = AdaptiveKLController(0.5, target=6.0, horizon=1000)
        ctl.update(kl, 100)
        assert ctl.value == pytest.approx(0.5 * (1 + 0.2 * 0.1), rel=1e-12), kl
    for kl in (4.8 - 1e-9, 1.0, 0.0):
        ctl = AdaptiveKLController(0.5, target=6.0, horizon=1000)
        ctl.update(kl, 100)
        assert ctl.value == pytest.approx(0.5 * (1 - 0.2 * 0.1), rel=1e-12), kl
    # just inside the band the error is proportional: kl = 6.6 -> e = 0.1
    ctl = AdaptiveKLController(0.5, target=6.0, horizon=1000)
    ctl.update(6.6, 100)
    assert ctl.value == pytest.approx(0.5 * (1 + 0.1 * 0.1), rel=1e-12)


def test_adaptive_controller_direction():
    hi = AdaptiveKLController(0.2, target=1.0, horizon=100)
    hi.update(1.5, 10)
    assert hi.value > 0.2  # KL too high -> penalise more
    lo = AdaptiveKLController(0.2, target=1.0, horizon=100)
    lo.update(0.5, 10)
    assert lo.value < 0.2  # KL too low -> penalise less


def test_adaptive_controller_matches_reference_sequence():
    kls = [0.0, 3.1, 5.9, 6.0, 6.5, 7.3, 40.0, 2.0, 6.2, 5.0]
    ns = [64, 128, 256, 1, 512, 64, 2048, 100, 7, 333]
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=4000)
    beta = 0.05
    for kl, n in zip(kls, ns):
        ctl.update(kl, n)
        beta = reference_update(beta, kl, 6.0, 4000, n)
        assert ctl.value == pytest.approx(beta, rel=1e-12)


def test_adaptive_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl, n in [(9.0, 256), (2.0, 128), (6.5, 512)]:
        ctl.update(kl, n)
    state = copy.deepcopy(ctl.state_dict())
    assert state == {"value": ctl.value, "target": 6.0, "horizon": 10000}

    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value  # restored exactly, not approximately
    assert resumed.state_dict() == ctl.state_dict()
    # and both continue identically afterwards
    for kl, n in [(12.0, 64), (5.5, 256)]:
        ctl.update(kl, n)
        resumed.update(kl, n)
        assert resumed.value == ctl.value


def test_make_kl_controller_fixed_when_no_target():
    ctl = make_kl_controller(0.05)
    assert isinstance(ctl, FixedKLController)
    assert ctl.value == 0.05
    ctl = make_kl_controller(0.3, target=None, horizon=123)
    assert isinstance(ctl, FixedKLController)
    assert ctl.value == 0.3


def test_make_kl_controller_adaptive_with_target():
    ctl = make_kl_controller(0.05, target=6.0, horizon=2000)
    assert isinstance(ctl, AdaptiveKLController)
    assert (ctl.value, ctl.target, ctl.horizon) == (0.05, 6.0, 2000)
    default = make_kl_controller(0.05, target=6.0)
    assert isinstance(default, AdaptiveKLController) and default.horizon == 10000
