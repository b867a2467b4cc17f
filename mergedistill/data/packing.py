"""Packing tokenized documents into fixed-length sequences, laid out as the tokenizer's post-processor
lays out a pair: `[CLS] d1 [SEP] d2 [SEP]` (RoBERTa, XLM-R: `<s> d1 </s></s> d2 </s>`).

One implementation for every user: the data stage packs each shard's lines for its teacher,
evaluation packs held-out text, the demo's pre-training packs its corpora. Documents (lines,
paragraphs) are kept whole: a sequence takes documents while they fit, and a document is cut only when
it alone is longer than a sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from mergedistill.teachers import plain_backend


@dataclass
class SpecialLayout:
    """Special ids the tokenizer's post-processor puts around one text (prefix ... suffix) and between
    the two texts of a pair (mid). BERT: [CLS] / [SEP] / [SEP]; RoBERTa, XLM-R: <s> / </s></s> / </s>."""

    prefix: list[int]
    mid: list[int]
    suffix: list[int]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase | Tokenizer) -> "SpecialLayout":
        """The layout of a transformers fast tokenizer or of a `tokenizers.Tokenizer`."""
        # Encode a pair and read the added tokens off the encoding itself, so any template works.
        enc = plain_backend(tokenizer).encode("a", "b", add_special_tokens=True)
        seq = enc.sequence_ids
        first_a, first_b = seq.index(0), seq.index(1)
        last_a = max(i for i, s in enumerate(seq) if s == 0)
        last_b = max(i for i, s in enumerate(seq) if s == 1)
        ids = enc.ids
        return cls(prefix=ids[:first_a], mid=ids[last_a + 1:first_b], suffix=ids[last_b + 1:])


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 1000,
    with_words: bool = False,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids of each text without specials (batched through the fast tokenizer), and with
    `with_words` the word index of each token (-1 where the tokenizer gives none)."""
    # The backend (Rust) tokenizer directly: documents longer than model_max_length are the point
    # here (packing cuts them), so the wrapper's "sequence too long" warning would be noise.
    backend = plain_backend(tokenizer)
    ids: list[list[int]] = []
    words: list[list[int]] | None = [] if with_words else None
    for start in range(0, len(texts), batch_size):
        for enc in backend.encode_batch(list(texts[start:start + batch_size]), add_special_tokens=False):
            ids.append(enc.ids)
            if words is not None:
                words.append([-1 if w is None else w for w in enc.word_ids])
    return ids, words


@dataclass
class Packed:
    """Fixed-length sequences ready for masking."""

    input_ids: torch.Tensor
    """(N, L) int32 ids, padded with the pad id."""
    attention_mask: torch.Tensor
    """(N, L) bool, False on padding."""
    word_ids: torch.Tensor | None = None
    """(N, L) int32 word index within the sequence (-1: special or padding), for whole-word masking."""
    groups: torch.Tensor | None = None
    """(N,) long group (language) of each sequence; None: all one group."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @staticmethod
    def concat(parts: Sequence["Packed"]) -> "Packed":
        words = torch.cat([p.word_ids for p in parts]) if all(p.word_ids is not None for p in parts) else None  # type: ignore[misc]
        groups = torch.cat([p.groups if p.groups is not None else torch.zeros(len(p), dtype=torch.long) for p in parts])
        return Packed(torch.cat([p.input_ids for p in parts]), torch.cat([p.attention_mask for p in parts]), words, groups)

    def head(self, n: int) -> "Packed":
        return Packed(self.input_ids[:n], self.attention_mask[:n],
                      None if self.word_ids is None else self.word_ids[:n], None if self.groups is None else self.groups[:n])


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    layout: SpecialLayout,
    pad_id: int,
    words: Sequence[Sequence[int]] | None = None,
) -> Packed:
    """Greedily pack whole documents, in order, into sequences of `seq_len`:
    prefix d1 mid d2 mid ... dk suffix, then padding. A document that does not fit in an empty
    sequence is cut into full-length chunks (each its own sequence); its tail packs on as usual.
    A document never continues across sequences except by that cut."""
    room = seq_len - len(layout.prefix) - len(layout.suffix)  # content tokens in an empty sequence
    if room < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room beside the special tokens {layout}")
    rows: list[list[int]] = []
    word_rows: list[list[int]] = []
    cur: list[int] = []
    cur_w: list[int] = []
    n_words = 0  # words already in `cur`: word ids are renumbered to stay unique within a sequence

    def flush() -> None:
        nonlocal cur, cur_w, n_words
        if cur:
            rows.append(layout.prefix + cur + layout.suffix)
            word_rows.append([-1] * len(layout.prefix) + cur_w + [-1] * len(layout.suffix))
        cur, cur_w, n_words = [], [], 0

    def add(piece: Sequence[int], piece_w: Sequence[int]) -> None:
        nonlocal n_words
        if cur:
            cur.extend(layout.mid)
            cur_w.extend([-1] * len(layout.mid))
        cur.extend(piece)
        present = [w for w in piece_w if w >= 0]
        if present:
            base = min(present)
            cur_w.extend(w - base + n_words if w >= 0 else -1 for w in piece_w)
            n_words += max(present) - base + 1
        else:
            cur_w.extend([-1] * len(piece))

    for d, doc in enumerate(docs):
        if not doc:
            continue
        doc_w = words[d] if words is not None else [-1] * len(doc)
        if len(doc_w) != len(doc):
            raise ValueError(f"document {d}: {len(doc_w)} word ids for {len(doc)} tokens (one word id per token)")
        while len(doc) > room:  # cut what cannot fit even an empty sequence
            flush()
            add(doc[:room], doc_w[:room])
            flush()
            doc, doc_w = doc[room:], doc_w[room:]
        if cur and len(cur) + len(layout.mid) + len(doc) > room:
            flush()
        add(doc, doc_w)
    flush()

    # Fill (N, L) arrays in one go: flat values + the flat positions they go to.
    n = len(rows)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
    flat_pos = (np.repeat(np.arange(n) * seq_len, lengths) + np.arange(int(lengths.sum()))
                - np.repeat(np.cumsum(lengths) - lengths, lengths))
    ids = np.full(n * seq_len, pad_id, dtype=np.int32)
    ids[flat_pos] = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
    att = np.zeros(n * seq_len, dtype=bool)
    att[flat_pos] = True
    packed = Packed(torch.from_numpy(ids.reshape(n, seq_len)), torch.from_numpy(att.reshape(n, seq_len)))
    if words is not None:
        wid = np.full(n * seq_len, -1, dtype=np.int32)
        wid[flat_pos] = np.fromiter((w for r in word_rows for w in r), dtype=np.int32, count=int(lengths.sum()))
        packed.word_ids = torch.from_numpy(wid.reshape(n, seq_len))
    return packed


def pack_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, with_words: bool = False) -> Packed:
    """`tokenize_documents` then `pack_documents` with the tokenizer's own special layout."""
    docs, words = tokenize_documents(tokenizer, texts, with_words=with_words)
    return pack_documents(docs, seq_len, SpecialLayout.of(tokenizer), tokenizer.pad_token_id, words)
