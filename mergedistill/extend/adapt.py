"""Learning a new language's parameters: what one method trains (`Adapter`) and the training loop.

An Adapter holds the frozen student, the new rows (`surgery.NewRows`) and, for the mini-model methods,
a depth k and a mini head (`train.mini_head.MiniHead`): its training forward runs the student's first k
layers and that head, its evaluation forward (`full=True`) always the whole student, which is the
plugged student's computation. For the X-Mod method the new language's module trains too.

The loop is a plain one (AdamW groups and warmup/decay from train.optim, losses from train.losses): one
method on one CPU or GPU needs nothing of Lightning. It measures the wall time of the training steps
themselves (batch reading and the learning curve's evaluations excluded), adds up the estimated FLOPs
of each step (extend.flops), and evaluates a learning curve every `eval_every` steps.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mergedistill.extend.flops import shapes_of, step_flops
from mergedistill.extend.guard import Guard, ce_increase
from mergedistill.extend.surgery import (
    NewRows,
    bias_at,
    depth,
    embedding_output,
    head_transform,
    hidden_at,
    input_matrix,
    is_xmod,
    lookup,
    output_bias,
)
from mergedistill.train.batches import Batch
from mergedistill.train.losses import distill_loss
from mergedistill.train.optim import adamw, linear_schedule

log = logging.getLogger(__name__)


class Adapter(nn.Module):
    def __init__(self, student, rows: NewRows, *, mini_head=None, k: int | None = None, lang_id: int | None = None,
                 train_module: str | None = None):
        """student: frozen (its X-Mod module `train_module`, if given, trains); mini_head and k: the
        mini-model (its first k layers and the head) the training forward runs; lang_id: X-Mod's module
        index of the new language."""
        super().__init__()
        self.student, self.rows, self.mini_head = student, rows, mini_head
        self.k = k if mini_head is not None else depth(student)
        self.lang_id = lang_id
        student.requires_grad_(False)
        if mini_head is not None:
            mini_head.requires_grad_(False)
        if train_module is not None:
            for layer in student.base_model.encoder.layer:
                layer.output.adapter_modules[train_module].requires_grad_(True)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def logits(self, batch: Batch, out_ids: torch.Tensor | None, full: bool = False) -> torch.Tensor:
        """(N, V_out) logits at the masked positions over `out_ids` (None: every id, old and new)."""
        student = self.student
        ids, att = batch.input_ids, batch.attention_mask
        w_old = input_matrix(student)
        embedded = embedding_output(student, lookup(w_old, self.rows.rows, ids), ids)  # (B, L, H)
        lang_ids = torch.full((ids.shape[0],), self.lang_id, dtype=torch.long, device=ids.device) if is_xmod(student) else None
        mini = self.mini_head is not None and not full
        hidden = hidden_at(student, embedded, att, batch.selected, self.k if mini else depth(student), lang_ids)  # (N, H)
        x = self.mini_head.transform(hidden) if mini else head_transform(student, hidden)
        b_old = self.mini_head.bias if mini else output_bias(student)
        if out_ids is None:
            w = torch.cat([w_old, self.rows.rows])
            b = torch.cat([b_old, self.rows.bias])
        else:
            w, b = lookup(w_old, self.rows.rows, out_ids), bias_at(b_old, self.rows.bias, out_ids)
        return F.linear(x, w, b)


def columns(out_ids: torch.Tensor | None, size: int) -> torch.Tensor:
    """(size,) long: the output column of each student id (-1 where it is not predicted)."""
    if out_ids is None:
        return torch.arange(size)
    col = torch.full((size,), -1, dtype=torch.long)
    col[out_ids.cpu()] = torch.arange(len(out_ids))
    return col


def loss_of(logits: torch.Tensor, batch: Batch, col: torch.Tensor, alpha: float, temperature: float) -> dict:
    """KD + MLM (`train.losses.distill_loss`) with the batch's student ids turned into output columns;
    teacher predictions outside the columns drop out (-inf)."""
    col = col.to(logits.device)
    labels = col[batch.labels]
    if not bool((labels >= 0).all()):
        raise ValueError(f"a gold token outside the ids the language predicts: {batch.labels[labels < 0][:5].tolist()}")
    if batch.topk_ids.shape[1] == 0 or alpha == 0.0:
        return distill_loss(logits, labels, None, None, 0.0, temperature)
    t_ids = col[batch.topk_ids]
    t_logits = batch.topk_logits.float().masked_fill(t_ids < 0, float("-inf"))
    return distill_loss(logits, labels, t_ids.clamp(min=0), t_logits, alpha, temperature)


@dataclass
class Curve:
    """Learning-curve points: after `step` steps, `flops` and `seconds` spent training, the metric."""
    steps: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, flops: float, seconds: float, value: float) -> None:
        self.steps.append(step)
        self.flops.append(flops)
        self.seconds.append(seconds)
        self.values.append(value)

    def first_reaching(self, target: float) -> int | None:
        """Index of the first point whose value is at least `target`, or None."""
        return next((i for i, v in enumerate(self.values) if v >= target), None)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    flops: float
    first_loss: float
    last_loss: float
    curve: Curve


def train_loop(params: list[tuple[str, nn.Parameter]], step_fn: Callable[[Batch], torch.Tensor], batches: Callable[[int], Batch],
               flops_fn: Callable[[Batch], int], *, steps: int, lr: float, warmup: int, weight_decay: float, device,
               label: str, curve_fn: Callable[[], float] | None = None, eval_every: int = 0, clip: float = 1.0,
               seed: int = 0) -> TrainResult:
    """`steps` AdamW steps of `params` on loss `step_fn(batch)`; batch b = `batches(b)`. A learning-curve
    point (`curve_fn()`, with the modules it reads in eval mode) every `eval_every` steps and at the end."""
    torch.manual_seed(seed)  # dropout: every method draws the same stream
    opt = adamw(params, lr, weight_decay)
    sched = linear_schedule(opt, warmup, steps)
    trained = [p for _, p in params]
    curve = Curve()
    seconds = flops = 0.0
    first = last = float("nan")
    t_log = time.monotonic()
    for step in range(steps):
        batch = batches(step).to(device)
        t0 = time.perf_counter()
        loss = step_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: the loss became {loss.item()} at step {step}; lower extend.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        flops += flops_fn(batch)
        last = float(loss.detach())
        first = last if step == 0 else first
        done = step + 1
        if curve_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
            curve.add(done, flops, seconds, curve_fn())
            log.info("%s: step %d/%d, loss %.3f, %.1f s, %.3g FLOPs, curve %.4f", label, done, steps, last, seconds, flops,
                     curve.values[-1])
        elif time.monotonic() - t_log > 30:
            log.info("%s: step %d/%d, loss %.3f, %.1f s", label, done, steps, last, seconds)
            t_log = time.monotonic()
    return TrainResult(steps, seconds, flops, first, last, curve)


@torch.no_grad()
def curve_accuracy(adapter: Adapter, eval_batches: list[Batch], out_ids: torch.Tensor, device) -> float:
    """Masked accuracy among `out_ids` of the whole student with the current rows (the plugged
    student's computation) on fixed evaluation batches."""
    was = adapter.training
    adapter.eval()
    col = columns(out_ids, adapter.rows.size).to(device)
    hits = total = 0
    for b in eval_batches:
        b = b.to(device)
        pred = adapter.logits(b, out_ids.to(device), full=True).argmax(-1)  # (N,) columns
        hits += int((pred == col[b.labels]).sum())
        total += int(b.labels.numel())
    adapter.train(was)
    return hits / total if total else float("nan")


def adapter_step(adapter: Adapter, out_ids: torch.Tensor | None, alpha: float, temperature: float,
                 guard: Guard | None = None) -> Callable[[Batch], torch.Tensor]:
    """The loss of one step: KD + MLM on the batch, plus the guard's term (extend.guard) when given."""
    device = next(adapter.rows.parameters()).device
    col = columns(out_ids, adapter.rows.size)
    dev_ids = None if out_ids is None else out_ids.to(device)
    draw = guard.sampler(device) if guard is not None else None

    def step(batch: Batch) -> torch.Tensor:
        loss = loss_of(adapter.logits(batch, dev_ids), batch, col, alpha, temperature)["loss"]
        if guard is not None:
            x, lse = draw()
            loss = loss + guard.weight * ce_increase(x, lse, adapter.rows.rows, adapter.rows.bias).mean()
        return loss
    return step


def adapter_flops(adapter: Adapter, out_ids: torch.Tensor | None, guard: Guard | None = None) -> Callable[[Batch], int]:
    """Estimated FLOPs of one step of `adapter` on a batch (the guard's share included)."""
    shapes = shapes_of(adapter.student)
    v_out = adapter.rows.size if out_ids is None else len(out_ids)
    body_trained = any(p.requires_grad for p in adapter.student.parameters())
    rows_trained = adapter.rows.rows.requires_grad and adapter.rows.rows.shape[0] > 0
    extra = guard.step_flops(adapter.rows.rows.shape[0]) if guard is not None else 0

    def flops(batch: Batch) -> int:
        b, length = batch.input_ids.shape
        last_rows = b * int(batch.selected.sum(1).max()) if b else 0  # layer_at_positions pads to the longest count
        return extra + step_flops(shapes, batch=b, length=length, masked=int(batch.labels.numel()), layers=adapter.k, v_out=v_out,
                                  decoder_trained=rows_trained, body_trained=body_trained, head_trained=False,
                                  input_trained=rows_trained, last_rows=last_rows)
    return flops
