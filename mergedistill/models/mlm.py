"""Masked LMs of the architecture families real models use, built from scratch for a given tokenizer.

  wordpiece         -> BertForMaskedLM         (BERT, mBERT, MuRIL)
  unigram, sp-bpe   -> XLMRobertaForMaskedLM   (XLM-R: SentencePiece vocabularies)
  byte-bpe          -> RobertaForMaskedLM      (RoBERTa: byte-level BPE)

Also `masked_logits`: the MLM head (and, through models/layers.py, the last layer) applied only where predictions are needed, which saves the
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

from mergedistill.models.layers import ROBERTA_STYLE, encoder_prefix, last_layer_splittable, layer_at_positions
from mergedistill.models.xmod import is_xmod, xmod_masked_hidden

FAMILIES: dict[str, tuple[type, type]] = {
    "wordpiece": (BertConfig, BertForMaskedLM),
    "unigram": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    "sp-bpe": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    "byte-bpe": (RobertaConfig, RobertaForMaskedLM),
}

# model_type -> attribute holding the position-wise MLM head (hidden (N, H) -> logits (N, V)).
# X-Mod is not here: its layers need lang_ids, so masked_head_features hands it to models.xmod.xmod_masked_hidden.
_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head"}


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
    if is_xmod(model):
        return _head_features(model, model.lm_head, xmod_masked_hidden(model, input_ids, attention_mask, selected, lang_ids))
    if lang_ids is not None:
        raise ValueError(f"lang_ids select X-Mod language modules; this is a {getattr(model.config, 'model_type', '?')} model")
    head_attr = _HEADS.get(getattr(model.config, "model_type", ""))
    head = getattr(model, head_attr, None) if head_attr else None
    if head is None or model.get_output_embeddings() is None:
        return None
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not last_layer_splittable(model, layers) or selected.all():
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


