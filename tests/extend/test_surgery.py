"""Model surgery for a new language: the split embedding matrix, plugging rows into a student, the
mini-model's layers, the restricted outputs, and the estimated FLOPs against torch's own counter."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from mergedistill.extend.adapt import Adapter, adapter_flops, adapter_step, columns, curve_accuracy, loss_of
from mergedistill.extend.flops import Shapes, step_flops
from mergedistill.extend.mini import mini_logits
from mergedistill.extend.surgery import (
    NewRows,
    bias_at,
    first_layers,
    hidden_at,
    lookup,
    outputs_restricted,
    plug,
)
from mergedistill.models.mlm import masked_logits
from mergedistill.train.batches import Batch
from mergedistill.train.mini_head import MiniHead

pytestmark = pytest.mark.usefixtures("one_thread")
V0, N_NEW, H = 120, 15, 32


def tiny_student(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    m = BertForMaskedLM(BertConfig(vocab_size=V0, hidden_size=H, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=64, type_vocab_size=1, pad_token_id=0))
    with torch.no_grad():
        m.cls.predictions.bias.normal_()
    return m.eval()


def batch(ids: torch.Tensor, seed: int = 0, pad_from: int | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    att = torch.ones_like(ids)
    if pad_from is not None:
        att[-1, pad_from:] = 0
        ids = ids.masked_fill(att == 0, 0)
    sel = (torch.rand(ids.shape, generator=g) < 0.3) & att.bool()
    sel[:, 1] = True
    n = int(sel.sum())
    return Batch(ids, att, sel, ids[sel], torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0), torch.zeros(n, dtype=torch.long),
                 torch.zeros(len(ids), dtype=torch.long))


def new_rows(seed: int = 1) -> NewRows:
    g = torch.Generator().manual_seed(seed)
    return NewRows(V0, torch.randn(N_NEW, H, generator=g) * 0.05, torch.randn(N_NEW, generator=g))


def test_lookup_and_bias_equal_the_concatenated_matrix():
    old, rows = torch.randn(V0, H), torch.randn(N_NEW, H)
    ids = torch.randint(0, V0 + N_NEW, (3, 7))
    assert torch.equal(lookup(old, rows, ids), torch.cat([old, rows])[ids])
    b_old, b_new = torch.randn(V0), torch.randn(N_NEW)
    assert torch.equal(bias_at(b_old, b_new, ids), torch.cat([b_old, b_new])[ids])
    assert torch.equal(lookup(old, rows[:0], ids.clamp(max=V0 - 1)), old[ids.clamp(max=V0 - 1)])  # no new rows at all


def test_plug_keeps_every_old_weight_and_the_adapter_computes_the_plugged_student(tmp_path):
    student, rows = tiny_student(), new_rows()
    grown = plug(student, rows.rows.detach(), rows.bias.detach())
    assert grown.config.vocab_size == V0 + N_NEW and student.config.vocab_size == V0  # the original is untouched
    for (name, a), (_, b) in zip(student.state_dict().items(), grown.state_dict().items()):
        assert torch.equal(a, b[:V0]) if a.shape != b.shape else torch.equal(a, b), name
    grown.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.get_input_embeddings().weight[V0:], rows.rows.detach())
    # the adapter's forward over the split matrix is the plugged student's computation
    b = batch(torch.randint(5, V0 + N_NEW, (3, 12)), pad_from=8)
    adapter = Adapter(student, rows).eval()
    with torch.no_grad():
        ours = adapter.logits(b, None, full=True)
        theirs = masked_logits(reloaded, b.input_ids, b.attention_mask, b.selected)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # old-only inputs: the grown student's hidden states are the original's, bit for bit
    old_ids = torch.randint(5, V0, (2, 10))
    with torch.no_grad():
        h0 = student.base_model(input_ids=old_ids).last_hidden_state
        h1 = reloaded.base_model(input_ids=old_ids).last_hidden_state
    assert torch.equal(h0, h1)


def test_a_mini_models_first_layers_are_the_students():
    student = tiny_student()
    mini = first_layers(student, 2)
    assert len(mini) == 2 and all(a is b for a, b in zip(mini, student.bert.encoder.layer[:2]))
    for a, b in zip(mini, student.bert.encoder.layer):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError):
        first_layers(student, 4)
    # the mini-model's states at layer k are the student's own hidden states after k layers
    b = batch(torch.randint(5, V0, (2, 9)))
    with torch.no_grad():
        states = student.base_model(input_ids=b.input_ids, output_hidden_states=True).hidden_states
        emb = student.base_model.embeddings(input_ids=b.input_ids)
        for k in (1, 2):
            torch.testing.assert_close(hidden_at(student, emb, b.attention_mask, b.selected, k), states[k][b.selected], atol=1e-5, rtol=1e-5)
    # its head starts as the student's: on top of all layers it would reproduce the student's logits
    head = MiniHead.from_student(student, 2)
    assert torch.equal(head.dense.weight, student.cls.predictions.transform.dense.weight)
    assert torch.equal(head.bias, student.cls.predictions.bias)
    with torch.no_grad():
        logits = mini_logits(student, head, b)
        ref = head(states[2][b.selected], student.get_input_embeddings().weight)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_only_new_rows_train_and_a_step_moves_them():
    student, rows = tiny_student(), new_rows()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    mini = MiniHead.from_student(student, 1)
    for head, k in ((None, None), (mini, 1)):
        adapter = Adapter(student, rows, mini_head=head, k=k)
        names = [n for n, _ in adapter.trainable()]
        assert names == ["rows.rows", "rows.bias"]
        out_ids = torch.arange(3, V0 + N_NEW)
        b = batch(torch.randint(5, V0 + N_NEW, (2, 10)))
        loss = adapter_step(adapter, out_ids, 0.0, 1.0)(b)
        loss.backward()
        assert rows.rows.grad is not None and rows.rows.grad.abs().sum() > 0
        rows.rows.grad = rows.bias.grad = None
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_restricted_outputs_range_over_the_allowed_ids_and_are_restored():
    student = tiny_student()
    bias = student.cls.predictions.bias.detach().clone()
    allowed = torch.zeros(V0, dtype=torch.bool)
    allowed[10:20] = True
    ids = torch.randint(5, V0, (2, 8))
    sel = torch.zeros_like(ids, dtype=torch.bool)
    sel[:, 3] = True
    with torch.no_grad(), outputs_restricted(student, allowed):
        logits = masked_logits(student, ids, None, sel)
        assert bool(((logits.argmax(-1) >= 10) & (logits.argmax(-1) < 20)).all())
        assert torch.isinf(logits[:, :10]).all() and torch.isfinite(logits[:, 10:20]).all()
    assert torch.equal(student.cls.predictions.bias, bias)


def test_columns_and_losses_on_a_restricted_softmax():
    out_ids = torch.tensor([7, 3, 130])
    col = columns(out_ids, V0 + N_NEW)
    assert col[7] == 0 and col[3] == 1 and col[130] == 2 and col[4] == -1
    logits = torch.randn(2, 3)
    b = Batch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 0]]).bool(),
              torch.tensor([130, 3]), torch.tensor([[130, 9], [3, 7]]), torch.tensor([[2.0, 5.0], [1.0, 0.0]]),
              torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    parts = loss_of(logits, b, col, 0.5, 1.0)
    # id 9 is not predicted: it drops out of the teacher's distribution (all its mass on 130 for row 0)
    ref_kd = -(torch.log_softmax(logits[0], -1)[2] + (torch.softmax(torch.tensor([1.0, 0.0]), -1)
                                                       * torch.log_softmax(logits[1], -1)[[1, 0]]).sum()) / 2
    torch.testing.assert_close(parts["kd"], ref_kd)
    bad = Batch(b.input_ids, b.attention_mask, b.selected, torch.tensor([130, 4]), b.topk_ids, b.topk_logits, b.lang, b.seq_lang)
    with pytest.raises(ValueError, match="outside the ids"):
        loss_of(logits, bad, col, 0.5, 1.0)


def tiny_xmod_student(seed: int = 0):
    from transformers import XmodConfig, XmodForMaskedLM

    torch.manual_seed(seed)
    m = XmodForMaskedLM(XmodConfig(vocab_size=V0, hidden_size=H, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=64, type_vocab_size=1, pad_token_id=0, languages=["aa", "bb"],
                                   default_language="aa", adapter_reduction_factor=2))
    return m.eval()


def counted_flops(step, b: Batch) -> int:
    """torch's FLOP count of one forward and backward, with attention as plain matrix products (the CPU
    flash kernel is invisible to the counter)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step(b).backward()
    return counter.get_total_flops()


