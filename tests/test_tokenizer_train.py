"""tokenizer_train: every family trains to the same tokenizer.json in any process (the `tokenizers` library's
WordPiece and Unigram trainers alone do not: their hash maps are seeded at random per process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import SENTENCES, patterned_texts
from mergedistill.tokenizer_train import KINDS, special_tokens_in_order, train_tokenizer

TEXTS = [f"{s} ({i})" for i in range(10) for lang in ("en", "de", "ru", "ja") for s in SENTENCES[lang]] + patterned_texts(300)

_TRAIN_ALL = """
import hashlib, json, sys
sys.path.insert(0, {tests!r})
from test_tokenizer_train import TEXTS
from mergedistill.tokenizer_train import KINDS, train_tokenizer
print(json.dumps({{k: train_tokenizer(k, TEXTS, 300).backend_tokenizer.to_str() for k in KINDS}}))
"""


def test_every_family_trains_to_the_same_bytes_in_another_process():
    """Two fresh processes (other hash seeds, Python's and the Rust library's): the same tokenizer.json, byte for
    byte. Without the fixes in tokenizer_train, wordpiece and unigram differ from one process to the next."""
    code = _TRAIN_ALL.format(tests=str(Path(__file__).parent))
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      env={**os.environ, "PYTHONHASHSEED": seed}).stdout) for seed in ("1", "2")]
    assert sorted(runs[0]) == sorted(KINDS)
    for kind in KINDS:
        assert runs[0][kind] == runs[1][kind], f"{kind}: another tokenizer in another process"


def test_wordpiece_numbers_its_continuations_in_order_and_adds_only_the_specials():
    tok = train_tokenizer("wordpiece", TEXTS, 300)
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert [t["content"] for t in spec["added_tokens"]] == special_tokens_in_order("wordpiece")
    vocab = spec["model"]["vocab"]
    continuations = [p for p in sorted(vocab, key=vocab.get) if p.startswith("##") and len(p) == 3]
    assert continuations == sorted(continuations) and "##s" in continuations
    assert [vocab[p] for p in continuations] == list(range(5, 5 + len(continuations)))  # right after the specials
    assert "##s" not in tok.all_special_tokens  # a plain piece, not an added token


def test_unigram_comes_from_sentencepiece_with_the_specials_first():
    tok = train_tokenizer("unigram", TEXTS, 300)
    spec = json.loads(tok.backend_tokenizer.to_str())
    pieces = [p for p, _ in spec["model"]["vocab"]]
    assert pieces[:5] == special_tokens_in_order("unigram") and spec["model"]["unk_id"] == 3
    assert 100 < len(pieces) <= 300 and len(set(pieces)) == len(pieces)
    scores = [s for _, s in spec["model"]["vocab"][5:]]
    assert scores == sorted(scores, reverse=True)
    chars = {c for t in TEXTS for c in t if not c.isspace()}
    assert chars <= set(pieces)  # every character of the text is a piece
    assert "<unk>" not in tok.tokenize("Über den Wolken 学校")
    assert [t["content"] for t in spec["added_tokens"]] == special_tokens_in_order("unigram")
