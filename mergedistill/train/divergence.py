"""The divergence watch: a training loss that jumps and stays up is said at once, not found afterwards.

`LossWatch` is the pure rule (a list of losses in, a verdict out), `DivergenceWatch` the Lightning callback
that feeds it every optimizer step's training loss and says what happened: one warning with the step the
rise began, the lowest smoothed loss and where, and what to try; with `train.on_divergence: stop` it ends
training there (the export then takes the best checkpoint, with `train.export: best`).

The rule: an exponential moving average of the loss (span `smoothing` steps: batches mix languages whose
losses differ, so single steps are noisy) that stays more than `nats` above its lowest value for
`patience` consecutive steps. A loss that rises and comes back within `patience` steps is a spike, not a
divergence (the watch forgets it)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import lightning as L

log = logging.getLogger(__name__)

SMOOTHING = 50
"""Steps of the moving average's span (its weight is 2 / (span + 1))."""


@dataclass
class Divergence:
    step: int
    """The optimizer step at which the smoothed loss first rose `nats` above its minimum (and stayed)."""
    detected_at: int
    """The step at which it had stayed up `patience` steps (when the watch said so)."""
    loss: float
    """The smoothed loss at detection."""
    best: float
    """The lowest smoothed loss before it."""
    best_step: int

    def message(self, label: str = "train") -> str:
        return (f"{label}: the training loss diverged: its moving average rose from {self.best:.3f} (step {self.best_step}) "
                f"to {self.loss:.3f} at step {self.step} and stayed up through step {self.detected_at}. Try a lower "
                "train.lr (e.g. a third), a longer train.warmup_steps, or train.precision: 32-true; with train.export: best "
                "the exported weights are the best validated checkpoint's")

    def as_dict(self) -> dict:
        return {"step": self.step, "detected_at": self.detected_at, "loss": self.loss, "best": self.best, "best_step": self.best_step}


@dataclass
class LossWatch:
    """Feed `update(step, loss)` once per optimizer step; it returns a `Divergence` once, when one is seen."""
    nats: float
    patience: int
    smoothing: int = SMOOTHING
    ema: float | None = None
    best: float = math.inf
    best_step: int = -1
    above_since: int | None = None
    found: Divergence | None = field(default=None)

    def update(self, step: int, loss: float) -> Divergence | None:
        if self.found is not None:
            return None
        if not math.isfinite(loss):  # non-finite losses stop training elsewhere (NonFiniteLoss)
            return None
        w = 2.0 / (self.smoothing + 1)
        self.ema = loss if self.ema is None else (1 - w) * self.ema + w * loss
        # the minimum counts once the average has seen a span of steps: its first values are the first losses
        warm = step >= self.smoothing
        if warm and self.ema < self.best:
            self.best, self.best_step = self.ema, step
        if warm and self.ema > self.best + self.nats:
            if self.above_since is None:
                self.above_since = step
            elif step - self.above_since >= self.patience:
                self.found = Divergence(self.above_since, step, self.ema, self.best, self.best_step)
                return self.found
        else:
            self.above_since = None
        return None


class DivergenceWatch(L.Callback):
    """Watches every optimizer step's training loss (rank 0 decides; with `stop`, every rank stops)."""

    def __init__(self, nats: float, patience: int, stop: bool, label: str = "train", logger: logging.Logger | None = None):
        # the average's span: SMOOTHING steps, or less for a short patience (it must not outlast the rise it waits for)
        self.watch = LossWatch(nats, patience, smoothing=min(SMOOTHING, max(1, patience // 2)))
        self.stop, self.label = stop, label
        self._log = logger or log

    @property
    def found(self) -> Divergence | None:
        return self.watch.found

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        hit = self.watch.update(trainer.global_step, float(loss)) if loss is not None else None
        if hit is not None:
            self._log.warning("%s%s", hit.message(self.label), "; stopping (train.on_divergence: stop)" if self.stop else "")
        if self.stop:
            diverged = trainer.strategy.reduce_boolean_decision(hit is not None, all=False)
            if diverged:
                trainer.should_stop = True

    def state_dict(self) -> dict:
        w = self.watch
        return {"ema": w.ema, "best": w.best, "best_step": w.best_step, "above_since": w.above_since,
                "found": w.found.as_dict() if w.found else None}

    def load_state_dict(self, state: dict) -> None:
        w = self.watch
        w.ema, w.best, w.best_step, w.above_since = state["ema"], state["best"], state["best_step"], state["above_since"]
        w.found = Divergence(**state["found"]) if state.get("found") else None


class ValidationHistory(L.Callback):
    """Every validation's figures by step ({step: {"val/...": value}}), rank 0: what the export says about the
    checkpoint it takes, and the curve a reader checks for a run that got worse."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.by_step[int(trainer.global_step)] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def state_dict(self) -> dict:
        return {"by_step": {str(k): v for k, v in self.by_step.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.by_step = {int(k): v for k, v in state.get("by_step", {}).items()}
