"""GradualPruning with the train stage's own LightningModule: the schedule's sparsity holds after
training steps, masked weights stay zero, and training still lowers the loss."""
from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from _tiny import VOCAB, tiny_bert

from mergedistill.compress.callback import GradualPruning
from mergedistill.compress.magnitude import prunable_weights
from mergedistill.config import TrainConfig
from mergedistill.train.batches import Batch
from mergedistill.train.module import DistillModule

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed: int, rows: int = 8, length: int = 16, k: int = 4) -> Batch:
    """A learnable shard-like batch: each sequence counts up from a random start, so a masked token is
    its left neighbour + 1; the 'teacher' puts most of its mass on that token."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(5, VOCAB - length, (rows, 1), generator=g)
    gold = start + torch.arange(length)  # (B, L)
    selected = torch.rand(rows, length, generator=g) < 0.2
    selected[:, 0] = False
    selected[:, 3] = True
    ids = gold.masked_fill(selected, 4)  # 4 plays [MASK]
    labels = gold[selected]
    n = labels.numel()
    topk_ids = torch.stack([labels] + [torch.randint(5, VOCAB, (n,), generator=g) for _ in range(k - 1)], 1)
    topk_logits = torch.tensor([4.0, 1.0, 0.5, 0.0]).expand(n, k).clone()
    return Batch(ids, torch.ones_like(ids), selected, labels, topk_ids, topk_logits, torch.zeros(n, dtype=torch.long),
                 torch.zeros(rows, dtype=torch.long))


def module(max_steps: int) -> DistillModule:
    train = TrainConfig(alpha=0.5, temperature=1.0, lr=3e-3, warmup_steps=5, max_steps=max_steps, weight_decay=0.01, seed=0,
                        softmax="all")  # synthetic ids: no vocabulary
    return DistillModule(types.SimpleNamespace(train=train), tiny_bert().train(), ["xx"])  # dropout on, as in training


def eval_loss(student, batches) -> float:
    from mergedistill.models.mlm import masked_logits
    from mergedistill.train.losses import distill_loss

    was = student.training
    student.eval()
    with torch.no_grad():
        out = [distill_loss(masked_logits(student, b.input_ids, b.attention_mask, b.selected), b.labels, b.topk_ids,
                            b.topk_logits, 0.5, 1.0)["loss"] for b in batches]
    student.train(was)
    return float(torch.stack(out).mean())


def fit(mod: DistillModule, cb: GradualPruning, batches: list[Batch], steps: int, accumulate: int = 1) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], accumulate_grad_batches=accumulate, num_sanity_val_steps=0)
    data = [batches[i % len(batches)] for i in range(steps * accumulate)]
    trainer.fit(mod, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def zeros_and_total(student) -> tuple[int, int]:
    ws = prunable_weights(student).values()
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def test_gradual_pruning_reaches_the_sparsity_and_training_still_learns():
    batches = [batch(s) for s in range(4)]
    mod = module(max_steps=60)
    before = eval_loss(mod.student, batches)
    seen = []

    class Watch(L.Callback):  # after every optimizer step (GradualPruning ran first): exact zeros where masked
        def on_train_batch_end(self, trainer, pl_module, *args):
            z, n = zeros_and_total(pl_module.student)
            seen.append((trainer.global_step, z / n, cb.sparsity))
            assert all(int((w[~cb.masks[k]] != 0).sum()) == 0 for k, w in prunable_weights(pl_module.student).items()) if cb.masks else True

    cb = GradualPruning(final_sparsity=0.6, begin_step=0, end_step=40, frequency=10)
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb, Watch()], num_sanity_val_steps=0)
    data = [batches[i % 4] for i in range(60)]
    trainer.fit(mod, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))

    zeros, total = zeros_and_total(mod.student)
    assert zeros == round(0.6 * total)  # exactly the final sparsity, 20 steps after the last pruning step
    targets = {step: s for step, _, s in seen}
    assert targets[10] == pytest.approx(0.6 - 0.6 * 0.75 ** 3) and targets[9] == 0.0 and targets[40] == 0.6
    for step, actual, target in seen:  # the schedule's sparsity holds after every step (not just at pruning steps)
        assert actual == pytest.approx(target, abs=1.0 / total)
    after = eval_loss(mod.student, batches)
    assert after < before - 0.5, (before, after)  # measured: 4.12 -> 3.23 (3.19 with no pruning)


def test_masks_hold_under_gradient_accumulation_and_after_the_end():
    batches = [batch(s) for s in range(2)]
    mod = module(max_steps=12)
    cb = GradualPruning(final_sparsity=0.5, begin_step=2, end_step=6, frequency=2)
    trainer = fit(mod, cb, batches, steps=12, accumulate=2)
    assert trainer.global_step == 12
    zeros, total = zeros_and_total(mod.student)
    assert zeros == round(0.5 * total)


def test_one_shot_at_the_start_and_resumed_masks_come_from_the_weights():
    batches = [batch(s) for s in range(2)]
    mod = module(max_steps=5)
    cb = GradualPruning(final_sparsity=0.3, begin_step=0, end_step=0)  # one-shot before the first step
    fit(mod, cb, batches, steps=5)
    zeros, total = zeros_and_total(mod.student)
    assert zeros == round(0.3 * total)
    # a fresh callback (as after --resume) recomputes the same masks from the zeros in the weights
    fresh = GradualPruning(final_sparsity=0.3, begin_step=0, end_step=0)
    fresh._update(mod, 5)
    assert all(torch.equal(fresh.masks[k], cb.masks[k]) for k in cb.masks)
