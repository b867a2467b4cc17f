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


def _reference_distill(s, labels, ids, vals, alpha, temp):
    """The plain formulation the fused `distill_loss` must equal."""
    return alpha * sparse_kd_loss(s, ids, vals, temp) + (1 - alpha) * mlm_loss(s, labels)


def _grads(fn, s):
    x = s.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


def test_fused_distill_loss_equals_the_plain_formulation_and_its_gradient():
    # wide rows (several chunks of the fused loss), a label equal to a teacher id (weights add up),
    # an id the vocabulary dropped (-inf)
    g = torch.Generator().manual_seed(3)
    n, v, k = 9, 300_000, 4
    s = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    ids = torch.randint(0, v, (n, k), generator=g)
    ids[0, 0] = labels[0]
    vals = torch.randn(n, k, generator=g)
    vals[1, 2] = float("-inf")
    for alpha in (0.0, 0.5, 1.0):
        for temp in (1.0, 2.0):
            fused = lambda x: distill_loss(x, labels, ids, vals, alpha, temp)["loss"]  # noqa: E731
            plain = lambda x: _reference_distill(x, labels, ids, vals, alpha, temp)  # noqa: E731
            torch.testing.assert_close(fused(s), plain(s), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(_grads(fused, s), _grads(plain, s), rtol=1e-4, atol=1e-9)
            parts = distill_loss(s, labels, ids, vals, alpha, temp)
            kd = sparse_kd_loss(s, ids, vals, temp) if alpha else torch.tensor(0.0)  # alpha 0: the teacher is not read
            torch.testing.assert_close(parts["kd"], kd, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(parts["mlm"], mlm_loss(s, labels), rtol=1e-5, atol=1e-5)
            assert torch.isfinite(parts["loss"])


def test_fused_loss_takes_bf16_logits_and_returns_a_bf16_gradient():
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(6, 5000, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 5000, (6,), generator=g)
    vals, ids = s.float().topk(8, -1)
    x = s.clone().requires_grad_(True)
    out = distill_loss(x, labels, ids, vals, 0.5, 1.0)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = _grads(lambda y: _reference_distill(y, labels, ids, vals, 0.5, 1.0), s)  # float32 arithmetic, cast back
    torch.testing.assert_close(out["loss"], _reference_distill(s, labels, ids, vals, 0.5, 1.0))
    torch.testing.assert_close(x.grad.float(), ref.float(), rtol=2e-2, atol=1e-4)


def test_a_row_without_teacher_ids_learns_from_its_gold_token_only():
    # every one of the teacher's k ids dropped by the vocabulary: the plain formulation's nansum gives
    # the row a loss of 0 but a NaN gradient, which would poison the weights; the fused loss gives
    # it the MLM part's gradient
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 40, generator=g)
    labels = torch.tensor([1, 2, 3])
    ids = torch.tensor([[4, 5], [6, 7], [8, 9]])
    vals = torch.tensor([[1.0, 0.0], [float("-inf"), float("-inf")], [0.0, 2.0]])
    grad = _grads(lambda x: distill_loss(x, labels, ids, vals, 0.5, 1.0)["loss"], s)
    assert torch.isfinite(grad).all()
    mlm_only = _grads(lambda x: 0.5 * mlm_loss(x, labels), s)
    torch.testing.assert_close(grad[1], mlm_only[1])
    kept = [0, 2]
    plain = _grads(lambda x: _reference_distill(x[kept], labels[kept], ids[kept], vals[kept], 0.5, 1.0), s)
    torch.testing.assert_close(grad[kept] * 3, plain[kept] * 2)  # means over 3 rows vs over 2


def test_fused_loss_with_no_masked_positions_is_zero_with_a_gradient():
    s = torch.zeros(0, 5, requires_grad=True)
    out = distill_loss(s, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 0.5, 1.0)
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and s.grad.shape == (0, 5)


def test_the_loss_reports_the_top1_prediction_of_each_row():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(50, 3000, generator=g)
    labels = torch.randint(0, 3000, (50,), generator=g)
    vals, ids = s.topk(4, -1)
    for alpha, temp in ((0.5, 1.0), (0.0, 1.0), (0.5, 2.0)):
        out = distill_loss(s, labels, ids, vals, alpha, temp)
        assert torch.equal(out["top1"], s.argmax(-1))
    assert torch.equal(distill_loss(s.bfloat16(), labels, ids, vals, 0.5, 1.0)["top1"], s.bfloat16().float().argmax(-1))
