"""Learning-rate schedules: a function of the step, nothing stored."""
from __future__ import annotations

SCHEDULES = ("constant", "linear")


def learning_rate(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """constant: base_lr. linear: decays from base_lr to 0 over total_steps (MeZO's choice)."""
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {SCHEDULES}")
