"""Masked LMs of the architecture families real models use, built from scratch for a given tokenizer.

  wordpiece         -> BertForMaskedLM         (BERT, mBERT, MuRIL)
  unigram, sp-bpe   -> XLMRobertaForMaskedLM   (XLM-R: SentencePiece vocabularies)
  byte-bpe          -> RobertaForMaskedLM      (RoBERTa: byte-level BPE)

Also `masked_logits`: the MLM head applied only where predictions are needed, which saves the
(positions x vocabulary) projection at the ~85% of positions nobody looks at.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)
from transformers.activations import gelu
from transformers.masking_utils import create_bidirectional_mask

FAMILIES: dict[str, tuple[type, type]] = {
    "wordpiece": (BertConfig, BertForMaskedLM),
    "unigram": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    "sp-bpe": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    "byte-bpe": (RobertaConfig, RobertaForMaskedLM),
}

# model_type -> attribute holding the position-wise MLM head (hidden (N, H) -> logits (N, V)).
# X-Mod is not here: its layers need lang_ids, so masked_head_features hands it to train.xmod.xmod_masked_hidden.
_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head"}

ROBERTA_STYLE = ("roberta", "xlm-roberta", "camembert", "xmod")
"""Model types whose position table starts at row padding_idx + 1 (BERT's starts at row 0)."""


def position_embeddings_needed(family: str, max_position: int, pad_id: int) -> int:
    """Rows of the position table for sequences of up to `max_position` tokens.

    RoBERTa-style models (XLM-R included) number positions from padding_idx + 1, so the table needs
    max_position + pad_id + 1 rows (XLM-R: 512 + 1 + 1 = 514); BERT numbers them from 0."""
    if family == "wordpiece":
        return max_position
    return max_position + pad_id + 1


def usable_positions(model) -> int:
    """The longest input (specials included) `model`'s position table accepts (`model`: a model or its
    config)."""
    cfg = getattr(model, "config", model)
    n = cfg.max_position_embeddings
    if getattr(cfg, "model_type", "") in ROBERTA_STYLE:
        n -= cfg.pad_token_id + 1
    return n


def build_mlm(
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_position: int,
    dropout: float = 0.1,
) -> PreTrainedModel:
    """A randomly initialised masked LM of `family`'s architecture, sized as given, whose vocabulary
    and special ids (pad, bos, eos; mask via the tokenizer saved beside it) come from `tokenizer`.

    max_position: the longest sequence (specials included) the model must accept."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer needs a pad token and a mask token for masked-LM training")
    config_cls, model_cls = FAMILIES[family]
    pad = tokenizer.pad_token_id
    # bos/eos: RoBERTa-style tokenizers have them; BERT's play the same part with CLS/SEP.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    config = config_cls(
        vocab_size=len(tokenizer),  # len() counts added tokens too, unlike .vocab_size
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=position_embeddings_needed(family, max_position, pad),
        type_vocab_size=2 if family == "wordpiece" else 1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    return model_cls(config)


def top1(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit, (..., V) -> (...): what `argmax(-1)` returns, but torch's
    CPU argmax over bfloat16 rows (autocast's output) is about 4x slower than `max` (measured: 539 ms
    against 125 ms for 1,200 x 250k logits)."""
    return logits.max(dim=-1).indices


def masked_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    selected: torch.Tensor,
    lang_ids: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, V) logits at the N selected positions, in row-major order of `selected` (B, L) bool; with
    `columns` (S,) vocabulary ids, (N, S): the logits of those ids only, the decoder computing S of
    its V rows (a 250k vocabulary pruned to the corpora's 60k: a quarter of the cost).

    For BERT/RoBERTa-style models the encoder runs all but its last layer everywhere, the last layer
    only where its output is needed (queries at the selected positions; keys and values, which every
    position feeds, everywhere), and the head on the selected rows only. Any other masked LM falls
    back to the full (B, L, V) logits, indexed. Both give the same numbers (up to float rounding).
    lang_ids (B,): each sequence's language module, for X-Mod models (None: the model's default
    language); refused for any other model."""
    features = masked_head_features(model, input_ids, attention_mask, selected, lang_ids)
    if features is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[selected]
        return logits if columns is None else logits[:, columns]
    decoder = model.get_output_embeddings()
    if columns is None:
        return decoder(features)  # (N, V)
    bias = decoder.bias[columns] if decoder.bias is not None else None
    return F.linear(features, decoder.weight[columns], bias)  # (N, S)


def masked_head_features(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    selected: torch.Tensor,
    lang_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """What the MLM head feeds its decoder (`model.get_output_embeddings()`) at the N selected positions,
    (N, H) row-major over `selected`, computed as `masked_logits` describes; None for a model whose head
    is not a known transform + decoder (masked_logits then runs the whole model)."""
    if getattr(model.config, "model_type", "") == "xmod":
        from mergedistill.train.xmod import xmod_masked_hidden

        return _head_features(model, model.lm_head, xmod_masked_hidden(model, input_ids, attention_mask, selected, lang_ids))
    if lang_ids is not None:
        raise ValueError(f"lang_ids select X-Mod language modules; this is a {getattr(model.config, 'model_type', '?')} model")
    head_attr = _HEADS.get(getattr(model.config, "model_type", ""))
    head = getattr(model, head_attr, None) if head_attr else None
    if head is None or model.get_output_embeddings() is None:
        return None
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not _last_layer_splittable(model, layers) or selected.all():
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[selected]  # (N, H)
    else:
        prefix = encoder_prefix(base, input_ids, attention_mask, len(layers) - 1)  # (B, L, H), input of the last layer
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = layer_at_positions(layers[-1], prefix, attention_mask, selected)  # (N, H)
    return _head_features(model, head, hidden)


def _head_features(model: PreTrainedModel, head, hidden: torch.Tensor) -> torch.Tensor:
    """What the MLM head feeds its decoder (N, H): BERT's transform (dense, activation, LayerNorm);
    RoBERTa's (and X-Mod's) dense, GELU, LayerNorm, as their forward computes them."""
    if model.config.model_type == "bert":
        return head.predictions.transform(hidden)
    return head.layer_norm(gelu(head.dense(hidden)))


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


def _last_layer_splittable(model: PreTrainedModel, layers) -> bool:
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
