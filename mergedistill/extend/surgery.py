"""Model surgery for a new language, as functions of models and tensors (no config, no files).

The new language's tokens that the student lacks get rows after the student's last id. While they are
learned they live apart from the student (`NewRows`): the student's matrix is never written to, so
every old id keeps its row bit for bit, and only the new rows (and their output bias) get gradients.
`plug` then grows a copy of the student by those rows: a standard masked LM again.

The forward pass of the student (or of its mini-model: its first k layers) over the split matrix runs
the model's own modules in its own order: embeddings (positions numbered as the model numbers them),
the first layers everywhere, the last layer only at the masked positions (`models.mlm.layer_at_positions`,
X-Mod's `xmod_layer_at_positions`), the head's transform, then the decoder over the ids asked for.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from mergedistill.models import init as model_init
from mergedistill.models.layers import encoder_prefix, layer_at_positions
from mergedistill.models.xmod import is_xmod, xmod_layer_at_positions


def depth(model) -> int:
    return len(model.base_model.encoder.layer)


def input_matrix(model) -> torch.Tensor:
    """(V, H) the student's embedding matrix (tied to its decoder)."""
    return model.get_input_embeddings().weight


def output_bias(model) -> torch.Tensor:
    """The student's output bias (V,); refused for a model without one."""
    bias = model_init.output_bias(model)
    if bias is None:
        raise ValueError(f"{type(model).__name__} has no output bias")
    return bias


class NewRows(nn.Module):
    """The new language's embedding rows, ids old_size .. old_size + n - 1, and their output bias."""

    def __init__(self, old_size: int, rows: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        if rows.shape[0] != bias.shape[0]:
            raise ValueError(f"{rows.shape[0]} rows but {bias.shape[0]} bias entries")
        self.old_size = old_size
        self.rows = nn.Parameter(rows.detach().clone())  # (n, H)
        self.bias = nn.Parameter(bias.detach().clone())  # (n,)

    @property
    def size(self) -> int:
        return self.old_size + self.rows.shape[0]


def lookup(old: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of the matrix [old; rows] at `ids` (any shape) -> ids.shape + (H,), without building it.
    old: (V0, H) frozen; rows: (n, H) ids V0 .. V0 + n - 1."""
    v0 = old.shape[0]
    out = F.embedding(ids.clamp(max=v0 - 1), old)
    if rows.shape[0] == 0:
        return out
    new = F.embedding((ids - v0).clamp(min=0, max=rows.shape[0] - 1), rows)
    return torch.where((ids >= v0).unsqueeze(-1), new, out)


def bias_at(old: torch.Tensor, new: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Entries of the vector [old; new] at `ids`."""
    v0 = old.shape[0]
    out = old[ids.clamp(max=v0 - 1)]
    if new.shape[0] == 0:
        return out
    return torch.where(ids >= v0, new[(ids - v0).clamp(min=0, max=new.shape[0] - 1)], out)


def embedding_output(model, word_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The embedding layer's output (B, L, H) for word embeddings (B, L, H) of `input_ids`: position and
    type embeddings, LayerNorm, dropout, with positions numbered as the model numbers them from ids
    (RoBERTa-style models skip padding), so it equals `base.embeddings(input_ids)` when the words do."""
    emb = model.base_model.embeddings
    positions = None
    if hasattr(emb, "create_position_ids_from_input_ids"):
        positions = emb.create_position_ids_from_input_ids(input_ids, emb.padding_idx)
    return emb(inputs_embeds=word_embeds, position_ids=positions)


def hidden_at(model, embedded: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor, n_layers: int,
              lang_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H): the output of the model's first `n_layers` layers at the selected positions (row-major over
    `selected` (B, L)), from the embedding output (B, L, H); layer n_layers runs at those positions only.
    At full depth, a pre-norm X-Mod model's final LayerNorm follows, as in its own forward."""
    base = model.base_model
    layers = base.encoder.layer
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers {n_layers} outside 1..{len(layers)}")
    if is_xmod(model):
        if lang_ids is None:
            raise ValueError("an X-Mod model needs lang_ids")
        hidden = encoder_prefix(base, None, attention_mask, n_layers - 1, embedded=embedded, lang_ids=lang_ids)
        out = xmod_layer_at_positions(layers[n_layers - 1], hidden, attention_mask, selected, lang_ids)
        if n_layers == len(layers) and base.encoder.is_pre_norm:
            out = base.encoder.LayerNorm(out)
        return out
    hidden = encoder_prefix(base, None, attention_mask, n_layers - 1, embedded=embedded)
    return layer_at_positions(layers[n_layers - 1], hidden, attention_mask, selected)


def head_transform(model, hidden: torch.Tensor) -> torch.Tensor:
    """The student's MLM head before its decoder (dense, activation, LayerNorm): (N, H) -> (N, H)."""
    if hasattr(model, "cls"):
        return model.cls.predictions.transform(hidden)
    head = model.lm_head
    return head.layer_norm(ACT2FN["gelu"](head.dense(hidden)))


def first_layers(model, k: int) -> nn.ModuleList:
    """The mini-model's body: the student's first k layers (the modules themselves, not copies)."""
    layers = model.base_model.encoder.layer
    if not 1 <= k <= len(layers):
        raise ValueError(f"a mini-model of {k} layers from a student of {len(layers)}")
    return nn.ModuleList(list(layers[:k]))


@torch.no_grad()
def plug(model, rows: torch.Tensor, bias: torch.Tensor):
    """A copy of `model` whose vocabulary is grown by `rows` (n, H) with output bias `bias` (n,): ids
    V .. V + n - 1. Every old row and bias entry is copied bit for bit (checked)."""
    old_w, old_b = input_matrix(model).detach(), output_bias(model).detach()
    v0 = old_w.shape[0]
    grown = copy.deepcopy(model)
    if rows.shape[0]:
        grown.resize_token_embeddings(v0 + rows.shape[0], mean_resizing=False)
    w, b = input_matrix(grown), output_bias(grown)
    w[v0:] = rows.to(w.dtype)
    b[v0:] = bias.to(b.dtype)
    if not (torch.equal(w[:v0], old_w) and torch.equal(b[:v0], old_b)):
        raise RuntimeError("plug changed an old row")
    if grown.get_output_embeddings().weight is not w:
        raise RuntimeError("the grown model's decoder is not tied to its embeddings")
    return grown


@contextlib.contextmanager
def outputs_restricted(model, allowed: torch.Tensor | None) -> Iterator[None]:
    """Within the block the model predicts only the `allowed` ids ((V,) bool): the output bias of every
    other id is -inf (so any softmax, argmax or PLL ranges over the allowed ids); restored after.
    None: no restriction."""
    if allowed is None:
        yield
        return
    bias = output_bias(model)
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.masked_fill_(~allowed.to(bias.device), float("-inf"))
    try:
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)
