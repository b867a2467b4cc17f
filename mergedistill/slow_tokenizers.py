"""Slow (Python-only) teacher tokenizers of the vocab-file WordPiece family, e.g. the Japanese BERTs'
`BertJapaneseTokenizer` (MeCab, or basic word splitting, then WordPiece or character subwords): which
ones mergedistill supports, and encoding with them through the small part of the `tokenizers.Tokenizer`
interface that the data stage and evaluation use (`encode`, `encode_batch`: ids, word ids, sequence ids).

transformers has no fast version of these (and no converter), so they are used as they are: the teacher's
ids come from the teacher's own tokenizer, and the student tokenizer is a tokenizer of the same class
whose vocab.txt lists the student's tokens in student-id order (vocab/tokenizers.py writes it).
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property

SUBWORD_KINDS = ("WordpieceTokenizer", "CharacterTokenizer")


def word_and_subword_tokenizers(hf) -> tuple[object | None, object | None]:
    """The (word splitter, subword splitter) of a BERT-style slow tokenizer, or None where it has none."""
    words = getattr(hf, "word_tokenizer", None) or getattr(hf, "basic_tokenizer", None)
    subwords = getattr(hf, "subword_tokenizer", None) or getattr(hf, "wordpiece_tokenizer", None)
    if getattr(hf, "do_subword_tokenize", True) is False:
        subwords = None
    return words, subwords


def is_vocab_file_wordpiece(hf) -> bool:
    """A slow tokenizer whose vocabulary is a vocab.txt (line = id) and whose subwords are WordPiece
    (`##` continuations) or single characters: what mergedistill can lay out in student ids."""
    if getattr(hf, "is_fast", True):
        return False
    names = getattr(type(hf), "vocab_files_names", None) or {}
    _, subwords = word_and_subword_tokenizers(hf)
    return (names.get("vocab_file") == "vocab.txt" and isinstance(getattr(hf, "vocab", None), dict)
            and type(subwords).__name__ in SUBWORD_KINDS)


def describe(hf) -> str:
    """`BertJapaneseTokenizer (words: mecab, subwords: character)` and the like, for messages."""
    parts = [f"{a.split('_')[0]}s: {getattr(hf, a)}" for a in ("word_tokenizer_type", "subword_tokenizer_type") if getattr(hf, a, None)]
    return type(hf).__name__ + (f" ({', '.join(parts)})" if parts else "")


def tokenizer_json(hf) -> dict:
    """The slow tokenizer's vocabulary as a tokenizer.json-shaped dict (a WordPiece model with `##`
    continuations, and its added tokens), which is what the vocabulary stage reads of a teacher. Its
    normalizer and word splitting stay in Python: the dict is never run, only read."""
    added = [{"id": i, "content": str(t), "special": bool(getattr(t, "special", True))}
             for i, t in sorted(hf.added_tokens_decoder.items())]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "WordPiece", "vocab": dict(hf.vocab), "unk_token": str(hf.unk_token), "continuing_subword_prefix": "##"},
    }


def settings(hf) -> dict:
    """The slow tokenizer's settings (its init arguments, without where it was loaded from), JSON-able."""
    skip = {"name_or_path", "is_local", "local_files_only", "tokenizer_file", "vocab_file", "added_tokens_decoder",
            "_commit_hash", "revision", "cache_dir", "token", "trust_remote_code", "_from_auto", "use_fast"}
    out = {}
    for k, v in hf.init_kwargs.items():
        if k in skip:
            continue
        out[k] = str(v) if type(v).__name__ == "AddedToken" else v
    return json.loads(json.dumps(out, default=str))


def fingerprint(hf) -> str:
    """Hash of what decides the slow tokenizer's output: class, settings, vocabulary, added tokens."""
    h = hashlib.sha256(type(hf).__name__.encode())
    h.update(json.dumps(settings(hf), sort_keys=True).encode())
    h.update("\n".join(t for t, _ in sorted(hf.vocab.items(), key=lambda kv: kv[1])).encode("utf-8", "surrogatepass"))
    h.update(json.dumps(tokenizer_json(hf)["added_tokens"]).encode())
    return h.hexdigest()[:16]


class SlowEncoding:
    """One encoded text, shaped like a `tokenizers.Encoding` (ids, word_ids, sequence_ids)."""

    def __init__(self, backend: "SlowBackend", text: str, ids: list[int], sequence_ids: list[int | None] | None = None):
        self._backend, self._text, self.ids = backend, text, ids
        self.sequence_ids = sequence_ids if sequence_ids is not None else [0] * len(ids)

    @cached_property
    def word_ids(self) -> list[int | None]:
        return self._backend.word_ids(self._text, self.ids)


class SlowBackend:
    """A slow transformers tokenizer behind the interface of a `tokenizers.Tokenizer` (no truncation,
    no padding): ids exactly as `tokenizer(text, add_special_tokens=False)` gives them."""

    is_fast = False
    truncation = None
    padding = None

    def __init__(self, hf):
        self.hf = hf

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[SlowEncoding]:
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> SlowEncoding:
        ids_a = self.hf.encode(text, add_special_tokens=False)
        if pair is None and not add_special_tokens:
            return SlowEncoding(self, text, ids_a)
        ids_b = self.hf.encode(pair, add_special_tokens=False) if pair is not None else None
        if not add_special_tokens:
            return SlowEncoding(self, text, ids_a + (ids_b or []), [0] * len(ids_a) + [1] * len(ids_b or []))
        ids = self.hf.build_inputs_with_special_tokens(ids_a, ids_b)
        special = self.hf.get_special_tokens_mask(ids_a, ids_b)
        seq: list[int | None] = []
        seen = 0
        for s in special:
            seq.append(None if s else (0 if seen < len(ids_a) else 1))
            seen += 0 if s else 1
        return SlowEncoding(self, text, ids, seq)

    def word_ids(self, text: str, ids: list[int]) -> list[int | None]:
        """Word index of each token: the tokenizer's own word splitting when re-running it reproduces
        the tokens (no added tokens in the text), else a new word at every token without `##`."""
        tokens = self.hf.convert_ids_to_tokens(ids)
        words, subwords = word_and_subword_tokenizers(self.hf)
        if words is not None and subwords is not None:
            split = words.tokenize(text, never_split=self.hf.all_special_tokens)
            flat = [(w, piece) for w, word in enumerate(split) for piece in subwords.tokenize(word)]
            if [p for _, p in flat] == tokens:
                return [w for w, _ in flat]
        out: list[int | None] = []
        w = -1
        for tok in tokens:
            w += 0 if tok.startswith("##") and w >= 0 else 1
            out.append(w)
        return out


def slow_backend(tokenizer) -> SlowBackend:
    """`tokenizer` (a slow transformers tokenizer, or already a SlowBackend) as a SlowBackend."""
    return tokenizer if isinstance(tokenizer, SlowBackend) else SlowBackend(tokenizer)
