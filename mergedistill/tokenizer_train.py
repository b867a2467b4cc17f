"""Train a tokenizer of one of the four families real MLMs use, with the `tokenizers` library.

  wordpiece  BERT / mBERT / MuRIL: BertNormalizer, BertPreTokenizer, `##` continuations, [CLS] [SEP]
  unigram    XLM-R / ALBERT / CamemBERT: SentencePiece unigram, Metaspace `▁`, <s> </s>
  sp-bpe     SentencePiece-style BPE with Metaspace `▁` and byte fallback, <s> </s>
  byte-bpe   RoBERTa / GPT-2: byte-level BPE, `Ġ` marks a preceding space, <s> </s>

Used by the test fixtures (tiny teachers built in code) and by the demo's teachers.
"""
from __future__ import annotations

from typing import Iterable, Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

Kind = Literal["wordpiece", "unigram", "sp-bpe", "byte-bpe"]
KINDS: tuple[str, ...] = ("wordpiece", "unigram", "sp-bpe", "byte-bpe")

BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
SP_SPECIALS = {
    "bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
    "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
}


def _specials(kind: str) -> dict[str, str]:
    return BERT_SPECIALS if kind == "wordpiece" else SP_SPECIALS


def special_tokens_in_order(kind: str) -> list[str]:
    """Specials in id order: [PAD] [UNK] [CLS] [SEP] [MASK] for BERT, <s> <pad> </s> <unk> <mask> otherwise."""
    if kind == "wordpiece":
        return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(
    kind: Kind,
    texts: Iterable[str],
    vocab_size: int,
    lowercase: bool = False,
    min_frequency: int = 1,
    model_max_length: int = 512,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a fast tokenizer of family `kind` on `texts`; returns a transformers tokenizer with its
    special tokens set (save it with `save_pretrained`)."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {', '.join(KINDS)}")
    specials = special_tokens_in_order(kind)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(show_progress=show_progress, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, continuing_subword_prefix="##")
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = _sp_normalizer(lowercase)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(show_progress=show_progress, vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", max_piece_length=16)
    elif kind == "sp-bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = _sp_normalizer(lowercase)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")])
        byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(show_progress=show_progress, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials + byte_pieces)
    else:  # byte-bpe
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(show_progress=show_progress, 
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tok.train_from_iterator(texts, trainer=trainer)
    names = _specials(kind)
    cls, sep = names["cls_token"], names["sep_token"]
    if kind == "byte-bpe":
        tok.post_processor = processors.RobertaProcessing(
            (sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls)), trim_offsets=True, add_prefix_space=False
        )
    else:
        pair = f"{cls} $A {sep} $B:1 {sep}:1" if kind == "wordpiece" else f"{cls} $A {sep} {sep} $B {sep}"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=pair,
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **names)


def _sp_normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC(), normalizers.Replace(" {2,}", " ")]
    if lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)
