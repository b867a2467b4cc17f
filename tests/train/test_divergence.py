"""The divergence watch (a loss that jumps and stays up is named at once) and the export of the best checkpoint."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from mergedistill.cli import main
from mergedistill.train.divergence import LossWatch
from test_train import prepared, corpora, run_dir, write_config  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _curve(n_down: int = 300, jump_at: int | None = None, jump: float = 0.9, back_after: int | None = None, seed: int = 0):
    """A noisy loss falling from 8 to ~4.7, optionally jumping by `jump` at `jump_at` (and back `back_after` steps later)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_down, generator=g) * 0.15
    out = []
    for s in range(n_down):
        v = 4.7 + 3.3 * math.exp(-s / 40) + float(noise[s])
        if jump_at is not None and s >= jump_at and (back_after is None or s < jump_at + back_after):
            v += jump
        out.append(v)
    return out


def _first(watch: LossWatch, losses):
    for step, v in enumerate(losses):
        hit = watch.update(step, v)
        if hit is not None:
            return hit
    return None


def test_a_loss_that_jumps_and_stays_up_is_caught_with_its_step():
    hit = _first(LossWatch(nats=0.5, patience=100), _curve(600, jump_at=300))
    assert hit is not None
    assert 300 <= hit.step <= 330  # the moving average needs a few steps to climb 0.5 of the 0.9
    assert hit.detected_at == hit.step + 100
    assert hit.best < 4.9 and hit.loss > hit.best + 0.5
    assert "diverged" in hit.message() and f"step {hit.step}" in hit.message() and "train.lr" in hit.message()


def test_a_falling_noisy_loss_and_a_spike_that_recovers_are_not_divergences():
    for seed in range(5):
        assert _first(LossWatch(nats=0.5, patience=100), _curve(600, seed=seed)) is None
        assert _first(LossWatch(nats=0.5, patience=100), _curve(600, jump_at=300, jump=2.0, back_after=60, seed=seed)) is None


def test_the_watch_reports_once():
    w = LossWatch(nats=0.5, patience=10, smoothing=5)
    hits = [w.update(s, v) for s, v in enumerate(_curve(400, jump_at=200))]
    assert sum(h is not None for h in hits) == 1


def _plant_rise(monkeypatch, from_step: int, by: float):
    """Every loss the module computes from optimizer step `from_step` on is `by` nats higher (training and
    validation alike), as a run that diverged there would show."""
    import mergedistill.train.module as module

    real = module.DistillModule.losses

    def losses(self, batch):
        logits, parts = real(self, batch)
        if self.global_step >= from_step:
            parts = {**parts, "loss": parts["loss"] + by}
        return logits, parts

    monkeypatch.setattr(module.DistillModule, "losses", losses)


def test_a_planted_divergence_is_named_and_the_best_checkpoint_exported(run_dir, tiny_teachers, corpora, monkeypatch, caplog):
    _plant_rise(monkeypatch, from_step=12, by=4.0)
    cfg = write_config(run_dir, tiny_teachers, corpora, divergence_nats=2.0, divergence_patience=3)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--config", str(cfg)]) == 0
    assert "the training loss diverged" in caplog.text and "train.lr" in caplog.text
    state = json.loads((run_dir / "runs/t/train/state.json").read_text())
    d = state["exported"]["divergence"]
    assert 12 <= d["step"] <= 14 and d["detected_at"] == d["step"] + 3
    assert state["steps"] == 30  # warn: trained on
    ex = state["exported"]
    assert ex["weights"] == "best" and ex["step"] == 10 and ex["last"]["step"] == 30
    assert ex["val"]["val/loss"] == pytest.approx(ex["score"]) and ex["last"]["val"]["val/loss"] > ex["score"] + 3
    # the exported weights are the best checkpoint's, not the last step's
    best = torch.load(run_dir / "runs/t/train/checkpoints/best-step=10.ckpt", weights_only=True)["state_dict"]
    exported = load_file(run_dir / "runs/t/train/export/model.safetensors")
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(exported[w], best["student." + w].to(exported[w].dtype))
    last = torch.load(run_dir / "runs/t/train/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(exported[w], last["student." + w].to(exported[w].dtype))
    card = (run_dir / "runs/t/train/export/README.md").read_text()
    assert "the best checkpoint, step 10 of 30" in card and "training diverged" in card
    assert json.loads((run_dir / "runs/t/train/export/mergedistill.json").read_text())["exported"]["step"] == 10


def test_stop_on_divergence_and_export_last(run_dir, tiny_teachers, corpora, monkeypatch):
    _plant_rise(monkeypatch, from_step=12, by=4.0)
    cfg = write_config(run_dir, tiny_teachers, corpora, divergence_nats=2.0, divergence_patience=3, on_divergence="stop",
                       export="last")
    assert main(["train", "--config", str(cfg)]) == 0
    state = json.loads((run_dir / "runs/t/train/state.json").read_text())
    assert state["steps"] < 20  # stopped at the divergence, not at max_steps
    assert state["exported"]["weights"] == "last" and state["exported"]["step"] == state["steps"]
    last = torch.load(run_dir / "runs/t/train/checkpoints/last.ckpt", weights_only=True)
    exported = load_file(run_dir / "runs/t/train/export/model.safetensors")
    w = "bert.encoder.layer.0.attention.self.query.weight"
    if last["global_step"] == state["steps"]:
        assert torch.equal(exported[w], last["state_dict"]["student." + w].to(exported[w].dtype))
    card = (run_dir / "runs/t/train/export/README.md").read_text()
    assert "these weights: the last step's" in card and "training diverged" in card


def test_the_evaluation_report_names_the_exported_weights(tmp_path):
    from mergedistill.eval.models import Export

    best = {"weights": "best", "step": 400, "metric": "val/loss", "score": 4.91, "last": {"step": 1200, "val": {}},
            "divergence": {"step": 520, "detected_at": 620, "loss": 5.6, "best": 4.7, "best_step": 250}}
    text = Export("student", tmp_path, {}, {"exported": best}).weights_text()
    assert "the best checkpoint, step 400 of 1200 (val/loss 4.9100)" in text and "training diverged** at step 520" in text
    last = Export("student", tmp_path, {}, {"exported": {"weights": "last", "step": 1200, "last": {"step": 1200, "val": {}}}})
    assert last.weights_text() == "weights: the last step's (1200)"
    assert "before train.export existed" in Export("student", tmp_path, {}, {}).weights_text()
