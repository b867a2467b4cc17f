"""Masked LMs of the architecture families real models use, built from scratch for a given tokenizer.

  wordpiece         -> BertForMaskedLM         (BERT, mBERT, MuRIL)
  unigram, sp-bpe   -> XLMRobertaForMaskedLM   (XLM-R: SentencePiece vocabularies)
  byte-bpe          -> RobertaForMaskedLM      (RoBERTa: byte-level BPE)

Also `masked_logits`: the MLM head applied only where predictions are needed, which saves the
(positions x vocabulary) projection at the ~85% of positions nobody looks at.
"""
from __future__ import annotations

import torch
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

FAMILIES: dict[str, tuple[type, type]] = {
    "wordpiece": (BertConfig, BertForMaskedLM),
    "unigram": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    "sp-bpe": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    "byte-bpe": (RobertaConfig, RobertaForMaskedLM),
}

# model_type -> attribute holding the position-wise MLM head (hidden (N, H) -> logits (N, V)).
_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head"}


def position_embeddings_needed(family: str, max_position: int, pad_id: int) -> int:
    """Rows of the position table for sequences of up to `max_position` tokens.

    RoBERTa-style models (XLM-R included) number positions from padding_idx + 1, so the table needs
    max_position + pad_id + 1 rows (XLM-R: 512 + 1 + 1 = 514); BERT numbers them from 0."""
    if family == "wordpiece":
        return max_position
    return max_position + pad_id + 1


def usable_positions(model: PreTrainedModel) -> int:
    """The longest input (specials included) `model`'s position table accepts."""
    cfg = model.config
    n = cfg.max_position_embeddings
    if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
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


def masked_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    selected: torch.Tensor,
) -> torch.Tensor:
    """(N, V) logits at the N selected positions, in row-major order of `selected` (B, L) bool.

    For BERT/RoBERTa-style models the encoder runs once and the head runs on the selected rows only;
    any other masked LM falls back to the full (B, L, V) logits, indexed. Both give the same numbers."""
    head_attr = _HEADS.get(getattr(model.config, "model_type", ""))
    head = getattr(model, head_attr, None) if head_attr else None
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[selected]
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
    return head(hidden[selected])  # (N, H) -> (N, V)
