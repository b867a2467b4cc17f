"""The gradual pruning schedule of Zhu & Gupta (2017, "To prune, or not to prune"), as pure functions.

Sparsity rises from s_i to s_f over n pruning steps taken every `frequency` optimizer steps:

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))^3,   t in {t_0, t_0 + dt, ..., t_0 + n * dt}

so it prunes fast while many redundant weights remain and slows down as fewer are left. Between two
pruning steps the sparsity stays where the last one put it; before t_0 there is no pruning (s = 0),
after t_0 + n * dt it is s_f.
"""
from __future__ import annotations

from mergedistill.errors import UserError


def check_sparsity(sparsity: float, field: str = "sparsity") -> None:
    """UserError unless 0 <= sparsity < 1. Torch-free, so that config.py can check `compress.sparsity`."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise UserError(f"{field}: {sparsity!r} is outside [0, 1); it is the share of weights set to zero "
                        "(0.5 = half), and 1 would remove them all")


def check_schedule(final_sparsity: float, initial_sparsity: float = 0.0, begin_step: int = 0, end_step: int = 0,
                   frequency: int = 1) -> None:
    """Raise UserError listing every problem with these schedule settings."""
    problems = []
    for name, s in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
        if not 0.0 <= s < 1.0:
            problems.append(f"{name} {s} is outside [0, 1): it is the share of weights set to zero; 1 would remove them all")
    if initial_sparsity > final_sparsity:
        problems.append(f"initial_sparsity {initial_sparsity} is above final_sparsity {final_sparsity}: the schedule only prunes more")
    if begin_step < 0 or end_step < begin_step:
        problems.append(f"steps: need 0 <= begin_step <= end_step, got begin_step {begin_step}, end_step {end_step}")
    if frequency < 1:
        problems.append(f"frequency {frequency}: prune every k >= 1 optimizer steps")
    if problems:
        raise UserError(problems, header="pruning schedule:")


def pruning_steps(begin_step: int, end_step: int, frequency: int = 1) -> list[int]:
    """The optimizer steps at which masks are recomputed: begin, begin + k, ..., and always end_step,
    so the final sparsity is reached exactly at end_step even when k does not divide the span."""
    check_schedule(0.0, 0.0, begin_step, end_step, frequency)
    steps = list(range(begin_step, end_step, frequency))
    return steps + [end_step]


def cubic_sparsity(step: int, final_sparsity: float, initial_sparsity: float = 0.0, begin_step: int = 0,
                   end_step: int = 0, frequency: int = 1) -> float:
    """Target sparsity in force after optimizer step `step` (the value set at the last pruning step
    <= step; 0 before begin_step). With begin_step == end_step it is one-shot: s_f from begin_step on."""
    check_schedule(final_sparsity, initial_sparsity, begin_step, end_step, frequency)
    if step < begin_step:
        return 0.0
    if step >= end_step:
        return final_sparsity
    t = begin_step + ((step - begin_step) // frequency) * frequency  # the last pruning step so far
    progress = (t - begin_step) / (end_step - begin_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3
