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
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fuse: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (weights of linear layers and
    embeddings), none on biases and LayerNorm parameters (1-D tensors). `fuse`: torch's fused kernel
    where `can_fuse` says it applies (a Lightning module passes `not scales_gradients(self)` and clips
    with `clip_gradients`)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps, fused=(fuse and can_fuse(decay + no_decay)) or None)


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating point, all on the CPU or all
    on one CUDA device. It updates every tensor in one pass; torch's default on the CPU is a Python loop
    over tensors, ~8x slower (the demo student's update timed alone: 30 ms -> 3.6 ms; `make bench-loss`
    measures whole steps with each). Elsewhere (other devices, mixed placements) the default stays."""
    devices = {p.device for p in params}
    return bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and \
        all(p.is_floating_point() for p in params)


def scales_gradients(module) -> bool:
    """Whether a LightningModule's Trainer scales its gradients (fp16 mixed precision's GradScaler). Lightning
    unscales them before clipping only for optimizers that do not unscale themselves, which the fused
    kernel does: there the loop AdamW is kept. False outside a Trainer."""
    trainer = module._trainer
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None


def clip_gradients(module, optimizer: torch.optim.Optimizer, value: float | None, algorithm) -> None:
    """A LightningModule's `configure_gradient_clipping`: Lightning's own clipping (by norm, or by value),
    done here because its mixed-precision plugin refuses any optimizer able to unscale gradients (the
    fused AdamW) even under bf16, which has nothing to unscale. With a GradScaler, Lightning's path."""
    if not value:
        return
    if scales_gradients(module):
        module.clip_gradients(optimizer, value, algorithm)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if getattr(algorithm, "value", algorithm) == "value":  # Lightning passes its GradClipAlgorithmType (a str enum)
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)


def linear_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_linear` as a scheduler, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear(s, warmup, total))


def with_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> dict:
    """Lightning's `configure_optimizers` answer: `opt` with `linear_schedule`, stepped per optimizer step."""
    return {"optimizer": opt, "lr_scheduler": {"scheduler": linear_schedule(opt, warmup, total), "interval": "step"}}
