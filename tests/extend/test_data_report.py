"""The new language's MLM batches (pure functions of (seed, b), replacements among its own ids) and the
report's goal line."""
from __future__ import annotations

import pytest
import torch

from conftest import SENTENCES
from mergedistill.extend.data import mlm_batches
from mergedistill.extend.report import goal_rows, report_md
from mergedistill.tokenizer_train import train_tokenizer
from mergedistill.tokens import MASK_ID


def test_mlm_batches_are_pure_functions_of_the_seed_and_step():
    tok = train_tokenizer("wordpiece", SENTENCES["fr"] * 5, vocab_size=120)
    predicted = torch.zeros(len(tok), dtype=torch.bool)
    predicted[30:60] = True
    lines = SENTENCES["fr"] * 20
    batches = mlm_batches(tok, lines, 24, 0.3, predicted, 6, seed=3)
    a, b, c = batches(5), batches(5), batches(6)
    for x, y in ((a.input_ids, b.input_ids), (a.selected, b.selected), (a.labels, b.labels)):
        assert torch.equal(x, y)
    assert not torch.equal(a.input_ids, c.input_ids) or not torch.equal(a.selected, c.selected)
    assert torch.equal(mlm_batches(tok, lines, 24, 0.3, predicted, 6, seed=3)(5).input_ids, a.input_ids)
    assert a.labels.numel() == int(a.selected.sum()) and a.topk_ids.shape == (a.labels.numel(), 0)
    # a selected token is masked, kept, or replaced by one of the language's own ids
    big = mlm_batches(tok, lines, 24, 0.5, predicted, 64, seed=0)(0)
    seen = big.input_ids[big.selected]
    replaced = seen[(seen != MASK_ID) & (seen != big.labels)]
    assert replaced.numel() > 0 and bool(predicted[replaced].all())


def _result(values, flops, seconds, setup=0.0):
    n = len(values)
    return {"trainable": 10, "steps": 10 * n, "seconds": seconds[-1], "flops": flops[-1], "setup_flops": setup,
            "curve": {"steps": [10 * (i + 1) for i in range(n)], "flops": flops, "seconds": seconds, "values": values},
            "test": {"acc_own": values[-1], "acc_all": values[-1] / 2, "pll_per_word": -5.0}}


def test_goal_line_finds_the_first_point_within_a_point_of_full():
    results = {"full": _result([0.10, 0.20, 0.30], [100.0, 200.0, 300.0], [1.0, 2.0, 3.0]),
               "minipost": _result([0.15, 0.295, 0.31], [40.0, 80.0, 120.0], [0.5, 1.0, 1.5], setup=50.0),
               "minijoint": _result([0.1, 0.2, 0.25], [40.0, 80.0, 120.0], [0.5, 1.0, 1.5])}
    rows = {r[0]: r for r in goal_rows(results)}
    assert rows["minipost"][1] == pytest.approx(0.29)  # full's last point minus 1 point
    assert rows["minipost"][2] == 20 and rows["minipost"][5] == "3.75x" and rows["minipost"][6] == "2.31x"
    assert rows["minijoint"][2] == "not reached"
    md = report_md("# h", results, {}, "minipost", "defs")
    assert "minipost (exported)" in md and "3.75x" in md
