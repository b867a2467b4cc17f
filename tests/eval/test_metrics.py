import math

import pytest
import torch

from conftest import patterned_texts, tiny_model, tiny_tokenizer
from mergedistill.eval.metrics import (
    UnigramBaseline,
    count_units,
    masked_eval_set,
    masked_token_accuracy,
    pseudo_log_likelihoods,
    pseudo_perplexity,
)


def hand_pll(model, tok, text):
    """Mask each token in turn with explicit single forward passes: sum of log p(true token)."""
    ids = tok(text)["input_ids"]  # [CLS] t1 .. tn [SEP]
    total = 0.0
    for i in range(1, len(ids) - 1):
        masked = list(ids)
        masked[i] = tok.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([masked])).logits[0, i]
        total += float(torch.log_softmax(logits, -1)[ids[i]])
    return total


@pytest.mark.parametrize("kind", ["wordpiece", "byte-bpe"])
def test_pll_equals_a_hand_computation(kind):
    tok, model = tiny_tokenizer(kind), tiny_model(kind)
    text = "the cat sat"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == 3
    other = "the small dog barks at the bird in the garden"
    # batch_size 2: copies of the two texts share batches, with padding
    got = pseudo_log_likelihoods(model, tok, [text, other], batch_size=2)
    assert got[0] == pytest.approx(hand_pll(model, tok, text), abs=1e-4)
    assert got[1] == pytest.approx(hand_pll(model, tok, other), abs=1e-4)


def test_pll_windows_long_texts():
    tok, model = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    text = "the cat sat on the mat the dog sat"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    first, second = tok.decode(ids[:5]), tok.decode(ids[5:])
    assert tok(first, add_special_tokens=False)["input_ids"] == ids[:5]
    # max_len 7 = 5 tokens + [CLS] + [SEP]: the text is scored as two windows
    got = pseudo_log_likelihoods(model, tok, [text], max_len=7)[0]
    assert n > 5
    assert got == pytest.approx(hand_pll(model, tok, first) + hand_pll(model, tok, second), abs=1e-4)


def test_units_and_pseudo_perplexity():
    assert count_units("Das ist  ein Satz.", "word") == 4
    assert count_units("日本語 です", "char") == 5
    assert pseudo_perplexity(-2 * math.log(10), 2) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        count_units("x", "token")


def test_unigram_baseline_against_hand_counts():
    tok = tiny_tokenizer("wordpiece")
    the, cat, dog = tok.convert_tokens_to_ids(["the", "cat", "dog"])
    assert tok("the cat the dog the", add_special_tokens=False)["input_ids"] == [the, cat, the, dog, the]
    uni = UnigramBaseline.from_texts(tok, ["the cat the", "dog the"])
    V = len(tok)
    assert uni.total == 5 and uni.top_id == the
    assert float(uni.log_probs[the]) == pytest.approx(math.log(4 / (5 + V)))
    assert float(uni.log_probs[cat]) == pytest.approx(math.log(2 / (5 + V)))
    assert float(uni.log_probs[tok.mask_token_id]) == pytest.approx(math.log(1 / (5 + V)))
    assert torch.exp(uni.log_probs).sum().item() == pytest.approx(1.0)
    ll = uni.log_likelihoods(tok, ["the dog", "cat"])
    assert ll[0] == pytest.approx(math.log(4 / (5 + V)) + math.log(2 / (5 + V)))
    assert pseudo_perplexity(ll[0], count_units("the dog", "word")) == pytest.approx(math.sqrt((5 + V) ** 2 / 8))
    labels = torch.tensor([[-100, the, dog, -100], [cat, the, -100, -100]])
    acc = uni.accuracy({"labels": labels})
    assert (acc.value, acc.count) == (0.5, 4)


def test_masked_eval_set_and_accuracy():
    tok, model = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    texts = patterned_texts(30, seed=3)
    a = masked_eval_set(tok, texts, seq_len=32, mask_prob=0.2, seed=0)
    b = masked_eval_set(tok, texts, seq_len=32, mask_prob=0.2, seed=0)
    assert torch.equal(a["input_ids"], b["input_ids"])  # fixed seed, fixed mask
    selected = a["labels"] != -100
    assert (a["input_ids"][selected] == tok.mask_token_id).all()  # evaluation masks every selected token
    score = masked_token_accuracy(model, a, batch_size=3)
    with torch.no_grad():
        logits = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).logits
    expected = (logits[selected].argmax(-1) == a["labels"][selected]).float().mean().item()
    assert score.count == int(selected.sum())
    assert score.value == pytest.approx(expected)


def test_score_pll_says_nothing_of_sequences_longer_than_the_model_takes():
    """select scores long lines in windows: transformers' "Token indices sequence length is longer than the
    specified maximum" would read as an error, so the scoring never makes the call that prints it."""
    import copy
    import logging

    from mergedistill.eval.metrics import score_pll

    tok, model = copy.deepcopy(tiny_tokenizer("wordpiece")), tiny_model("wordpiece")
    tok.model_max_length, tok.deprecation_warnings = 7, {}  # a fresh tokenizer warns once
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        text = "the cat sat on the mat the dog sat"
        score = score_pll(model, tok, [text], "word")
    finally:
        logger.removeHandler(handler)
    assert score["tokens"] == len(tok(text, add_special_tokens=False)["input_ids"]) > 5  # scored in windows of 5
    assert not [m for m in seen if "sequence length is longer" in m], seen
