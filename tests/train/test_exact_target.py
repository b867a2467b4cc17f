"""The exact-mass KD target (the teacher's stored log-normaliser, the mass outside its top-k kept as one
outcome) and distillation at unmasked positions, against plainly written references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mergedistill.train.losses import distill_loss, exact_kd_reference, exact_teacher_probs, first_occurrences, sparse_target_ce


def _case(n=6, v=40, k=5, seed=0, t=1.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * 2
    teacher_full = torch.randn(n, v, generator=g) * 3
    vals, ids = teacher_full.topk(k, dim=-1)
    lse = torch.logsumexp(teacher_full / t, dim=-1)
    labels = torch.randint(0, v, (n,), generator=g)
    return student, teacher_full, ids, vals, lse, labels


def test_exact_target_with_k_equal_to_the_vocabulary_is_the_full_kl():
    for t in (1.0, 2.0):
        student, teacher_full, ids, vals, lse, labels = _case(k=40, t=t)
        p_full = torch.softmax(teacher_full / t, -1)
        entropy = -(p_full * p_full.log()).sum(-1).mean() * t * t
        full_kl = F.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher_full / t, -1), log_target=True,
                           reduction="batchmean") * t * t
        ref = exact_kd_reference(student, ids, vals, lse, t)
        assert torch.allclose(ref - entropy, full_kl, atol=1e-4)
        got = distill_loss(student, labels, ids, vals, alpha=1.0, temperature=t, teacher_lse=lse)
        assert torch.allclose(got["loss"] - entropy, full_kl, atol=1e-4)


def test_exact_probabilities_and_the_missing_mass():
    student, teacher_full, ids, vals, lse, _ = _case(k=5)
    p, m = exact_teacher_probs(vals, lse, 1.0)
    full = torch.softmax(teacher_full, -1)
    assert torch.allclose(p, full.gather(1, ids), atol=1e-6)
    assert torch.allclose(m, 1 - full.gather(1, ids).sum(1), atol=1e-6)
    assert (m > 0).all() and m.max() > 0.1  # mass outside the top-5: the renormalised target drops it


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_fused_exact_loss_and_gradient_equal_the_plain_formulation(t, alpha):
    student, _, ids, vals, lse, labels = _case(k=5, t=t)
    vals = vals.clone()
    vals[0, -2:] = float("-inf")  # a row with fewer than k ids (padded with an id the vocabulary dropped)
    ids = ids.clone()
    ids[0, -2:] = 1
    ids[1, 3] = ids[1, 2]  # the same student id twice (two teacher pieces merged into one student token)
    masked = torch.tensor([True, False, True, True, False, True])
    x = student.clone().requires_grad_(True)
    got = distill_loss(x, labels, ids, vals, alpha=alpha, temperature=t, masked=masked, teacher_lse=lse)
    got["loss"].backward()

    y = student.clone().requires_grad_(True)
    kd = exact_kd_reference(y, ids, vals, lse, t)
    mlm = F.cross_entropy(y[masked], labels[masked])
    ref = alpha * kd + (1 - alpha) * mlm
    ref.backward()
    assert torch.allclose(got["loss"], ref, atol=1e-5)
    assert torch.allclose(x.grad, y.grad, atol=1e-5)
    assert torch.allclose(got["kd"], kd.detach(), atol=1e-5)
    assert torch.allclose(got["mlm"], mlm.detach(), atol=1e-5)


def test_the_tail_term_of_the_fused_loss_against_autograd():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=g)
    ids = torch.randint(0, 30, (4, 3), generator=g)
    tail = torch.randint(0, 30, (4, 6), generator=g)
    tail[2, 1] = tail[2, 0]
    valid = torch.rand(4, 6, generator=g) > 0.2
    w, m = torch.rand(4, 3, generator=g), torch.rand(4, generator=g)
    x = logits.clone().requires_grad_(True)
    per_pos, _, _ = sparse_target_ce(x, ids, w, tail, valid, m)
    per_pos.sum().backward()
    y = logits.clone().requires_grad_(True)
    logq = torch.log_softmax(y, -1)
    once = first_occurrences(tail, valid)
    rest = 1 - (logq.gather(1, tail).exp() * once).sum(1)
    ref = -(w * logq.gather(1, ids)).sum(1) - m * rest.log()
    ref.sum().backward()
    assert torch.allclose(per_pos, ref, atol=1e-5) and torch.allclose(x.grad, y.grad, atol=1e-5)


def test_first_occurrences_counts_each_valid_id_once():
    ids = torch.tensor([[3, 3, 5, 3], [1, 2, 1, 1]])
    valid = torch.tensor([[False, True, True, True], [True, True, True, False]])
    assert first_occurrences(ids, valid).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_kd_only_positions_get_no_mlm_term_and_no_accuracy_weight():
    student, _, ids, vals, lse, labels = _case(k=5)
    masked = torch.tensor([True, True, True, False, False, False])
    out = distill_loss(student, labels, ids, vals, alpha=0.0, temperature=1.0, masked=masked)
    assert torch.allclose(out["loss"], F.cross_entropy(student[:3], labels[:3]), atol=1e-6)
    none_masked = distill_loss(student, labels, ids, vals, alpha=0.5, temperature=1.0, masked=torch.zeros(6, dtype=torch.bool))
    assert torch.isfinite(none_masked["loss"]) and float(none_masked["mlm"]) == 0.0


def test_collate_puts_kd_only_positions_in_row_order_with_their_own_tokens_as_labels():
    import numpy as np

    from mergedistill.train.batches import collate

    k = 2
    rows = [
        {"input_ids": np.array([2, 10, 4, 12, 13, 3], dtype=np.uint16), "positions": np.array([2], dtype=np.int16),
         "labels": np.array([11], dtype=np.uint16), "kd_positions": np.array([1, 4], dtype=np.int16),
         "topk_ids": np.array([10, 5, 11, 6, 13, 7], dtype=np.uint16), "topk_logits": np.zeros(6, dtype=np.float16),
         "topk_lse": np.array([1.0, 1.5, 2.0, 2.5, 3.0, 3.5], dtype=np.float32)},
        {"input_ids": np.array([2, 4, 20, 3], dtype=np.uint16), "positions": np.array([1], dtype=np.int16),
         "labels": np.array([21], dtype=np.uint16), "kd_positions": np.array([], dtype=np.int16),
         "topk_ids": np.array([21, 8], dtype=np.uint16), "topk_logits": np.zeros(2, dtype=np.float16),
         "topk_lse": np.array([4.0, 4.5], dtype=np.float32)},
    ]
    b = collate(rows, [0, 1], k, lse_col=1)
    assert b.selected[0].nonzero().squeeze(1).tolist() == [1, 2, 4] and b.selected[1].nonzero().squeeze(1).tolist() == [1]
    assert b.labels.tolist() == [10, 11, 13, 21]
    assert b.masked.tolist() == [False, True, False, True]
    assert b.topk_ids[:, 0].tolist() == [10, 11, 13, 21]
    assert b.topk_lse.tolist() == [1.5, 2.5, 3.5, 4.5]
    assert b.lang.tolist() == [0, 0, 0, 1]
    assert collate(rows, [0, 1], k).topk_lse is None


def test_training_on_shards_with_kd_only_positions_and_the_exact_target(tmp_path, tiny_teachers, monkeypatch, capsys):
    import json

    from conftest import in_dir
    from mergedistill.cli import main
    from test_train import corpora as _c  # noqa: F401
    from test_train import write_config
    import test_train

    root = tmp_path / "corp"
    root.mkdir()
    corpora = {}
    for lang in test_train.ROUTING:
        from conftest import SENTENCES

        lines = [f"{s} {' '.join(SENTENCES[lang][(i + 1) % len(SENTENCES[lang])].split()[: i % 4])}".strip()
                 for i, s in enumerate(SENTENCES[lang] * 6)]
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / f"{lang}.valid.txt").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
        corpora[lang] = root / f"{lang}.txt"
    with in_dir(tmp_path):
        cfg = write_config(tmp_path, tiny_teachers, corpora, max_steps=8, val_every=4)
        assert main(["vocab", "--config", str(cfg)]) == 0
        assert main(["data", "--config", str(cfg), "--data.unmasked_kd_prob=0.2"]) == 0
        manifest = json.loads((tmp_path / "runs/t/data/manifest.json").read_text())
        assert manifest["languages"]["de"]["splits"]["train"]["kd_only"] > 0
        # a temperature whose log-normaliser was not stored is refused before any work
        capsys.readouterr()
        assert main(["train", "--config", str(cfg), "--data.unmasked_kd_prob=0.2", "--train.temperature=3"]) == 2
        err = capsys.readouterr().err
        assert "train.temperature" in err and "data.lse_temperatures" in err and "Traceback" not in err
        assert main(["train", "--config", str(cfg), "--data.unmasked_kd_prob=0.2", "--train.temperature=2"]) == 0
        state = json.loads((tmp_path / "runs/t/train/state.json").read_text())
        assert state["status"] == "done" and 0.0 <= state["val"]["val/acc"] <= 1.0
        assert all(v == v for v in state["val"].values())  # no NaN
