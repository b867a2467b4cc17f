"""AdamW with the usual weight-decay groups, and the linear warmup / linear decay schedule: one copy,
used by the train stage, downstream fine-tuning and the demo's teacher pre-training."""
from __future__ import annotations

from typing import Iterable

import torch


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup to 1 over `warmup` steps, then
    linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def adamw(named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (weights of linear layers and
    embeddings), none on biases and LayerNorm parameters (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)


def linear_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_linear` as a scheduler, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear(s, warmup, total))


def with_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> dict:
    """Lightning's `configure_optimizers` answer: `opt` with `linear_schedule`, stepped per optimizer step."""
    return {"optimizer": opt, "lr_scheduler": {"scheduler": linear_schedule(opt, warmup, total), "interval": "step"}}
