"""Progress lines for Lightning training (progress bars do not show in logs or CI), shared by the
train stage and the demo's teacher pre-training. (Loops outside Lightning use `mergedistill.progress`.)"""
from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks import Callback

from mergedistill.progress import format_duration

log = logging.getLogger("mergedistill")


def writes_logs(module) -> bool:
    """Whether Lightning hands a LightningModule's values logged in this training step to the loggers:
    every `log_every_n_steps` optimizer steps (and when the run stops); what is logged on the other steps
    is replaced unseen by the next step's, so figures only the loggers read can skip those steps (Lightning's
    `self.log` is a long Python path). True outside a Trainer."""
    trainer = module._trainer
    if trainer is None:
        return True
    every = trainer.log_every_n_steps
    return bool(every) and ((module.global_step + 1) % every == 0 or trainer.should_stop)


class TrainProgress(Callback):
    """One log line per interval of a Lightning fit (progress bars do not show in logs or CI): step,
    the mean training loss since the last line, tokens/s and the time left; and one line per
    validation with whatever of val/loss, val/acc, val/agree the module logged. Rank 0 only.

    every_steps / every_s: a line every this many optimizer steps, or at most every this many seconds;
    logger: where the lines go (the caller's module logger)."""

    def __init__(self, label: str, every_steps: int | None = None, every_s: float | None = 20.0,
                 logger: logging.Logger | None = None):
        self.label, self.every_steps, self.every_s = label, every_steps, every_s
        self._log = logger or log
        self._losses: list[float] = []
        self._tokens = 0
        self.total_tokens = 0
        self._t0 = self._t_last = 0.0
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.monotonic()
        self._step0 = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss))
        mask = batch["attention_mask"] if isinstance(batch, dict) else batch.attention_mask
        tokens = int(mask.sum())
        self._tokens += tokens
        self.total_tokens += tokens
        step, now = trainer.global_step, time.monotonic()
        due = (self.every_steps and step % self.every_steps == 0) or (self.every_s and now - self._t_last >= self.every_s)
        if trainer.global_rank != 0 or not (due or step == trainer.max_steps):
            return
        rate = self._tokens / max(now - self._t_last, 1e-9)
        eta = (now - self._t0) / max(step - self._step0, 1) * (trainer.max_steps - step)
        loss_txt = f"loss {sum(self._losses) / len(self._losses):.3f}, " if self._losses else ""
        self._log.info("%s: step %d/%d, %s%s tokens/s, ETA %s", self.label, step, trainer.max_steps, loss_txt, f"{rate:,.0f}",
                 format_duration(eta))
        self._losses.clear()
        self._tokens = 0
        self._t_last = now

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        parts = [f"{name} {float(m[key]):.3f}" for key, name in (("val/loss", "loss"), ("val/acc", "accuracy"),
                                                                   ("val/agree", "agreement with teachers")) if key in m]
        if parts:
            self._log.info("%s: step %d validation: %s", self.label, trainer.global_step, ", ".join(parts))
