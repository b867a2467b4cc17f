"""Like-for-like comparison of student and routed teacher: masked cross-entropy and restricted PLL against
plain references on a tiny model, line attribution of masked positions, the paired bootstrap against a loop,
and the report's table and summary built from rows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import patterned_texts, tiny_model, tiny_tokenizer
from mergedistill.data.masking import IGNORE_INDEX
from mergedistill.data.packing import pack_texts, tokenize_documents
from mergedistill.eval.metrics import (
    masked_eval_set,
    masked_scores,
    paired_bootstrap,
    per_unit_sums,
    pseudo_log_likelihoods,
)
from mergedistill.eval.report import Row, Table, card_md, like_for_like_counts, like_for_like_md, verdict

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- masked cross-entropy ------------------------------------------------------------------------------
def test_masked_scores_equal_a_log_softmax_gather_reference():
    tok, model = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    eset = masked_eval_set(tok, patterned_texts(12, seed=1), seq_len=32, mask_prob=0.3, seed=0)
    sel = eset["labels"] != IGNORE_INDEX
    gold = eset["labels"][sel]  # (M,)
    V = len(tok)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[torch.arange(5, V, 2)] = True  # every other id: some gold tokens fall outside
    allowed[gold[::3]] = True
    given = gold.clone()
    given[1] = -1  # a position not to score
    with torch.no_grad():
        logits = model(input_ids=eset["input_ids"].long(), attention_mask=eset["attention_mask"].long()).logits[sel]  # (M, V)
    restricted = logits.masked_fill(~allowed, float("-inf"))
    ref_logp = torch.log_softmax(restricted, -1).gather(1, gold[:, None]).squeeze(1).double()
    got = masked_scores(model, eset["input_ids"], eset["attention_mask"], sel, allowed.nonzero().squeeze(1), given, batch_size=3)
    assert got.top.tolist() == restricted.argmax(-1).tolist()
    ok = allowed[gold] & (given >= 0)
    assert ok.sum() > 5 and (~allowed[gold]).any()
    assert torch.allclose(got.gold_logp[ok], ref_logp[ok], atol=1e-5)
    assert torch.isnan(got.gold_logp[~ok]).all()  # not given, or outside the columns: not scored
    # with every id allowed it is the model's plain cross-entropy
    full = masked_scores(model, eset["input_ids"], eset["attention_mask"], sel, torch.arange(V), gold)
    ce = torch.nn.functional.cross_entropy(logits, gold).item()
    assert -full.gold_logp.mean().item() == pytest.approx(ce, abs=1e-5)


def test_masked_positions_are_attributed_to_their_lines():
    tok = tiny_tokenizer("wordpiece")
    # short lines share sequences; the long one is cut across sequences; an empty one has no tokens
    texts = ["the cat sat", "", " ".join(["the dog sat on the log"] * 6), "a bird", "the cat sleeps on the warm mat"]
    eset = masked_eval_set(tok, texts, seq_len=16, mask_prob=0.5, seed=0)
    unmasked = eset["labels"] == IGNORE_INDEX
    assert torch.equal(eset["input_ids"][unmasked], pack_texts(tok, texts, 16).input_ids[unmasked])  # packed as before
    docs, _ = tokenize_documents(tok, texts)
    line = eset["line"]
    for i, doc in enumerate(docs):
        assert int((line == i).sum()) == len(doc)
    # the original ids at each line's positions, in order, are that line's tokens
    original = torch.where(eset["labels"] != IGNORE_INDEX, eset["labels"], eset["input_ids"].long())
    for i, doc in enumerate(docs):
        assert original[line == i].tolist() == doc
    assert (line[eset["attention_mask"] == 0] == -1).all()
    assert (line[:, 0] == -1).all()  # [CLS]


# ---- restricted PLL ------------------------------------------------------------------------------------
def test_restricted_pll_equals_a_hand_computation():
    tok, model = tiny_tokenizer("wordpiece"), tiny_model("wordpiece")
    texts = ["the cat sat", "the small dog barks at the bird in the garden"]
    V = len(tok)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[torch.arange(0, V, 3)] = True
    for text in texts:
        allowed[tok(text, add_special_tokens=False)["input_ids"]] = True

    def hand(text: str) -> float:
        ids = tok(text)["input_ids"]
        total = 0.0
        for i in range(1, len(ids) - 1):
            x = list(ids)
            x[i] = tok.mask_token_id
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([x])).logits[0, i]
            total += float(torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)[ids[i]])
        return total

    got = pseudo_log_likelihoods(model, tok, texts, batch_size=4, allowed=allowed)
    assert got == pytest.approx([hand(t) for t in texts], abs=1e-4)
    plain = pseudo_log_likelihoods(model, tok, texts, batch_size=4)
    assert all(g > p for g, p in zip(got, plain))  # renormalised over fewer ids: every term rises
    missing = allowed.clone()
    missing[tok("cat", add_special_tokens=False)["input_ids"]] = False
    assert pseudo_log_likelihoods(model, tok, texts[:1], allowed=missing)[0] == float("-inf")


# ---- paired bootstrap ----------------------------------------------------------------------------------
def loop_bootstrap(a, b, c, n, seed):
    """The paired bootstrap written out: units with positions, one draw of them per resample, the ratio of
    sums of each model, their difference, then the 2.5 / 97.5 percentiles by linear interpolation."""
    keep = [i for i in range(len(c)) if c[i] > 0]
    a, b, c = [a[i] for i in keep], [b[i] for i in keep], [c[i] for i in keep]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(c), len(c))
        sa = sum(a[i] for i in idx)
        sb = sum(b[i] for i in idx)
        sc = sum(c[i] for i in idx)
        diffs.append(sa / sc - sb / sc)
    diffs.sort()

    def pct(q):
        pos = q * (len(diffs) - 1)
        lo = math.floor(pos)
        return diffs[lo] + (diffs[min(lo + 1, len(diffs) - 1)] - diffs[lo]) * (pos - lo)

    return sum(a) / sum(c) - sum(b) / sum(c), pct(0.025), pct(0.975)


def lines_of_hits(n_lines: int, p_a: float, p_b: float, seed: int):
    """Per-line hit counts of two correlated models (a is b plus extra hits) on 3-12 positions per line."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 13, n_lines)
    units = np.repeat(np.arange(n_lines), counts)
    base = rng.random(units.shape[0])
    hits_b = base < p_b
    hits_a = base < p_a
    ones = np.ones(units.shape[0])
    return per_unit_sums(hits_a, units, n_lines), per_unit_sums(hits_b, units, n_lines), per_unit_sums(ones, units, n_lines)


