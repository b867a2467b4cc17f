"""BERT-style encoder internals, computed where they are needed: the embeddings and first layers as the
model's own forward runs them (`encoder_prefix`, `run_layers`), and one layer at selected positions only
(`layer_at_positions`: queries, attention output and feed-forward on those rows; keys and values everywhere).
Shared by the dense masked-LM head (models/mlm.py), X-Mod (models/xmod.py), extend and compress."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

ROBERTA_STYLE = ("roberta", "xlm-roberta", "camembert", "xmod")
"""Model types whose position table starts at row padding_idx + 1 (BERT's starts at row 0)."""


def encoder_prefix(base: PreTrainedModel, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, n_layers: int,
                   embedded: torch.Tensor | None = None, **layer_kwargs) -> torch.Tensor:
    """The hidden states after the embeddings and the first `n_layers` encoder layers of a BERT-style base
    model (B, L, H): what the model's own forward computes there (the same embeddings, the same attention
    mask for the model's attention implementation), without touching the model. `embedded`: the
    embedding layer's output (B, L, H) when the caller computed it (`extend` does, from extra rows)
    instead of `input_ids`. `layer_kwargs` go to every layer (e.g. X-Mod's `lang_ids`)."""
    hidden = base.embeddings(input_ids=input_ids) if embedded is None else embedded
    return run_layers(base, hidden, attention_mask, base.encoder.layer[:n_layers], **layer_kwargs)


def run_layers(base: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layers, **layer_kwargs) -> torch.Tensor:
    """`hidden` (B, L, H) through `layers` (some of `base`'s encoder layers, in order), with the attention
    mask the model's own forward would build."""
    mask = create_bidirectional_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in layers:
        out = layer(hidden, attention_mask=mask, **layer_kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def last_layer_splittable(model: PreTrainedModel, layers) -> bool:
    """A plain BERT-style encoder layer stack whose last layer `layer_at_positions` can compute."""
    if layers is None or len(layers) < 1 or getattr(model.config, "is_decoder", False):
        return False
    if getattr(model.config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False  # relative position terms in the attention scores are not reproduced here
    last = layers[-1]
    att = getattr(getattr(last, "attention", None), "self", None)
    return all(hasattr(att, a) for a in ("query", "key", "value", "num_attention_heads", "attention_head_size")) and \
        hasattr(last.attention, "output") and hasattr(last, "intermediate") and hasattr(last, "output")


def layer_at_positions(layer, hidden: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """A BERT-style encoder layer's output at the selected positions only: (N, H), row-major over
    `selected` (B, L) bool. hidden: (B, L, H), the layer's input; attention_mask: (B, L), 0 on padding.

    Queries, the attention output, and the feed-forward block run on the selected rows (gathered per
    sequence, padded to the longest count); keys and values on every position."""
    rows, valid = selected_rows(hidden, selected)  # (B, m, H), (B, m)
    if rows.shape[1] == 0:
        return hidden.new_zeros(0, hidden.shape[-1])
    ctx = attention_at_rows(layer.attention.self, rows, hidden, attention_mask)  # (B, m, H)
    a = layer.attention.output(ctx, rows)  # dense, dropout, LayerNorm(. + rows)
    out = layer.output(layer.intermediate(a), a)  # (B, m, H)
    return out[valid]


def selected_rows(hidden: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected positions of each sequence, gathered in order and padded to the longest count m:
    rows (B, m, H) and valid (B, m) bool (False on the padding), so that `x[valid]` lists the N
    selected positions row-major, as `hidden[selected]` does. m = 0 when nothing is selected."""
    B, L, H = hidden.shape
    counts = selected.sum(1)  # (B,)
    m = int(counts.max()) if B else 0
    pos = torch.arange(L, device=hidden.device).expand(B, L)
    # selected positions first, in order, then the rest: the first m columns are what each row needs
    idx = torch.where(selected, pos, pos + L).argsort(dim=1)[:, :m]  # (B, m)
    rows = hidden.gather(1, idx.unsqueeze(-1).expand(B, m, H))  # (B, m, H)
    valid = torch.arange(m, device=hidden.device)[None, :] < counts[:, None]  # (B, m)
    return rows, valid


def attention_at_rows(att, queries: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A BERT-style self-attention module (`query`, `key`, `value`, heads) with its queries from `queries`
    (B, m, H) and its keys and values from every position of `keys` (B, L, H); attention_mask (B, L), 0
    on padding. Returns the context (B, m, H), before the attention's output projection."""
    B, m, H = queries.shape
    L = keys.shape[1]
    heads, dh = att.num_attention_heads, att.attention_head_size
    q = att.query(queries).view(B, m, heads, dh).transpose(1, 2)
    k = att.key(keys).view(B, L, heads, dh).transpose(1, 2)
    v = att.value(keys).view(B, L, heads, dh).transpose(1, 2)
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): which keys each query may see
    keep = keep | ~keep.any(-1, keepdim=True)  # an all-padding row (nothing selected in it) stays finite
    p = att.dropout.p if (att.training and hasattr(att, "dropout")) else 0.0
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p, scale=getattr(att, "scaling", dh ** -0.5))
    return ctx.transpose(1, 2).reshape(B, m, heads * dh)  # heads * dh < H after head pruning
