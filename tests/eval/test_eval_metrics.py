"""The evaluation's metrics against hand computations: masked top-1 / accuracy / agreement, PLL per word
and bits per char, pooling, retrieval accuracy@1 and the aligned pairs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import SingleModelPool, tiny_model, tiny_tokenizer
from mergedistill.eval.metrics import (
    bits_per_char,
    hit_rate,
    masked_top1,
    mean_pool,
    pll_per_unit,
    to_student_ids,
)
from mergedistill.eval.retrieval import (
    aligned_pairs,
    embed_texts,
    read_keyed,
    retrieval_accuracy,
)
from mergedistill.eval.stage import _pll_rows
from mergedistill.tokens import UNK_ID

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- masked predictions, accuracy, agreement -------------------------------------------------------
def test_masked_top1_equals_full_forward_argmax_and_respects_allowed():
    tok, model = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    enc = tok(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[0, [1, 3, 5]] = True
    selected[1, 2] = True
    ids = ids.masked_fill(selected, tok.mask_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[selected]  # (4, V)
    top, none = masked_top1(model, ids, att, selected, batch_size=1)  # one row per batch: cut to its own length
    assert none is None and top.tolist() == logits.argmax(-1).tolist()
    # forbid each position's favourite: the answer becomes the runner-up
    allowed = torch.ones(logits.shape[1], dtype=torch.bool)
    allowed[logits.argmax(-1)] = False
    _, kept = masked_top1(model, ids, att, selected, batch_size=8, allowed=allowed)
    expect = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    assert kept.tolist() == expect.tolist() and not (kept == top).any()


def test_accuracy_and_agreement_on_a_constructed_case():
    # teacher ids 0..5 -> student ids; teacher token 4 was pruned (-1)
    idmap = np.array([7, 8, 9, 10, -1, 12], dtype=np.int32)
    gold_t = torch.tensor([0, 1, 2, 4, 5])
    teacher_pred = torch.tensor([0, 1, 3, 3, 5])  # teacher right on 0, 1, 5
    student_pred = torch.tensor([7, 9, 10, UNK_ID, 12])
    gold_s = to_student_ids(idmap, gold_t, pruned=None)
    assert gold_s.tolist() == [7, 8, 9, -1, 12]
    assert to_student_ids(idmap, gold_t).tolist() == [7, 8, 9, UNK_ID, 12]  # model inputs: pruned -> [UNK]
    assert hit_rate(teacher_pred, gold_t) == pytest.approx(3 / 5)
    assert hit_rate(student_pred, gold_s) == pytest.approx(2 / 5)  # predicting [UNK] for a pruned gold is a miss
    assert hit_rate(student_pred, to_student_ids(idmap, teacher_pred, pruned=None)) == pytest.approx(3 / 5)  # 7, 10, 12
    assert math.isnan(hit_rate(torch.zeros(0), torch.zeros(0)))


# ---- PLL per word / bits per char ----------------------------------------------------------------------
def explicit_pll(model, tok, text: str) -> float:
    """One forward pass per token, each with that token masked: sum of log p(true token)."""
    ids = tok(text)["input_ids"]
    total = 0.0
    for i in range(1, len(ids) - 1):
        x = list(ids)
        x[i] = tok.mask_token_id
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, i], -1)
        total += float(logp[ids[i]])
    return total


def test_pll_per_word_and_bits_per_char_of_a_three_token_sentence():
    tok, model = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    text = "the cat sat"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == 3
    hand = explicit_pll(model, tok, text)
    rows, _ = _pll_rows(SingleModelPool(model, tok), "student", "en", [text], "word", batch_size=2)
    got = {r.metric: r.value for r in rows}
    assert got["pll_per_word"] == pytest.approx(hand / 3, abs=1e-5)
    assert got["pppl"] == pytest.approx(math.exp(-hand / 3), rel=1e-4)
    assert (got["tokens_scored"], got["words_scored"]) == (3, 3)
    rows, _ = _pll_rows(SingleModelPool(model, tok), "student", "ja", [text], "char", batch_size=2)
    got = {r.metric: r.value for r in rows}
    assert got["bits_per_char"] == pytest.approx(-hand / (9 * math.log(2)), abs=1e-5)  # 9 non-space characters
    assert got["pppl"] == pytest.approx(math.exp(-hand / 9), rel=1e-4) and got["chars_scored"] == 9
    assert "pll_per_word" not in got


def test_unit_formulas():
    assert bits_per_char(-10 * math.log(2), 5) == pytest.approx(2.0)
    assert pll_per_unit(-6.0, 4) == -1.5
    with pytest.raises(ValueError):
        bits_per_char(-1.0, 0)


# ---- pooling and embeddings ----------------------------------------------------------------------------
def test_mean_pool_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 7.0], [0.0, 0.0]]])
    keep = torch.tensor([[True, True, False], [False, True, False]])
    assert mean_pool(h, keep).tolist() == [[2.0, 3.0], [7.0, 7.0]]
    assert mean_pool(h, torch.zeros_like(keep)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_embeddings_average_the_last_layer_without_specials():
    tok, model = tiny_tokenizer("byte-bpe"), tiny_model("byte-bpe")
    texts = ["the cat sat on the mat", "a dog", "the bird sings in the tree"]
    got = embed_texts(model, tok, texts, max_len=32, batch_size=2)  # batches mix lengths: padding must not leak
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]  # <s> ... </s>
        with torch.no_grad():
            h = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        assert torch.allclose(got[i], h[1:-1].mean(0), atol=1e-5), text


# ---- retrieval -----------------------------------------------------------------------------------------
def test_retrieval_accuracy_on_constructed_embeddings():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(50, 16, generator=g)
    assert retrieval_accuracy(src, src + 0.01 * torch.randn(50, 16, generator=g)) == 1.0
    derangement = torch.roll(torch.arange(50), 1)
    assert retrieval_accuracy(src, src[derangement]) == 0.0
    perm = torch.arange(50)
    perm[:10] = torch.roll(perm[:10], 1)  # 10 rows moved, 40 in place
    assert retrieval_accuracy(src, src[perm]) == pytest.approx(0.8)


def test_centering_removes_a_language_offset():
    g = torch.Generator().manual_seed(1)
    meaning = torch.randn(40, 8, generator=g)
    lang_a, lang_b = torch.zeros(8), torch.zeros(8)
    lang_a[0], lang_b[1] = 50.0, 50.0
    # the offset of one language lines up with some meanings more than others: uncentred cosine follows it
    src, tgt = meaning + lang_a, meaning * 0.5 + lang_b
    assert retrieval_accuracy(src, tgt, center=True) == 1.0
    assert retrieval_accuracy(src, tgt, center=False) < 0.5


def test_aligned_pairs_need_twenty_shared_keys_and_are_capped():
    keyed = {
        "de": {f"k{i}": f"de {i}" for i in range(30)},
        "en": {f"k{i}": f"en {i}" for i in range(5, 40)},  # 25 shared with de
        "ja": {f"k{i}": f"ja {i}" for i in range(21, 60)},  # 9 with de, 19 with en: no pair
    }
    pairs = aligned_pairs(keyed, max_pairs=12, seed=0)
    assert list(pairs) == [("de", "en")]
    keys = pairs[("de", "en")]
    assert len(keys) == 12 and len(set(keys)) == 12 and all(5 <= int(k[1:]) < 30 for k in keys)
    assert aligned_pairs(keyed, max_pairs=12, seed=0) == pairs  # deterministic
    assert aligned_pairs(keyed, max_pairs=12, seed=1)[("de", "en")] != keys  # the seed picks the sample
    assert len(aligned_pairs(keyed, max_pairs=500)[("de", "en")]) == 25


def test_read_keyed_keeps_first_paragraph_per_key(tmp_path):
    p = tmp_path / "test.jsonl"
    rows = [{"text": "a", "key": "x"}, {"text": "b", "key": None}, {"text": "c", "key": "x"}, {"text": " d ", "key": "y"},
            {"text": "  ", "key": "z"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_keyed(str(p), "t") == {"x": "a", "y": "d"}
    (tmp_path / "test.txt").write_text("a\nb\nc\nd\n")  # plain text read beside its JSON-lines twin
    assert read_keyed(str(tmp_path / "test.txt"), "t") == {"x": "a", "y": "d"}
    (tmp_path / "other.txt").write_text("a\nb\n")
    assert read_keyed(str(tmp_path / "other.txt"), "t") == {}
