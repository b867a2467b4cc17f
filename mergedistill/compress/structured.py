"""Structured pruning: remove attention heads, feed-forward neurons and whole layers, giving a genuinely
smaller dense model (smaller matrices, fewer layers), not a masked one.

transformers 5.x dropped `PreTrainedModel.prune_heads`, BERT's `head_mask` and the config's
`pruned_heads` handling, so the surgery is done here, with `transformers.pytorch_utils.prune_linear_layer`
(still there) cutting rows or columns of a Linear. How each kind of pruned model loads:

- neurons (the same count removed from every layer) and layers: the config says it all
  (`intermediate_size`, `num_hidden_layers`), and plain `AutoModelForMaskedLM.from_pretrained` loads the
  smaller model. Neuron counts that differ by layer are recorded in `config.intermediate_sizes`.
- heads: a layer's head count is `hidden_size / attention_head_size` in BERT's code, one value for all
  layers, so a standard config cannot describe layers that lost different heads. The removed heads are
  recorded in `config.pruned_heads` ({"layer": [original head indices]}, the field older transformers
  used; it survives save/load as a plain config attribute with string keys), and `load_pruned(path)` (or
  `PrunedBertForMaskedLM.from_pretrained`) builds the smaller shapes before loading the weights. Plain
  `BertForMaskedLM.from_pretrained` refuses such a folder with a size-mismatch error (it does not load it
  wrongly): tested.

BERT's attention reshapes with `view(..., -1, attention_head_size)`, so a layer whose query/key/value
have k * head_size outputs runs k heads without further changes.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, BertForMaskedLM, PretrainedConfig
from transformers.pytorch_utils import prune_linear_layer

from mergedistill.compress.layout import encoder_layers
from mergedistill.errors import UserError


def heads_of(layer: nn.Module) -> int:
    """The number of attention heads a layer has now."""
    sa = layer.attention.self
    return sa.query.out_features // sa.attention_head_size


def _head_index(layer: nn.Module, heads: list[int]) -> torch.Tensor:
    """Row indices of query/key/value outputs to keep when removing `heads` (positions in this layer)."""
    d = layer.attention.self.attention_head_size
    keep = [h for h in range(heads_of(layer)) if h not in set(heads)]
    return torch.tensor([h * d + j for h in keep for j in range(d)], dtype=torch.long)


def _check_units(what: str, units: dict[int, Iterable[int]], n_layers: int, count) -> dict[int, list[int]]:
    problems, out = [], {}
    for li, idx in units.items():
        idx = sorted({int(i) for i in idx})
        if not 0 <= li < n_layers:
            problems.append(f"{what}: layer {li} does not exist (the model has {n_layers} layers)")
            continue
        n = count(li)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            problems.append(f"{what}: layer {li} has {n} {what}, cannot prune {what[:-1]} {bad[0]} (indices are 0..{n - 1})")
        elif len(idx) >= n and n > 0:
            problems.append(f"{what}: pruning all {n} {what} of layer {li} leaves it empty; remove the layer "
                            "instead (drop_layers)")
        if idx:
            out[li] = idx
    if problems:
        raise UserError(problems, header="structured pruning:")
    return out


def _set_extra(config: PretrainedConfig, key: str, value) -> None:
    """Set or clear a config attribute that standard BERT configs do not have."""
    if value:
        setattr(config, key, value)
    elif hasattr(config, key):
        delattr(config, key)


@torch.no_grad()
def prune_heads(model: nn.Module, heads: dict[int, Iterable[int]]) -> nn.Module:
    """Remove attention heads in place. heads: layer index -> head positions in that layer as it is
    now (0..heads_of(layer)-1). Records the original indices in `config.pruned_heads`."""
    layers = encoder_layers(model)
    heads = _check_units("heads", heads, len(layers), lambda li: heads_of(layers[li]))
    pruned = {int(k): list(v) for k, v in (getattr(model.config, "pruned_heads", None) or {}).items()}
    for li, hs in heads.items():
        layer = layers[li]
        sa = layer.attention.self
        original = [h for h in range(model.config.num_attention_heads) if h not in set(pruned.get(li, []))]
        index = _head_index(layer, hs)
        sa.query = prune_linear_layer(sa.query, index)
        sa.key = prune_linear_layer(sa.key, index)
        sa.value = prune_linear_layer(sa.value, index)
        layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, index, dim=1)
        sa.num_attention_heads = len(index) // sa.attention_head_size
        sa.all_head_size = len(index)
        pruned[li] = sorted(set(pruned.get(li, [])) | {original[h] for h in hs})
    _set_extra(model.config, "pruned_heads", {str(k): v for k, v in sorted(pruned.items())})
    return model


def _intermediate_sizes(layers: nn.ModuleList) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in layers]


def _record_intermediate(model: nn.Module) -> None:
    sizes = _intermediate_sizes(encoder_layers(model))
    if sizes:
        model.config.intermediate_size = max(sizes)
    _set_extra(model.config, "intermediate_sizes", sizes if len(set(sizes)) > 1 else None)


@torch.no_grad()
def prune_neurons(model: nn.Module, neurons: dict[int, Iterable[int]]) -> nn.Module:
    """Remove feed-forward neurons in place. neurons: layer index -> positions in that layer's
    intermediate dimension. Updates `config.intermediate_size` (and `intermediate_sizes` when layers
    end up with different sizes)."""
    layers = encoder_layers(model)
    neurons = _check_units("neurons", neurons, len(layers), lambda li: layers[li].intermediate.dense.out_features)
    for li, ns in neurons.items():
        layer = layers[li]
        n = layer.intermediate.dense.out_features
        index = torch.tensor([i for i in range(n) if i not in set(ns)], dtype=torch.long)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)
    _record_intermediate(model)
    return model


@torch.no_grad()
def drop_layers(model: nn.Module, layers_to_drop: Iterable[int]) -> nn.Module:
    """Remove whole encoder layers in place (the residual stream passes straight on). Updates
    `config.num_hidden_layers` and renumbers the per-layer records."""
    layers = encoder_layers(model)
    drop = sorted({int(i) for i in layers_to_drop})
    bad = [i for i in drop if not 0 <= i < len(layers)]
    if bad:
        raise UserError(f"layers: the model has {len(layers)} layers (0..{len(layers) - 1}); cannot drop layer {bad[0]}")
    if len(drop) >= len(layers):
        raise UserError(f"layers: dropping all {len(layers)} layers leaves no encoder; keep at least one")
    kept = [i for i in range(len(layers)) if i not in drop]
    new = nn.ModuleList([layers[i] for i in kept])
    for new_i, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    model.base_model.encoder.layer = new
    model.config.num_hidden_layers = len(new)
    old_heads = getattr(model.config, "pruned_heads", None) or {}
    _set_extra(model.config, "pruned_heads", {str(new_i): old_heads[str(old_i)] for new_i, old_i in enumerate(kept)
                                              if str(old_i) in old_heads})
    _record_intermediate(model)
    return model


def _shape_like_config(model: nn.Module) -> None:
    """Cut a freshly built full-size model to the shapes its config records (before loading weights)."""
    config = model.config
    layers = encoder_layers(model)
    pruned = {int(k): list(v) for k, v in (getattr(config, "pruned_heads", None) or {}).items()}
    sizes = getattr(config, "intermediate_sizes", None)
    for li, layer in enumerate(layers):
        if pruned.get(li):
            sa = layer.attention.self
            index = _head_index(layer, pruned[li])  # a fresh layer has all heads: positions = original indices
            sa.query, sa.key, sa.value = (prune_linear_layer(m, index) for m in (sa.query, sa.key, sa.value))
            layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, index, dim=1)
            sa.num_attention_heads, sa.all_head_size = len(index) // sa.attention_head_size, len(index)
        if sizes and sizes[li] != layer.intermediate.dense.out_features:
            index = torch.arange(sizes[li])
            layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index)
            layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)


class PrunedBertForMaskedLM(BertForMaskedLM):
    """BertForMaskedLM whose layers take the shapes recorded in the config (`pruned_heads`,
    `intermediate_sizes`) when built, so `from_pretrained` loads a structurally pruned folder."""

    def __init__(self, config):
        super().__init__(config)
        _shape_like_config(self)


def needs_pruned_class(config: PretrainedConfig) -> bool:
    """True when a standard class cannot build this config's shapes (heads or per-layer sizes pruned)."""
    return bool(getattr(config, "pruned_heads", None) or getattr(config, "intermediate_sizes", None))


def load_pruned(path, **kwargs) -> nn.Module:
    """Load a (possibly structurally pruned) masked LM folder: PrunedBertForMaskedLM when the config
    records pruned heads or per-layer sizes, else AutoModelForMaskedLM. kwargs go to from_pretrained."""
    config = AutoConfig.from_pretrained(path)
    if needs_pruned_class(config):
        if config.model_type != "bert":
            raise UserError(f"{path}: pruned heads are supported for BERT models only (this is {config.model_type})")
        return PrunedBertForMaskedLM.from_pretrained(path, **kwargs)
    return AutoModelForMaskedLM.from_pretrained(path, **kwargs)
