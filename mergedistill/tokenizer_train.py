"""Train a tokenizer of one of the four families real MLMs use, with the `tokenizers` library.

  wordpiece  BERT / mBERT / MuRIL: BertNormalizer, BertPreTokenizer, `##` continuations, [CLS] [SEP]
  unigram    XLM-R / ALBERT / CamemBERT: SentencePiece unigram, Metaspace `▁`, <s> </s>
  sp-bpe     SentencePiece-style BPE with Metaspace `▁` and byte fallback, <s> </s>
  byte-bpe   RoBERTa / GPT-2: byte-level BPE, `Ġ` marks a preceding space, <s> </s>

Used by the test fixtures (tiny teachers built in code) and by the demo's teachers.

Deterministic: the same texts give the same tokenizer.json, byte for byte, in any process. The `tokenizers`
trainers are not (tokenizers 0.23, measured on the demo's corpora: 4 runs, 4 different files for wordpiece
and for unigram, whatever RAYON_NUM_THREADS or TOKENIZERS_PARALLELISM say): their word counts live in a hash
map seeded at random in each process, and
  - the WordPiece trainer numbers the `##c` pieces in that map's order, and breaks ties between equally
    frequent merges by those numbers: given every `##c` up front, in code-point order, it is deterministic
    (the pass that finds them costs 0.9 s per 2M characters: 1.8 s against 0.9 s for de);
  - the Unigram trainer runs its EM over the words in that order, in parallel (float sums in another
    order each run): unigram models are trained with SentencePiece instead (the algorithm the `tokenizers`
    trainer reimplements; one thread), which is deterministic and faster (1M chars of ja, the demo's
    setting: 11 s against 25 s on 2 idle cores), with as many pieces and 2% more tokens per character.
The BPE trainer (sp-bpe, byte-bpe) numbers only single characters, sorted: deterministic as it is.
"""
from __future__ import annotations

import io
import json
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
    texts = list(texts)  # wordpiece and unigram read them twice
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        # every `##c` the trainer will need, numbered in code-point order rather than its hash map's (see above)
        trainer = trainers.WordPieceTrainer(show_progress=show_progress, vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials + continuation_pieces(tok, texts, "##"),
                                            continuing_subword_prefix="##")
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = _sp_normalizer(lowercase)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = None  # SentencePiece trains it (see above)
        tok.model = sentencepiece_unigram(tok, texts, vocab_size, specials, unk_token="<unk>", max_piece_length=16)
        tok.add_special_tokens(specials)
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
    if trainer is not None:
        tok.train_from_iterator(texts, trainer=trainer)
    if kind == "wordpiece":  # the `##c` pieces were given as special tokens only to number them: make them plain pieces
        tok = only_added(tok, specials)
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


def continuation_pieces(tok: Tokenizer, texts: list[str], prefix: str) -> list[str]:
    """`prefix + c` for every character c that follows another one inside a word, as the tokenizer's
    normalizer and pre-tokenizer cut the texts into words (what the WordPiece trainer sees), sorted."""
    chars: set[str] = set()
    for text in texts:
        normalized = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(normalized):
            chars.update(word[1:])
    return [prefix + c for c in sorted(chars)]


def only_added(tok: Tokenizer, keep: list[str]) -> Tokenizer:
    """The tokenizer with only `keep` among its added tokens; the others stay pieces of the model."""
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in keep]
    return Tokenizer.from_str(json.dumps(spec))


SENTENCEPIECE_THREADS = 1
"""Threads of SentencePiece's unigram trainer: its EM sums each thread's share of the text, so the model
depends on this number (not on the machine's cores); 1 was also the fastest on 2 busy cores."""


def sentencepiece_unigram(tok: Tokenizer, texts: list[str], vocab_size: int, specials: list[str], unk_token: str,
                          max_piece_length: int) -> models.Unigram:
    """A Unigram model trained by SentencePiece on `texts` as `tok`'s normalizer writes them, split into words
    at spaces with `▁` in front, as `tok`'s Metaspace pre-tokenizer does: the units the `tokenizers` trainer
    would see. Pieces never cross a space and are at most `max_piece_length` characters; every character
    of the texts is a piece (character_coverage 1). Ids: `specials` first (score 0, as the `tokenizers`
    trainer writes them), then SentencePiece's pieces by falling score; `vocab_size` is an upper bound
    (small corpora get fewer pieces, as with the `tokenizers` trainer)."""
    import sentencepiece as spm

    normalized = [t for t in (tok.normalizer.normalize_str(text) for text in texts) if t.strip()]
    if not normalized:
        raise ValueError("cannot train a unigram tokenizer on no text")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(normalized), model_writer=proto, model_type="unigram",
        vocab_size=vocab_size - len(specials) + 1,  # + its own unknown piece, replaced by ours
        hard_vocab_limit=False, character_coverage=1.0, max_sentencepiece_length=max_piece_length,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_by_whitespace=True, split_by_unicode_script=False, split_by_number=False, split_digits=False,
        byte_fallback=False, input_sentence_size=0, max_sentence_length=max(len(t.encode()) for t in normalized) + 1,
        num_threads=SENTENCEPIECE_THREADS, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(1, sp.get_piece_size())]  # 0: its unknown piece
    vocab = [(s, 0.0) for s in specials] + [p for p in pieces if p[0] not in specials]
    return models.Unigram(vocab, unk_id=specials.index(unk_token), byte_fallback=False)
