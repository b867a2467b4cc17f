"""MiniPost's mini-model (Marchisio et al., Findings of ACL 2023): the student's first k layers, frozen,
and a small head on top, trained on the student's own languages so that layer k's states map onto the
student's output embeddings (the head's decoder is the student's embedding matrix, frozen too).

The head has the student's head's shape and starts as a copy of it (`train.mini_head.MiniHead`);
its transform and output bias are all that train. Nothing below the head trains, so the k layers run
without gradients: the alignment costs k layers' forward and the head's forward and backward.
"""
from __future__ import annotations

from typing import Callable

import torch

from mergedistill.extend.adapt import TrainResult, train_loop
from mergedistill.extend.flops import shapes_of, step_flops
from mergedistill.extend.surgery import hidden_at, input_matrix, is_xmod
from mergedistill.train.batches import Batch, batch_loss
from mergedistill.train.mini_head import MiniHead


def mini_logits(student, head: MiniHead, batch: Batch, lang_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(N, V) the mini-model's logits at the masked positions: the student's first `head.layer` layers
    (no gradients) and the head."""
    with torch.no_grad():
        embedded = student.base_model.embeddings(input_ids=batch.input_ids)
        hidden = hidden_at(student, embedded, batch.attention_mask, batch.selected, head.layer, lang_ids)  # (N, H)
    return head(hidden, input_matrix(student).detach())


def align_mini_head(student, k: int, batches: Callable[[int], Batch], *, steps: int, lr: float, warmup: int, alpha: float,
                    temperature: float, device, lang_table: torch.Tensor | None = None, seed: int = 0) -> tuple[MiniHead, TrainResult]:
    """A head on the student's first k layers, trained `steps` steps with the train stage's loss on the
    run's own batches. lang_table: X-Mod students, the module index of each batch language."""
    student.requires_grad_(False)
    head = MiniHead.from_student(student, k).to(device)
    shapes = shapes_of(student)
    v = input_matrix(student).shape[0]

    def lang_ids(batch: Batch) -> torch.Tensor | None:
        return lang_table.to(batch.seq_lang.device)[batch.seq_lang] if is_xmod(student) else None

    def step(batch: Batch) -> torch.Tensor:
        logits = mini_logits(student, head, batch, lang_ids(batch))
        return batch_loss(logits, batch, alpha, temperature)["loss"]

    def flops(batch: Batch) -> int:
        b, length = batch.input_ids.shape
        return step_flops(shapes, batch=b, length=length, masked=int(batch.labels.numel()), layers=k, v_out=v,
                          decoder_trained=False, body_trained=False, head_trained=True, input_trained=False,
                          last_rows=b * int(batch.selected.sum(1).max()) if b else 0)

    student.train()
    result = train_loop(list(head.named_parameters()), step, batches, flops, steps=steps, lr=lr, warmup=warmup,
                        weight_decay=0.0, device=device, label=f"extend mini-model head (first {k} layers)", seed=seed)
    student.eval()
    return head.eval(), result
