"""Gradual magnitude pruning during training, as a Lightning callback (recovery training).

Added to the trainer that continues KD + MLM training of the student on the run's shards (the train
stage's DistillModule, whose HF model is `pl_module.student`), it follows the cubic schedule
(schedule.py): at each pruning step the masks are recomputed by global magnitude at the sparsity then in
force (weights pruned earlier are exact zeros, so they stay pruned), and after every optimizer step the
masks are applied again, so masked weights are exact zeros whenever the model runs, is checkpointed
(ModelCheckpoint runs after other callbacks) or exported.

Why re-zeroing after each step rather than torch.nn.utils.prune's weight_orig * mask reparametrisation:
the model keeps its ordinary parameters (state dict, optimizer state, checkpoints, `masked_logits` and
`save_pretrained` all see a plain model), there is no extra multiply in every forward and backward, and
nothing has to be folded before saving. Step time does not decide it: on the demo student's shape
(2 x 128, vocabulary 32k, batch 32 x 128, 2 threads; `python benchmarks/bench_compress.py`) two runs gave
re-zeroing x1.07 and x1.08 of a dense step, the reparametrisation x1.14 and x1.00, within the noise of
this shared 2-core machine (the dense step itself took 4.8 s in one run and 6.2 s in the other).

A resumed run needs no saved masks: the callback recomputes them at the restored step from the weights,
whose zeros are the pruned ones. Under DDP every rank holds the same weights and computes the same masks
(ties are broken by position).
"""
from __future__ import annotations

import lightning as L
from torch import nn

from mergedistill.compress.magnitude import Masks, apply_masks, global_magnitude_masks, prunable_weights
from mergedistill.compress.schedule import check_schedule, cubic_sparsity


class GradualPruning(L.Callback):
    """Prune `pl_module.<model_attr>` (or the LightningModule itself when it has no such attribute)
    from initial_sparsity to final_sparsity between begin_step and end_step (optimizer steps),
    recomputing masks every `frequency` steps."""

    def __init__(self, final_sparsity: float, end_step: int, begin_step: int = 0, frequency: int = 1,
                 initial_sparsity: float = 0.0, include_embeddings: bool = False, include_head: bool = False,
                 model_attr: str = "student"):
        check_schedule(final_sparsity, initial_sparsity, begin_step, end_step, frequency)
        self.final, self.initial, self.begin, self.end, self.frequency = final_sparsity, initial_sparsity, begin_step, end_step, frequency
        self.include_embeddings, self.include_head, self.model_attr = include_embeddings, include_head, model_attr
        self.sparsity = 0.0  # the sparsity the current masks enforce
        self.masks: Masks = {}
        self._step_done: int | None = None

    def target(self, step: int) -> float:
        return cubic_sparsity(step, self.final, self.initial, self.begin, self.end, self.frequency)

    def model_of(self, pl_module: L.LightningModule) -> nn.Module:
        return getattr(pl_module, self.model_attr, pl_module)

    def _update(self, pl_module: L.LightningModule, step: int) -> None:
        model = self.model_of(pl_module)
        s = self.target(step)
        if s != self.sparsity or (s > 0 and not self.masks):
            self.masks = global_magnitude_masks(prunable_weights(model, self.include_embeddings, self.include_head), s) if s > 0 else {}
            self.sparsity = s
        if self.masks:
            apply_masks(model, self.masks)
        self._step_done = step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(pl_module, trainer.global_step)  # step 0: the initial sparsity; resumed: where it was

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self._step_done:  # an optimizer step happened (not a mere accumulation micro-batch)
            self._update(pl_module, trainer.global_step)
            pl_module.log("prune/sparsity", self.sparsity, batch_size=1)
