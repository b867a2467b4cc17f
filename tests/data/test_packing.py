"""Packing documents into sequences in the tokenizer's own pair layout (data stage, evaluation, demo)."""
from __future__ import annotations

from conftest import tiny_tokenizer
from mergedistill.data.packing import (
    SpecialLayout,
    pack_documents,
    pack_texts,
    tokenize_documents,
)


def test_special_layout_follows_the_post_processor():
    bert = tiny_tokenizer("wordpiece")
    cls, sep = bert.cls_token_id, bert.sep_token_id
    assert SpecialLayout.of(bert) == SpecialLayout([cls], [sep], [sep])
    for kind in ("byte-bpe", "unigram"):
        tok = tiny_tokenizer(kind)
        s, e = tok.bos_token_id, tok.eos_token_id
        assert SpecialLayout.of(tok) == SpecialLayout([s], [e, e], [e])


def test_pack_documents_exact_layout():
    layout = SpecialLayout(prefix=[1], mid=[2, 2], suffix=[2])
    docs = [[10, 11], [12], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31]]
    words = [[0, 1], [0], [0, 0, 1, 2, 3, 3, 4, 5, 6], [0, 0]]
    p = pack_documents(docs, seq_len=8, layout=layout, pad_id=0, words=words)
    # room = 6 content tokens; doc 3 (9 tokens) is cut into 6 + 3; "30 31" does not fit beside the tail
    assert p.input_ids.tolist() == [
        [1, 10, 11, 2, 2, 12, 2, 0],
        [1, 20, 21, 22, 23, 24, 25, 2],
        [1, 26, 27, 28, 2, 0, 0, 0],
        [1, 30, 31, 2, 0, 0, 0, 0],
    ]
    assert p.attention_mask.sum(1).tolist() == [7, 8, 5, 4]
    # word ids: unique per sequence, shared by the pieces of a word, -1 on specials and padding
    assert p.word_ids.tolist()[0] == [-1, 0, 1, -1, -1, 2, -1, -1]
    assert p.word_ids.tolist()[1] == [-1, 0, 0, 1, 2, 3, 3, -1]
    assert p.word_ids.tolist()[2][:5] == [-1, 0, 1, 2, -1]


def test_pack_texts_with_a_real_tokenizer_round_trips():
    tok = tiny_tokenizer("wordpiece")
    texts = ["the cat sat on the mat", "the dog sat on the log"]
    p = pack_texts(tok, texts, seq_len=32)
    assert len(p) == 1
    row = p.input_ids[0][p.attention_mask[0]].tolist()
    assert row == tok(texts[0], texts[1])["input_ids"]  # the same as the tokenizer's own pair layout


def test_tokenize_documents_matches_the_tokenizer_and_ignores_its_truncation_state():
    tok = tiny_tokenizer("byte-bpe")
    texts = ["the cat sat, on the mat", "birds fly"]
    ids, words = tokenize_documents(tok, texts, with_words=True)
    enc = tok(texts, add_special_tokens=False)
    assert ids == enc["input_ids"]
    assert words == [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(2)]
    layout = SpecialLayout.of(tok)
    try:
        tok.backend_tokenizer.enable_truncation(max_length=2)  # what a call with truncation=True leaves behind
        assert tokenize_documents(tok, texts)[0] == ids
        assert SpecialLayout.of(tok) == layout
        assert tok.backend_tokenizer.truncation is not None  # the caller's tokenizer is left as it was
    finally:
        tok.backend_tokenizer.no_truncation()