FLOP_CASES = ["full", "full-all-ids", "mini", "xmod", "full-guard"]


@pytest.mark.parametrize("case", FLOP_CASES)
def test_estimated_flops_match_torchs_count(case):
    """The per-step estimate (extend.flops) against torch's FLOP counter on a real forward and backward,
    within 0.5%: counting attention's backward as 1x its forward (4.5% of this step) or the decoder's
    weight gradient for the new rows only (2.6%) fails it."""
    from mergedistill.extend.guard import Guard

    rows = new_rows()
    if case == "xmod":
        adapter = Adapter(tiny_xmod_student(), rows, lang_id=1, train_module="bb")
    elif case == "mini":
        student = tiny_student()
        adapter = Adapter(student, rows, mini_head=MiniHead.from_student(student, 1), k=1)
    else:
        adapter = Adapter(tiny_student(), rows)
    guard = None
    if case == "full-guard":
        g = torch.Generator().manual_seed(3)
        guard = Guard(torch.randn(50, H, generator=g), torch.randn(50, generator=g), weight=1.0, batch=20, seed=0)
    b = batch(torch.randint(5, V0 + N_NEW, (4, 16)), pad_from=12)
    out_ids = None if case == "full-all-ids" else torch.arange(3, V0 + N_NEW)
    adapter.train()
    counted = counted_flops(adapter_step(adapter, out_ids, 0.5, 1.0, guard), b)
    estimated = adapter_flops(adapter, out_ids, guard)(b)
    assert abs(estimated - counted) <= 0.005 * counted, (estimated, counted)


