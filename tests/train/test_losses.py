"""The distillation losses against slow references."""
import torch

from mergedistill.train.losses import (
    dense_kd_reference,
    distill_loss,
    mlm_loss,
    sparse_kd_loss,
)


def _entropy(logits, t):
    p = torch.softmax(logits / t, -1)
    return -(p * torch.log_softmax(logits / t, -1)).sum(-1).mean() * t * t


def test_sparse_kd_with_full_k_equals_dense_kl_plus_teacher_entropy():
    g = torch.Generator().manual_seed(0)
    n, v = 7, 50
    s = torch.randn(n, v, generator=g)
    t_full = torch.randn(n, v, generator=g) * 3
    for temp in (1.0, 2.0, 0.5):
        vals, ids = t_full.topk(v, dim=-1)  # k = |V|: the whole teacher distribution, sorted
        sparse = sparse_kd_loss(s, ids, vals, temp)
        dense = dense_kd_reference(s, t_full, temp)
        # soft cross-entropy = KL + H(teacher); H has no gradient with respect to the student
        torch.testing.assert_close(sparse, dense + _entropy(t_full, temp), rtol=1e-5, atol=1e-5)
        s1 = s.clone().requires_grad_(True)
        s2 = s.clone().requires_grad_(True)
        sparse_kd_loss(s1, ids, vals, temp).backward()
        dense_kd_reference(s2, t_full, temp).backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)


def test_sparse_kd_renormalises_over_the_k_ids_and_ignores_absent_ones():
    s = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[1, 2, 3], [4, 5, 0], [7, 8, 9]])
    vals = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, float("-inf")], [0.0, 0.0, 0.0]])
    loss = sparse_kd_loss(s, ids, vals, 1.0)
    log_q = torch.log_softmax(s, -1)
    p = torch.softmax(vals, -1)
    expected = -torch.stack([
        (p[0] * log_q[0, [1, 2, 3]]).sum(),
        (p[1, :2] * log_q[1, [4, 5]]).sum(),
        (p[2] * log_q[2, [7, 8, 9]]).sum(),
    ]).mean()
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(loss)


def test_mlm_loss_is_cross_entropy_and_alpha_mixes():
    s = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 5, 2, 2])
    manual = -torch.log_softmax(s, -1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(mlm_loss(s, labels), manual)
    vals, ids = s.topk(3, -1)
    out = distill_loss(s, labels, ids, vals, alpha=0.25, temperature=2.0)
    torch.testing.assert_close(out["loss"], 0.25 * out["kd"] + 0.75 * out["mlm"])
    torch.testing.assert_close(out["kd"], sparse_kd_loss(s, ids, vals, 2.0))
    torch.testing.assert_close(out["mlm"], manual)
    torch.testing.assert_close(out["mlm_per_position"], -torch.log_softmax(s, -1)[torch.arange(4), labels])
    at_t1 = distill_loss(s, labels, ids, vals, alpha=0.5, temperature=1.0)  # the shared log-softmax path
    torch.testing.assert_close(at_t1["kd"], sparse_kd_loss(s, ids, vals, 1.0))
    only_mlm = distill_loss(s, labels, None, None, alpha=0.0, temperature=1.0)
    torch.testing.assert_close(only_mlm["loss"], manual)


def test_no_masked_positions_gives_zero_not_nan():
    s = torch.zeros(0, 5, requires_grad=True)
    assert sparse_kd_loss(s, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 1.0).item() == 0.0
    assert mlm_loss(s, torch.zeros(0, dtype=torch.long)).item() == 0.0
