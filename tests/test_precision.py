"""`auto` precision picks bfloat16 only where the hardware computes it natively."""
from __future__ import annotations

import torch

from mergedistill import precision


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)  # e.g. an AVX2-only CPU
    assert precision.lightning_precision("auto", "cpu") == "32-true"
    assert precision.torch_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # AVX512-BF16 / AMX
    assert precision.lightning_precision("auto", "cpu") == "bf16-mixed"
    assert precision.torch_dtype("auto", "cpu") == torch.bfloat16
    assert precision.lightning_precision("auto", "gpu") == "bf16-mixed" and precision.torch_dtype("auto", "cuda") == torch.bfloat16


def test_explicit_settings_pass_through(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.lightning_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert precision.lightning_precision("32-true", "gpu") == "32-true"
    assert precision.torch_dtype("bfloat16", "cpu") == torch.bfloat16 and precision.torch_dtype("float16", "cuda") == torch.float16
