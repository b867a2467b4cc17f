"""Which heads, neurons and layers to remove: first-order Taylor importance, and the choice of units.

Importance of a unit u = the first-order estimate of how much the loss changes when u is removed.
Each unit gets a gate g_u = 1 multiplying its output (a head's context vector, a neuron's activation, a
layer's residual update: h + g * (layer(h) - h)); removing u is g_u = 0, so
    L(g_u = 0) - L(g_u = 1) ~ -dL/dg_u,   importance(u) = mean over batches of |dL/dg_u|
(Michel et al. 2019 for heads; Molchanov et al. 2017/2019 for neurons). It is measured on the loss the
model is trained with (KD + MLM on the run's shards, passed in as a callable), so it scores units by
what the student needs, not by weight size. Weight-norm scores need no data but ignore how often and
how strongly a unit fires; the Taylor score costs one backward pass per batch, and a few batches suffice.

Head scores are normalised per layer (L2, as Michel et al. do) before heads of different layers are
ranked together. Neurons are removed in equal numbers from every layer, so the smaller model keeps one
`intermediate_size` and loads with plain `from_pretrained` (structured.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from mergedistill.compress.layout import encoder_layers
from mergedistill.compress.magnitude import check_sparsity
from mergedistill.compress.structured import heads_of
from mergedistill.errors import UserError


@dataclass
class Importance:
    """Per-unit scores (higher = more needed). One tensor per layer: layers may differ in size."""
    heads: list[torch.Tensor]  # [(heads in layer i,)]
    neurons: list[torch.Tensor]  # [(intermediate size of layer i,)]
    layers: torch.Tensor  # (layers,)


def taylor_importance(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], torch.Tensor]) -> Importance:
    """First-order Taylor importance of every head, neuron and layer of `model` (left unchanged).

    batches: a few inputs, each passed as is to loss_fn(model, batch) -> scalar loss (e.g. the KD + MLM
    loss of a shard batch). The model runs in eval mode (no dropout) with gradients only for the gates."""
    layers = encoder_layers(model)
    head_gates = [torch.ones(heads_of(layer), requires_grad=True) for layer in layers]
    neuron_gates = [torch.ones(layer.intermediate.dense.out_features, requires_grad=True) for layer in layers]
    layer_gates = torch.ones(len(layers), requires_grad=True)
    hooks = []
    ran: set[tuple[str, int]] = set()  # which gates a forward pass went through

    def gate_heads(g, d, i):
        def pre(module, args):
            ran.add(("heads", i))
            x = args[0]  # (B, L, heads * d): the heads' context vectors, concatenated
            return (x * g.to(x.dtype).repeat_interleave(d),) + tuple(args[1:])
        return pre

    def gate_neurons(g, i):
        def pre(module, args):
            ran.add(("neurons", i))
            return (args[0] * g.to(args[0].dtype),) + tuple(args[1:])  # (B, L, I) activations
        return pre

    def gate_layer(i):
        def post(module, args, kwargs, out):
            ran.add(("layer", i))
            h = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            gated = h + layer_gates[i].to(y.dtype) * (y - h)
            return (gated,) + tuple(out[1:]) if isinstance(out, tuple) else gated
        return post

    for i, layer in enumerate(layers):
        d = layer.attention.self.attention_head_size
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(gate_heads(head_gates[i], d, i)))
        hooks.append(layer.output.dense.register_forward_pre_hook(gate_neurons(neuron_gates[i], i)))
        hooks.append(layer.register_forward_hook(gate_layer(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    gates = head_gates + neuron_gates + [layer_gates]
    totals = [torch.zeros_like(g) for g in gates]
    n = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for t, g in zip(totals, grads):
                if g is not None:
                    t += g.detach().abs()
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise UserError("importance: no batches given; structured pruning needs a few batches of training data")
    k = len(layers)
    unused = sorted({(kind, i) for kind in ("heads", "neurons", "layer") for i in range(k)} - ran)
    if unused:  # e.g. models.mlm.masked_logits computes the last layer piecewise: its layer gate never runs
        raise AssertionError(f"importance: loss_fn bypassed the {unused[0][0]} gate of layer {unused[0][1]} "
                             f"({len(unused)} in all); it must call every encoder layer as a module (a plain "
                             "model(...) forward; see distill_loss_fn)")
    return Importance(heads=[t / n for t in totals[:k]], neurons=[t / n for t in totals[k:2 * k]], layers=totals[-1] / n)


def distill_loss_fn(alpha: float, temperature: float) -> Callable[[nn.Module, object], torch.Tensor]:
    """loss_fn for taylor_importance on the train stage's batches (train_data.Batch): the training loss,
    alpha * KD + (1 - alpha) * MLM at the masked positions, from a full forward pass (not
    models.mlm.masked_logits, which runs the last layer piecewise and would bypass its gate)."""
    from mergedistill.train.batches import batch_loss

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.selected]  # (N, V)
        return batch_loss(logits, batch, alpha, temperature)["loss"]
    return loss_fn


def choose_heads(importance: Importance, fraction: float) -> dict[int, list[int]]:
    """The round(fraction * all heads) least important heads over all layers (scores normalised per
    layer), never the last head of a layer (remove the layer for that). -> layer -> head positions."""
    check_sparsity(fraction, "heads")
    normed = [s / s.norm().clamp_min(1e-12) for s in importance.heads]
    total = sum(len(s) for s in normed)
    want = int(round(fraction * total))
    order = sorted(((float(v), li, h) for li, s in enumerate(normed) for h, v in enumerate(s.tolist())))
    left = {li: len(s) for li, s in enumerate(normed)}
    out: dict[int, list[int]] = {}
    for _, li, h in order:
        if sum(len(v) for v in out.values()) == want:
            break
        if left[li] > 1:
            out.setdefault(li, []).append(h)
            left[li] -= 1
    if sum(len(v) for v in out.values()) < want:
        raise UserError(f"heads: {fraction} of {total} heads is {want}, but every layer must keep one head; "
                        f"at most {total - len(normed)} can go")
    return {li: sorted(v) for li, v in sorted(out.items())}


def choose_neurons(importance: Importance, fraction: float) -> dict[int, list[int]]:
    """The round(fraction * size) least important neurons of every layer (the same count in each)."""
    check_sparsity(fraction, "neurons")
    out = {}
    for li, s in enumerate(importance.neurons):
        k = int(round(fraction * len(s)))
        if k:
            out[li] = sorted(torch.argsort(s, stable=True)[:k].tolist())
    return out


def choose_layers(importance: Importance, count: int) -> list[int]:
    """The `count` least important layers."""
    n = len(importance.layers)
    if not 0 <= count < n:
        raise UserError(f"layers: cannot remove {count} of {n} layers; choose 0..{n - 1}")
    return sorted(torch.argsort(importance.layers, stable=True)[:count].tolist())
