"""Global unstructured magnitude pruning (Han et al., 2015; the criterion Zhu & Gupta's schedule uses).

Which weights compete: the weight matrices of every linear map in the encoder (query, key, value,
attention output, intermediate and output dense of each layer), ranked together by |w|, so that layers
with many small weights give up more. Biases and LayerNorms stay dense.

- Embeddings stay dense unless `include_embeddings`: the word table is also the (tied) decoder, every
  token of every language reads its own row, and a pruned row is a token that no longer has a meaning;
  this is where per-language damage would be largest for the least compute saved (a lookup costs nothing).
- The MLM head's transform dense (hidden x hidden, BERT's `cls.predictions.transform.dense`) stays dense
  unless `include_head`: it is not part of the encoder (the issue prunes "the encoder's linear layers",
  as do Chen et al. 2020 and Sanh et al. 2020, who leave heads dense), it is one matrix the size of an
  attention projection (under 1/12 of one layer, so little to gain), and every prediction, hence every
  masked-accuracy, PLL and agreement figure, passes through it.

Masks are applied in place: a pruned weight is an exact 0.0 in the ordinary `weight` parameter. The
model stays a plain model (its state dict has the usual keys), so `save_pretrained` + `from_pretrained`
reproduces it bit for bit and Lightning checkpoints resume. During recovery training, the callback
(callback.py) re-applies the masks after every optimizer step. `make_permanent` folds masks that
`torch.nn.utils.prune` attached (weight_orig * weight_mask), which `save_pretrained` must never see:
transformers does not know `weight_orig`/`weight_mask`, reports `weight` missing and initialises it
at random on reload (tests/compress/test_compress_magnitude.py shows it happening).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from mergedistill.compress.layout import embedding_tables, encoder_linears, head_transform_dense
from mergedistill.compress.schedule import check_sparsity  # noqa: F401  (re-exported: callers import it from here)

Masks = dict[str, torch.Tensor]
"""Qualified parameter name (e.g. `bert.encoder.layer.0.attention.self.query.weight`) -> bool tensor of
the parameter's shape, True where the weight is kept."""


def prunable_weights(model: nn.Module, include_embeddings: bool = False, include_head: bool = False) -> dict[str, nn.Parameter]:
    """Qualified parameter name -> weight parameter, for the weights that global pruning ranks (see the
    module docstring for what is in and why). Tied parameters appear once."""
    out = {f"{name}.weight": lin.weight for name, lin in encoder_linears(model).items()}
    if include_head:
        head = head_transform_dense(model)
        if head is not None:
            out[f"{head[0]}.weight"] = head[1].weight
    if include_embeddings:
        out.update({f"{name}.weight": emb.weight for name, emb in embedding_tables(model).items()})
    seen: set[int] = set()
    unique = {}
    for name, p in out.items():
        if id(p) not in seen:
            seen.add(id(p))
            unique[name] = p
    return unique


@torch.no_grad()
def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> Masks:
    """Masks that zero exactly round(sparsity * n) of the n weights given, the smallest |w| over all of
    them together. Ties at the threshold are broken by position (earlier tensor in `weights`, then
    earlier element first), so the count is exact and the result deterministic."""
    check_sparsity(sparsity)
    names = list(weights)
    sizes = [weights[n].numel() for n in names]
    flat = torch.cat([weights[n].detach().abs().flatten().float() for n in names])  # (n,)
    n = flat.numel()
    k = int(round(float(sparsity) * n))  # weights to zero
    keep = torch.ones(n, dtype=torch.bool)
    if k > 0:
        threshold = torch.kthvalue(flat, k).values  # the k-th smallest |w|
        below = flat < threshold
        keep[below] = False
        still = k - int(below.sum())  # how many of the weights equal to the threshold go too
        at = (flat == threshold).nonzero().squeeze(1)[:still]
        keep[at] = False
    if int((~keep).sum()) != k:
        raise RuntimeError(f"magnitude masks: {int((~keep).sum())} weights pruned, {k} requested")
    return {name: part.view_as(weights[name]) for name, part in zip(names, keep.split(sizes))}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the masked weights of `model` in place (what the recovery callback does after each step)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"apply_masks: the model has no parameter {name}")
        p = params[name]
        p.mul_(mask.to(device=p.device, dtype=p.dtype))


def prune_magnitude(model: nn.Module, sparsity: float, include_embeddings: bool = False,
                    include_head: bool = False) -> Masks:
    """One-shot global magnitude pruning of `model` in place to `sparsity`; returns the masks."""
    masks = global_magnitude_masks(prunable_weights(model, include_embeddings, include_head), sparsity)
    apply_masks(model, masks)
    return masks


def sparsity_of(weights: dict[str, torch.Tensor]) -> float:
    """Share of exact zeros among the given weights."""
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / max(total, 1)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every `torch.nn.utils.prune` reparametrisation (weight = weight_orig * weight_mask) into a
    plain `weight`, in place, so that the model saves as a standard folder. A model pruned with this
    module's functions needs nothing (its zeros are already in `weight`); calling it is always safe."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):  # PruningContainer (repeated pruning) too
                torch_prune.remove(module, hook._tensor_name)
    leftover = [n for n, _ in model.named_buffers() if n.endswith("_mask")] + [n for n, _ in model.named_parameters() if n.endswith("_orig")]
    if leftover:
        raise RuntimeError(f"make_permanent: pruning state left on {leftover[:3]}")
    return model
