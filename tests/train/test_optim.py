"""The one AdamW grouping rule and the one warmup/decay schedule."""
from __future__ import annotations

import pytest
import torch

from mergedistill.train.optim import adamw, warmup_linear


def test_warmup_linear():
    f = lambda s: warmup_linear(s, warmup=4, total=14)  # noqa: E731
    assert f(0) == pytest.approx(0.25) and f(2) == pytest.approx(0.75)
    assert f(3) == 1.0 and f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == 0.0 and f(20) == 0.0
    assert warmup_linear(0, warmup=0, total=10) == 1.0  # no warmup: full rate from the first step


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[2].weight.requires_grad_(False)  # frozen parameters stay out
    opt = adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].bias), id(model[2].bias)}