def test_paired_bootstrap_equals_a_loop_and_holds_the_estimate():
    a, b, c = lines_of_hits(40, 0.45, 0.40, seed=0)
    c[7] = a[7] = b[7] = 0  # a line without positions is left out
    got = paired_bootstrap(a, b, c, 300, seed=5)
    ref = loop_bootstrap(list(a), list(b), list(c), 300, seed=5)
    assert got == pytest.approx(ref, abs=1e-12)
    diff, lo, hi = got
    assert lo < diff < hi
    assert diff == pytest.approx(a.sum() / c.sum() - b.sum() / c.sum())
    assert paired_bootstrap(a, b, c, 300, seed=5) == got  # fixed seed
    assert paired_bootstrap(a, b, c, 300, seed=6) != got
    assert all(math.isnan(x) for x in paired_bootstrap(np.zeros(3), np.zeros(3), np.zeros(3), 100, 0))


def test_bootstrap_interval_narrows_like_one_over_root_lines():
    """The scaling behind eval.max_lines: 16x the lines, about a quarter of the width."""
    widths = {}
    for n in (50, 200, 800):
        diff, lo, hi = paired_bootstrap(*lines_of_hits(n, 0.45, 0.40, seed=1), 1000, seed=0)
        assert lo < diff < hi
        widths[n] = hi - lo
    assert widths[800] < widths[200] < widths[50]
    assert 0.15 < widths[800] / widths[50] < 0.4  # sqrt(50 / 800) = 0.25


def test_paired_resampling_is_narrower_than_unpaired():
    """Both models on the same draw: the shared per-line difficulty cancels."""
    a, b, c = lines_of_hits(200, 0.45, 0.40, seed=2)
    _, lo, hi = paired_bootstrap(a, b, c, 1000, seed=0)
    rng = np.random.default_rng(0)
    unpaired = []
    for _ in range(1000):
        i, j = rng.integers(0, 200, 200), rng.integers(0, 200, 200)
        unpaired.append(a[i].sum() / c[i].sum() - b[j].sum() / c[j].sum())
    lo_u, hi_u = np.percentile(unpaired, [2.5, 97.5])
    assert hi - lo < 0.5 * (hi_u - lo_u)


# ---- verdicts and the report ---------------------------------------------------------------------------
def test_verdicts():
    assert verdict(0.01, 0.03, higher_is_better=True) == "ahead"
    assert verdict(-0.01, 0.03, higher_is_better=True) == "level"
    assert verdict(-0.03, -0.01, higher_is_better=True) == "behind"
    assert verdict(-0.03, -0.01, higher_is_better=False) == "ahead"  # lower CE
    assert verdict(0.0, 0.0, higher_is_better=False) == "level"
    assert verdict(float("nan"), 0.1, True) == "-"


def rows_for(lang: str, acc: tuple, ce: tuple, teacher_acc: float = 0.5, teacher_ce: float = 2.0) -> list[Row]:
    """The intrinsic rows the like-for-like table reads, for one language: acc / ce are (diff, lo, hi)."""
    r = [Row("intrinsic", lang, "teacher:t", "routed teacher", "mlm_acc", teacher_acc, 100),
         Row("intrinsic", lang, "teacher:t", "routed teacher", "masked_ce", teacher_ce, 90),
         Row("intrinsic", lang, "teacher:t", "routed teacher", "gold_pruned", 10, 100),
         Row("intrinsic", lang, "student", "student", "mlm_acc", teacher_acc + acc[0], 100),
         Row("intrinsic", lang, "student", "student", "masked_ce", teacher_ce + ce[0], 90)]
    for metric, d in (("mlm_acc", acc), ("masked_ce", ce)):
        r += [Row("intrinsic", lang, "student", "student", f"{metric}_diff{s}", v, 20) for s, v in zip(("", "_lo", "_hi"), d)]
    return r


def test_like_for_like_table_and_summary_from_rows():
    rows = (rows_for("de", (0.02, 0.01, 0.03), (-0.1, -0.2, -0.05)) + rows_for("ru", (-0.01, -0.03, 0.01), (0.15, 0.1, 0.2))
            + rows_for("ja", (-0.05, -0.07, -0.03), (0.5, 0.4, 0.6)))
    t = Table(rows)
    assert like_for_like_counts(t) == (2, 2, 3)
    md = like_for_like_md(t)
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "+0.020 [+0.010, +0.030] | ahead" in lines["de"] and "-0.100 [-0.200, -0.050] | ahead" in lines["de"]
    assert "| level |" in lines["ru"] and "| behind |" in lines["ru"]
    assert lines["ja"].count("behind") == 2
    summary = "at or above the teacher's masked accuracy on 2 of 3 languages"
    assert summary in md and "masked CE within 0.2 nats of the teacher's (point estimate) on 2 of 3" in md
    assert summary in card_md(t, "runs/x/eval/report.md")
