"""Weights, non-zeros, bytes on disk, side-by-side throughput."""
from __future__ import annotations

import pytest
from _tiny import inputs, tiny_bert

from mergedistill.compress.magnitude import prunable_weights, prune_magnitude
from mergedistill.compress.measure import count_nonzero, count_weights, folder_bytes, throughput, weights_bytes
from mergedistill.compress.quantize import quantize_int8
from mergedistill.compress.structured import prune_neurons

pytestmark = pytest.mark.usefixtures("one_thread")


def test_counts_follow_pruning():
    model = tiny_bert()
    total = count_weights(model)
    assert total == sum(p.numel() for p in model.parameters())  # tied decoder counted once
    nz = count_nonzero(model)
    n = sum(w.numel() for w in prunable_weights(model).values())
    prune_magnitude(model, 0.5)
    assert count_weights(model) == total
    assert nz - count_nonzero(model) == pytest.approx(n / 2, abs=1)
    prune_neurons(model, {0: list(range(32))})
    assert count_weights(model) == total - 32 * 32 * 2 - 32  # intermediate rows + bias, output columns
    q = quantize_int8(tiny_bert())
    assert count_weights(q) == total  # int8 buffers count as weights; the shared table once


def test_bytes_on_disk(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("x" * 100)
    assert folder_bytes(tmp_path / "m") == sum(f.stat().st_size for f in (tmp_path / "m").iterdir())
    assert weights_bytes(tmp_path / "m") == (tmp_path / "m" / "model.safetensors").stat().st_size
    assert weights_bytes(tmp_path / "m") > 4 * count_weights(model) * 0.99  # float32


def test_throughput_side_by_side():
    small, big = tiny_bert(hidden=32, layers=1), tiny_bert(hidden=128, layers=4, intermediate=512)
    calls = {"small": 0, "big": 0}
    for name, m in (("small", small), ("big", big)):
        m.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    batches = [inputs(batch=8, length=32, seed=s) for s in range(2)]
    res = throughput({"small": small, "big": big}, batches, repeats=3, warmup=1)
    assert calls == {"small": 8, "big": 8}  # (1 warm-up + 3 repeats) x 2 batches each
    tokens = sum(int(att.sum()) for _, att in batches)
    assert res["small"]["tokens"] == tokens and len(res["big"]["seconds"]) == len(res["big"]["cpu_seconds"]) == 3
    assert res["small"]["tokens_per_s"] > res["big"]["tokens_per_s"]  # ~20x less work
    assert res["small"]["tokens_per_cpu_s"] > res["big"]["tokens_per_cpu_s"]
    with pytest.raises(ValueError):
        throughput({}, batches)
