"""Where the parts of a BERT-style masked LM live (BERT, RoBERTa and XLM-R share this layout in
transformers), so that pruning and quantization name them in one place.

    model.base_model.embeddings          word / position / token-type tables (word table tied to the decoder)
    model.base_model.encoder.layer[i]    attention.self.{query,key,value}, attention.output.dense,
                                         intermediate.dense, output.dense
    model.cls.predictions / model.lm_head   the MLM head: transform dense + LayerNorm, decoder (tied)
"""
from __future__ import annotations

import torch
from torch import nn

from mergedistill.errors import UserError

LINEARS_OF_A_LAYER = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                      "intermediate.dense", "output.dense")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's transformer layers; UserError for a model without that layout."""
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} is not a BERT-style encoder (no base_model.encoder.layer); "
                        "compression supports BERT, RoBERTa and XLM-R masked LMs")
    return layers


def prefix_of(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of `module` inside `model`."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise AssertionError(f"{type(module).__name__} is not part of the model")


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Qualified name -> nn.Linear for the six linear maps of every encoder layer."""
    layers = encoder_layers(model)
    base = prefix_of(model, layers)
    return {f"{base}.{i}.{sub}": layer.get_submodule(sub) for i, layer in enumerate(layers) for sub in LINEARS_OF_A_LAYER}


def head_transform_dense(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The MLM head's hidden -> hidden dense layer (BERT: cls.predictions.transform.dense; RoBERTa:
    lm_head.dense), or None."""
    for name in ("cls.predictions.transform.dense", "lm_head.dense"):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(m, nn.Linear):
            return name, m
    return None


def decoder(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The MLM head's hidden -> vocabulary projection (usually tied to the word embeddings), or None."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (prefix_of(model, out), out) if isinstance(out, nn.Linear) else None


def embedding_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """Qualified name -> nn.Embedding for the word, position and token-type tables."""
    emb = model.base_model.embeddings
    base = prefix_of(model, emb)
    return {f"{base}.{n}": m for n, m in emb.named_children() if isinstance(m, nn.Embedding)}


def unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The model's weights, each storage once (tied tables count once): its parameters and its int8
    weight buffers (quantized tables; their float scales are overhead, not weights)."""
    seen, out = set(), []
    for t in list(model.parameters()) + [b for b in model.buffers() if b.dtype == torch.int8]:
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        except RuntimeError:  # a tensor subclass without plain storage (e.g. torchao's quantized tensors)
            key = id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
