"""train.softmax language: each labelled position predicts among its language's ids, checked against the
joint-vocabulary loss with every other id pushed to FILL (a plainly written reference), and in training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergedistill.train.batches import Batch, batch_loss
from mergedistill.train.language_head import FILL, LanguageColumns

V, H = 30, 8
SETS = [np.array([3, 5, 7, 11, 12, 20]), np.array([4, 5, 6, 21, 22, 23, 24, 25, 29]), np.array([0, 1, 2])]


def _batch(seed=0, k=4):
    """A batch of 9 positions of three languages, interleaved, each with ids from its own set only."""
    g = torch.Generator().manual_seed(seed)
    lang = torch.tensor([0, 1, 1, 2, 0, 1, 0, 2, 1])
    n = len(lang)
    labels = torch.tensor([int(SETS[li][torch.randint(len(SETS[li]), (1,), generator=g)]) for li in lang.tolist()])
    topk = torch.stack([torch.as_tensor(SETS[li])[torch.randperm(len(SETS[li]), generator=g)[:k]]
                        if len(SETS[li]) >= k else torch.as_tensor(np.resize(SETS[li], k)) for li in lang.tolist()])
    logits = torch.randn(n, k, generator=g) * 3
    logits[3, -1] = float("-inf")  # a language with fewer than k ids: padding at -inf (id repeated)
    logits[7, -1] = float("-inf")
    masked = torch.tensor([True, True, False, True, True, True, False, True, True])
    lse = torch.logsumexp(logits, -1) + torch.rand(n, generator=g) * 2  # some mass outside the top-k ...
    small = torch.tensor([len(SETS[li]) <= k for li in lang.tolist()])
    lse[small] = torch.logsumexp(logits[small], -1)  # ... except where the top-k holds every id of the language
    dummy = torch.zeros(3, 4, dtype=torch.long)
    return Batch(dummy, dummy, dummy.bool(), labels, topk, logits, lang, torch.tensor([0, 1, 2]), masked, lse)


def test_padded_logits_are_the_decoders_logits_of_each_languages_ids_in_batch_order():
    g = torch.Generator().manual_seed(1)
    cols = LanguageColumns(SETS, V, ["de", "ru", "ja"])
    feats, weight, bias = torch.randn(9, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    lang = _batch().lang
    out = cols.logits(feats, weight, bias, lang)
    full = F.linear(feats, weight, bias)
    assert out.shape == (9, max(len(s) for s in SETS))
    for i, li in enumerate(lang.tolist()):
        ids = torch.as_tensor(SETS[li])
        assert torch.allclose(out[i, : len(ids)], full[i, ids], atol=1e-6)
        assert (out[i, len(ids):] == FILL).all()


@pytest.mark.parametrize("t,kd_target", [(1.0, "exact"), (2.0, "exact"), (1.0, "renormalised"), (2.0, "renormalised")])
@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_language_loss_and_gradients_equal_the_joint_loss_with_other_ids_at_fill(t, kd_target, alpha):
    """The reference: the whole vocabulary's logits, every id outside the position's language set to FILL,
    the plain loss on student ids. Same loss, same parts, same gradient to features, decoder and bias."""
    g = torch.Generator().manual_seed(2)
    batch = _batch()
    cols = LanguageColumns(SETS, V)
    feats, weight, bias = torch.randn(9, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)

    a = [x.clone().requires_grad_(True) for x in (feats, weight, bias)]
    got = batch_loss(cols.logits(*a, batch.lang), cols.localise(batch), alpha, t, kd_target)
    got["loss"].backward()

    b = [x.clone().requires_grad_(True) for x in (feats, weight, bias)]
    outside = torch.ones(9, V, dtype=torch.bool)
    for i, li in enumerate(batch.lang.tolist()):
        outside[i, torch.as_tensor(SETS[li])] = False
    ref = batch_loss(F.linear(*b).masked_fill(outside, FILL), batch, alpha, t, kd_target)
    ref["loss"].backward()

    for key in ("loss", "mlm", "kd"):
        assert torch.allclose(got[key], ref[key], atol=1e-5), key
    assert torch.allclose(got["mlm_per_position"], ref["mlm_per_position"], atol=1e-5)
    assert torch.equal(cols.globalise(got["top1"], batch.lang), ref["top1"])
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-5)
    # ids outside every language (8, 9, 10, ...) get no gradient at all: their rows are never computed
    assert not a[1].grad[[8, 9, 10]].any() and not a[2].grad[[8, 9, 10]].any()


def test_a_label_or_prediction_outside_its_language_is_refused_with_the_language_named():
    cols = LanguageColumns(SETS, V, ["de", "ru", "ja"])
    batch = _batch()
    wrong = batch.labels.clone()
    wrong[3] = 20  # a ja position labelled with a de id
    with pytest.raises(RuntimeError, match=r"gold token \(student id 20\) is not among ja's ids.*rerun `mergedistill data`"):
        cols.localise(Batch(**{**batch.__dict__, "labels": wrong}))
    topk = batch.topk_ids.clone()
    topk[1, 0] = 0  # a ru position with a finite teacher logit at a ja id
    with pytest.raises(RuntimeError, match="teacher prediction .* not among ru's ids"):
        cols.localise(Batch(**{**batch.__dict__, "topk_ids": topk}))
    # at -inf (no prediction) an id outside the set is padding: column 0, still at -inf
    topk = batch.topk_ids.clone()
    topk[3, -1] = 29
    local = cols.localise(Batch(**{**batch.__dict__, "topk_ids": topk}))
    assert local.topk_ids[3, -1] == 0 and local.topk_logits[3, -1] == float("-inf")


def test_an_empty_language_and_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="no ids for ru"):
        LanguageColumns([SETS[0], np.array([], dtype=np.int64)], V, ["de", "ru"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LanguageColumns([np.array([1, V])], V, ["de"])
