"""The cubic sparsity schedule (Zhu & Gupta 2017)."""
from __future__ import annotations

import pytest

from mergedistill.compress.schedule import cubic_sparsity, pruning_steps
from mergedistill.errors import UserError


def test_endpoints_and_before_the_start():
    kw = dict(final_sparsity=0.8, initial_sparsity=0.1, begin_step=10, end_step=110, frequency=10)
    assert cubic_sparsity(0, **kw) == 0.0  # not started: no pruning yet
    assert cubic_sparsity(9, **kw) == 0.0
    assert cubic_sparsity(10, **kw) == pytest.approx(0.1)  # s_i at t_0
    assert cubic_sparsity(110, **kw) == pytest.approx(0.8)  # s_f at t_0 + n dt
    assert cubic_sparsity(10_000, **kw) == pytest.approx(0.8)


def test_hand_computed_midpoint():
    # s_t = s_f + (s_i - s_f) (1 - t/n)^3 = 0.8 - 0.8 * 0.5^3 = 0.7 at t = 50 of 100
    assert cubic_sparsity(50, 0.8, 0.0, 0, 100, 1) == pytest.approx(0.7)
    # a quarter of the way with s_i = 0.2: 0.9 + (0.2 - 0.9) * 0.75^3 = 0.6046875
    assert cubic_sparsity(25, 0.9, 0.2, 0, 100, 5) == pytest.approx(0.6046875)


def test_monotone_and_constant_between_pruning_steps():
    kw = dict(final_sparsity=0.9, initial_sparsity=0.0, begin_step=0, end_step=100, frequency=10)
    values = [cubic_sparsity(t, **kw) for t in range(0, 131)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[10] == values[19] != values[20]  # held until the next pruning step
    assert values[13] == pytest.approx(0.9 - 0.9 * 0.9 ** 3)
    # fast at first, slow at the end: the first tenth prunes more than the last
    assert values[10] - values[0] > values[100] - values[90]


def test_pruning_steps_end_on_the_last_step():
    assert pruning_steps(0, 100, 25) == [0, 25, 50, 75, 100]
    assert pruning_steps(5, 12, 3) == [5, 8, 11, 12]  # k does not divide the span: the end still prunes
    assert cubic_sparsity(12, 0.5, 0.0, 5, 12, 3) == pytest.approx(0.5)
    assert pruning_steps(7, 7, 1) == [7]  # one-shot


@pytest.mark.parametrize("kw, fragment", [
    (dict(final_sparsity=1.0), "outside [0, 1)"),
    (dict(final_sparsity=-0.1), "outside [0, 1)"),
    (dict(final_sparsity=0.5, initial_sparsity=0.6), "above final_sparsity"),
    (dict(final_sparsity=0.5, begin_step=10, end_step=5), "begin_step <= end_step"),
    (dict(final_sparsity=0.5, end_step=5, frequency=0), "frequency"),
])
def test_bad_settings_are_user_errors(kw, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        cubic_sparsity(3, **kw)
