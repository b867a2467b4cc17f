"""Keeping the new rows out of the old languages' predictions (optional: extend.guard_positions).

Appending rows leaves every old language's hidden states and logits at the old ids as they were, but
the softmax over all ids now has more entries: at an old position whose head output is x (after the
head's transform) the new ids score z_j = x . e_j + b_j, and the gold token's cross-entropy grows by

    log(1 + sum_j exp(z_j - lse))        lse = logsumexp of the original logits there,

the log of 1 / (1 - the probability mass the new rows take). That increase is the guard's loss: x and
lse are fixed (the student is frozen), so they are computed once, at masked positions of the run's own
shards, and each step adds the mean increase over a sample of them, which only the new rows feel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mergedistill.extend.flops import head_flops, last_layer_flops, layer_flops, shapes_of
from mergedistill.extend.surgery import embedding_output, head_transform, hidden_at, input_matrix, is_xmod, output_bias
from mergedistill.train.batches import Batch


def ce_increase(x: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(M,) the increase of the cross-entropy at M old positions when ids with rows (n, H) and output bias
    (n,) join the softmax. x: (M, H) head outputs (after the transform); lse: (M,) logsumexp of the
    original logits."""
    if rows.shape[0] == 0:
        return x.new_zeros(x.shape[0])
    z = F.linear(x, rows, bias)  # (M, n)
    return F.softplus(torch.logsumexp(z, dim=-1) - lse)


@dataclass
class Guard:
    """Fixed old positions (`old_positions`) and how a step uses them: `batch` of them drawn per step
    (seeded), their mean CE increase weighted `weight`."""
    x: torch.Tensor
    lse: torch.Tensor
    weight: float
    batch: int
    seed: int
    setup_flops: float = 0.0
    """What computing x and lse cost (once)."""

    def sampler(self, device) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        x, lse = self.x.to(device), self.lse.to(device)

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(len(x), (min(self.batch, len(x)),), generator=gen).to(device)
            return x[idx], lse[idx]
        return draw

    def step_flops(self, new_rows: int) -> int:
        """The guard's share of a step: z = x rows^T forward and the rows' gradient (x is fixed)."""
        return 4 * min(self.batch, len(self.x)) * self.x.shape[1] * new_rows


@torch.no_grad()
def old_positions(student, batches: Callable[[int], Batch], n: int, device, lang_table: torch.Tensor | None = None,
                  first_batch: int = 10_000) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x (M, H), lse (M,), FLOPs spent) at M >= min(n, available) masked positions of the batches
    `first_batch`, `first_batch` + 1, ... (the whole student, eval mode)."""
    student.eval()
    xs, lses, flops, b = [], [], 0.0, first_batch
    shapes, layers = shapes_of(student), len(student.base_model.encoder.layer)
    w, bias = input_matrix(student), output_bias(student)
    while sum(len(t) for t in xs) < n:
        batch = batches(b).to(device)
        b += 1
        lang_ids = lang_table.to(device)[batch.seq_lang] if is_xmod(student) else None
        emb = embedding_output(student, F.embedding(batch.input_ids, w), batch.input_ids)
        x = head_transform(student, hidden_at(student, emb, batch.attention_mask, batch.selected, layers, lang_ids))
        xs.append(x.float())
        lses.append(torch.logsumexp(F.linear(x, w, bias).float(), dim=-1))
        bsz, length = batch.input_ids.shape
        m = int(batch.selected.sum())
        last_rows = bsz * int(batch.selected.sum(1).max()) if bsz else 0  # padded as layer_at_positions does
        flops += (layers - 1) * layer_flops(shapes, bsz * length, bsz * length * length) + \
            last_layer_flops(shapes, bsz * length, last_rows, length) + sum(head_flops(shapes, m, w.shape[0]))
        if b - first_batch > 10 * max(1, n):  # no masked positions at all
            break
    return torch.cat(xs)[:n], torch.cat(lses)[:n], flops