def test_mini_head_alignment_flops_match_torchs_count():
    """The alignment step (extend.mini): the first k layers without gradients, the head trained."""
    from mergedistill.extend.mini import mini_logits
    from mergedistill.train.batches import batch_loss

    student = tiny_student().requires_grad_(False)
    head = MiniHead.from_student(student, 2)
    b = batch(torch.randint(5, V0, (4, 16)))
    counted = counted_flops(lambda x: batch_loss(mini_logits(student, head, x), x, 0.0, 1.0)["loss"], b)
    estimated = step_flops(Shapes(H, 64), batch=4, length=16, masked=int(b.labels.numel()), layers=2, v_out=V0,
                           decoder_trained=False, body_trained=False, head_trained=True, input_trained=False,
                           last_rows=4 * int(b.selected.sum(1).max()))
    assert abs(estimated - counted) <= 0.005 * counted, (estimated, counted)


def test_flops_rules():
    s = Shapes(hidden=64, intermediate=256)
    kw = dict(batch=8, length=32, masked=40, v_out=1000, decoder_trained=True, body_trained=False, head_trained=False)
    full = step_flops(s, layers=4, input_trained=True, **kw)
    mini = step_flops(s, layers=2, input_trained=True, **kw)
    assert mini < full
    # with nothing trained below the head, no gradient runs through the layers
    align = step_flops(s, layers=2, **{**kw, "head_trained": True, "decoder_trained": False}, input_trained=False)
    assert align < mini


def test_curve_accuracy_counts_hits_of_the_full_student():
    student, rows = tiny_student(), new_rows()
    adapter = Adapter(student, rows)
    b = batch(torch.randint(5, V0 + N_NEW, (3, 10)))
    out_ids = torch.arange(3, V0 + N_NEW)
    with torch.no_grad():
        pred = out_ids[adapter.logits(b, out_ids, full=True).argmax(-1)]
    expected = float((pred == b.labels).float().mean())
    assert curve_accuracy(adapter, [b], out_ids, torch.device("cpu")) == pytest.approx(expected)


def test_guard_loss_is_the_cross_entropy_increase_the_new_rows_cause():
    """ce_increase at old positions equals CE(grown student) - CE(original) on the gold (old) token."""
    from mergedistill.extend.guard import Guard, ce_increase, old_positions

    student, rows = tiny_student(), new_rows()
    grown = plug(student, rows.rows.detach(), rows.bias.detach())
    b = batch(torch.randint(5, V0, (3, 10)))
    x, lse, flops = old_positions(student, lambda i: b, int(b.selected.sum()), torch.device("cpu"))
    assert x.shape == (int(b.selected.sum()), H) and flops > 0
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(masked_logits(student, b.input_ids, b.attention_mask, b.selected), b.labels, reduction="none")
        after = torch.nn.functional.cross_entropy(masked_logits(grown, b.input_ids, b.attention_mask, b.selected), b.labels, reduction="none")
        inc = ce_increase(x, lse, rows.rows, rows.bias)
    torch.testing.assert_close(inc, after - before, atol=1e-5, rtol=1e-4)
    assert bool((inc > 0).all())
    # a guard's draws are seeded, and its gradient lowers the increase
    guard = Guard(x, lse, 1.0, 4, seed=0)
    d1, d2 = guard.sampler("cpu"), guard.sampler("cpu")
    assert all(torch.equal(a, c) for a, c in zip(d1(), d2()))
    opt = torch.optim.SGD(rows.parameters(), lr=0.5)
    start = float(ce_increase(x, lse, rows.rows, rows.bias).mean().detach())
    for _ in range(20):
        opt.zero_grad()
        ce_increase(x, lse, rows.rows, rows.bias).mean().backward()
        opt.step()
    assert float(ce_increase(x, lse, rows.rows, rows.bias).mean().detach()) < start
