"""Paragraph cleaning: normalise whitespace, drop fragments, drop untranslated English, deduplicate.

The per-paragraph filters (`normalize`, `too_short`, `EnglishFilter`) are pure and language-aware;
`Deduplicator` is the one stateful step, fed documents in split order by the builder so that a
paragraph repeated across splits is kept only in the first (train), never leaking into valid/test.
"""
from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import Counter
from functools import lru_cache

logger = logging.getLogger(__name__)

# Zero-width and invisible characters that are not whitespace to str.split(): ZWSP, word joiner,
# BOM, soft hyphen. (ZWJ/ZWNJ stay: they carry meaning in some scripts.)
INVISIBLE = re.compile("[\u200b\u2060\ufeff\u00ad]")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Ideographs, kana, CJK punctuation and full-width forms: a space between two of these is an artefact
# of joining source lines (Chinese and Japanese put no spaces between words).
_CJK = "\u3000-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
CJK_SPACE = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")
# Characters that count towards a CJK paragraph's length: ideographs and kana only (not punctuation).
CJK_CHAR = re.compile("[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# langid reads text byte by byte in Python; the first characters decide the language just as well
# (on 20k real paragraphs per language, 500 characters changed <0.1% of decisions) at a fraction of the cost.
LANGID_CHARS = 500
# Targets whose own script is not Latin: a paragraph that is mostly non-Latin letters cannot be
# untranslated English, so langid is not asked (it never said "en" for one on the real corpora).
NON_LATIN_TARGETS = frozenset({"ru", "ja", "zh", "el", "uk", "ko"})
LATIN_LETTER = re.compile("[A-Za-z\u00c0-\u024f]")
LETTER = re.compile(r"[^\W\d_]")

MIN_WORDS = 3
"""Paragraphs with fewer whitespace-separated words are fragments (headings like "OPTIONS", "Neu")."""
MIN_CJK_CHARS = 6
"""Same for Chinese/Japanese, counted in ideographs and kana."""


def normalize(text: str, cjk: bool = False) -> str:
    """NFC, no control/invisible characters, whitespace runs collapsed to one space, trimmed; for
    CJK languages also no space between two CJK characters."""
    text = unicodedata.normalize("NFC", text)
    text = INVISIBLE.sub("", CONTROL.sub(" ", text))
    text = " ".join(text.split())
    if cjk:
        text = CJK_SPACE.sub("", text)
    return text


def size(text: str, cjk: bool = False) -> int:
    """Words (whitespace-separated) or, for CJK languages, non-space characters: the corpus unit."""
    return len(text) - text.count(" ") if cjk else len(text.split())


def too_short(text: str, cjk: bool = False) -> bool:
    """A fragment: fewer than MIN_WORDS words, or for CJK fewer than MIN_CJK_CHARS ideographs/kana."""
    if cjk:
        return len(CJK_CHAR.findall(text)) < MIN_CJK_CHARS
    return len(text.split()) < MIN_WORDS


@lru_cache(maxsize=None)
def _identifier(target: str):
    """A langid identifier restricted to {target, en}; loading the model takes about a second, so one
    per process and language."""
    from langid.langid import LanguageIdentifier, model

    ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    try:
        ident.set_languages([target, "en"])
    except ValueError as e:
        raise ValueError(f"langid does not know the language code {target!r}; fix `langid=` for it in "
                         f"mergedistill/corpora/sources.py") from e
    return ident


class EnglishFilter:
    """Spots untranslated English left in a localised text: langid choosing between exactly the
    target language and English (restricting the choice is what makes short paragraphs reliable)."""

    def __init__(self, target: str | None):
        self.target = target
        self._ident = _identifier(target) if target and target != "en" else None

    def is_english(self, text: str) -> bool:
        if self._ident is None:
            return False
        if self.target in NON_LATIN_TARGETS and len(LATIN_LETTER.findall(text)) * 2 < len(LETTER.findall(text)):
            return False
        return self._ident.classify(text[:LANGID_CHARS])[0] == "en"


class Deduplicator:
    """Keeps the first occurrence of each paragraph (exact match after normalisation)."""

    def __init__(self):
        self._seen: set[bytes] = set()

    def first(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True


def clean_paragraphs(paras, cjk: bool, english: EnglishFilter, dropped: Counter) -> list:
    """Normalised (key, text) pairs of one document without fragments and untranslated English;
    counts what it drops by reason in `dropped` ("tiny", "english"). Deduplication comes later."""
    out = []
    for key, raw in paras:
        text = normalize(raw, cjk)
        if too_short(text, cjk):
            dropped["tiny"] += 1
        elif english.is_english(text):
            dropped["english"] += 1
        else:
            out.append((key, text))
    return out
