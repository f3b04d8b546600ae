"""KL coefficient controllers. Both expose ``value``, ``update(current_kl, n_steps)`` and a
``state_dict`` so that the coefficient is restored exactly on resume."""

from __future__ import annotations


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same interface
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller towards a target KL (Ziegler et al. 2019, eq. 2).

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);  beta <- beta * (1 + K_beta * e_t), K_beta = n / horizon
    where n is the number of samples seen in this iteration.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value = float(kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(kl_coef: float, target: float | None = None, horizon: int = 10000):
    """Adaptive when a target KL is given, fixed otherwise."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
