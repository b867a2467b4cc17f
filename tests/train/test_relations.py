"""MiniLMv2 relation distillation (train.relation_weight): the loss against a slow reference, its
zeros, padding invariance and float32 under autocast; Q/K/V read by hooks equal the projections
computed by hand (BERT, DistilBERT, ALBERT's shared layer, XLM-R, and the last layer that masked_logits
runs at the masked positions only, BERT and X-Mod); the wiring in the training step; an online run;
settings the config or the models refuse."""
from __future__ import annotations

import copy
import math

import pytest
import test_train as tt  # its tiny shards, fixtures and helpers
import torch
from test_mini_head import a_batch, config, student_of
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XmodConfig,
    XmodForMaskedLM,
)

from mergedistill.cli import main
from mergedistill.errors import ConfigError
from mergedistill.models.mlm import masked_logits
from mergedistill.train.module import DistillModule
from mergedistill.train.relations import QKVCapture, TeacherQKV, relation_loss, routed_relation_loss

corpora, prepared, run_dir = tt.corpora, tt.prepared, tt.run_dir  # fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the loss ------------------------------------------------------------------------------------
def reference_loss(t_qkv, s_qkv, mask, heads):
    """Loops over rows, relation types, heads and valid query positions; softmax over the valid keys
    only; KL as an explicit sum."""
    terms = []
    for b in range(mask.shape[0]):
        pos = [i for i in range(mask.shape[1]) if mask[b, i]]
        for t, s in zip(t_qkv, s_qkv):
            for r in range(heads):
                dt, ds = t.shape[-1] // heads, s.shape[-1] // heads
                ta = t[b, pos, r * dt:(r + 1) * dt].double()  # (n, dt)
                sa = s[b, pos, r * ds:(r + 1) * ds].double()
                for i in range(len(pos)):
                    p = torch.softmax(ta @ ta[i] / math.sqrt(dt), 0)  # (n,) over the valid keys
                    q = torch.softmax(sa @ sa[i] / math.sqrt(ds), 0)
                    terms.append(sum(p[j] * (torch.log(p[j]) - torch.log(q[j])) for j in range(len(pos))))
    return torch.stack(terms).mean()


def qkv(B, L, H, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, generator=g) * 2 for _ in range(3)]


def padded_mask(B, L, lengths):
    return (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_relation_loss_equals_a_loop_over_heads_and_positions():
    B, L, R = 3, 7, 3
    mask = padded_mask(B, L, [7, 4, 1])  # a full row, a padded one, a single token
    t, s = qkv(B, L, 12, 0), [x.requires_grad_() for x in qkv(B, L, 6, 1)]  # other widths and head sizes
    loss = relation_loss(*t, *s, mask, R)
    assert torch.allclose(loss.double(), reference_loss(t, s, mask, R), rtol=1e-5, atol=1e-6)
    assert loss > 0
    loss.backward()
    assert all(x.grad.abs().sum() > 0 for x in s)
    assert all(not x.grad[mask == 0].any() for x in s)  # padding neither attends nor is attended to


def test_identical_queries_keys_and_values_give_zero():
    mask = padded_mask(2, 6, [6, 3])
    t = qkv(2, 6, 16, 0)
    assert abs(float(relation_loss(*t, *t, mask, 4))) < 1e-6
    # a student that matches one relation type only is not at zero
    assert relation_loss(*t, t[0], *qkv(2, 6, 16, 1)[1:], mask, 4) > 0.01


def test_bfloat16_autocast_changes_nothing():
    """Under autocast the relations would be bfloat16 matmuls and the key mask would round to -inf (NaN
    where both sides mask a key): the loss computes in float32 whatever the context."""
    mask = padded_mask(2, 6, [6, 3])
    t, s = qkv(2, 6, 8, 0), [x.requires_grad_() for x in qkv(2, 6, 8, 1)]
    plain = relation_loss(*t, *s, mask, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = relation_loss(*t, *s, mask, 2)
        mixed.backward()
    assert torch.equal(mixed, plain) and all(torch.isfinite(x.grad).all() for x in s)


def test_padding_positions_change_nothing():
    B, L, R = 2, 5, 2
    mask = padded_mask(B, L, [5, 3])
    t, s = qkv(B, L, 8, 0), qkv(B, L, 4, 1)
    loss = relation_loss(*t, *s, mask, R)
    # other values at the pad positions, and more pad positions at the end
    noise = qkv(B, L + 4, 8, 2) + qkv(B, L + 4, 4, 3)
    grown = []
    for x, n in zip(t + s, noise):
        y = n.clone()
        y[:, :L][mask.bool()] = x[mask.bool()]
        grown.append(y)
    mask2 = torch.cat([mask, torch.zeros(B, 4, dtype=torch.long)], 1)
    assert torch.allclose(relation_loss(*grown, mask2, R), loss, rtol=1e-6, atol=1e-7)
    # a row of padding only adds nothing and stays finite
    mask3 = torch.cat([mask2, torch.zeros(1, L + 4, dtype=torch.long)])
    extra = [torch.cat([x, x[:1]]) for x in grown]
    assert torch.allclose(relation_loss(*extra, mask3, R), loss, rtol=1e-6, atol=1e-7)


def test_a_width_the_relation_heads_do_not_divide_is_refused():
    mask = padded_mask(1, 4, [4])
    with pytest.raises(ValueError, match=r"train.relation_heads: 3 does not divide the teacher's attention width 8"):
        relation_loss(*qkv(1, 4, 8, 0), *qkv(1, 4, 6, 1), mask, 3)
    with pytest.raises(ConfigError, match=r"train.relation_heads: 4 does not divide teacher 'wide''s attention width 6"):
        routed_relation_loss({"wide": TeacherQKV(torch.tensor([0]), *qkv(1, 4, 6, 0))}, *qkv(1, 4, 8, 1), mask, 4)


def test_rows_compare_with_their_own_teacher_weighted_by_rows():
    B, L, R = 5, 6, 2
    mask = padded_mask(B, L, [6, 5, 2, 6, 4])
    s = qkv(B, L, 8, 0)
    a, b = torch.tensor([0, 3, 4]), torch.tensor([1, 2])
    ta, tb = qkv(3, L, 16, 1), qkv(2, L, 4, 2)  # teachers of other widths than each other and the student
    got = routed_relation_loss({"a": TeacherQKV(a, *ta), "b": TeacherQKV(b, *tb)}, *s, mask, R)
    la = relation_loss(*ta, *(x[a] for x in s), mask[a], R)
    lb = relation_loss(*tb, *(x[b] for x in s), mask[b], R)
    assert torch.allclose(got, (3 * la + 2 * lb) / 5)


# ---- reading Q/K/V -------------------------------------------------------------------------------
SIZES = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=40)


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(**SIZES)).eval()
    if kind == "xlm-roberta":
        return XLMRobertaForMaskedLM(XLMRobertaConfig(**SIZES)).eval()
    if kind == "distilbert":
        return DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                      max_position_embeddings=40)).eval()
    if kind == "albert":  # one shared layer group run num_hidden_layers = 3 times
        return AlbertForMaskedLM(AlbertConfig(**{**SIZES, "num_hidden_layers": 3}, embedding_size=16)).eval()
    if kind == "xmod":
        return XmodForMaskedLM(XmodConfig(**SIZES, languages=["en_XX", "de_DE"], default_language="en_XX")).eval()
    raise ValueError(kind)


def by_hand(model, ids, mask, layer: int):
    """The layer's Q/K/V from its input (the hidden states the full forward reports) and its own modules."""
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        mt = model.config.model_type
        if mt == "distilbert":
            att = model.distilbert.transformer.layer[layer].attention
            mods = att.q_lin, att.k_lin, att.v_lin
        elif mt == "albert":
            att = model.albert.encoder.albert_layer_groups[0].albert_layers[0].attention
            mods = att.query, att.key, att.value
        else:
            att = model.base_model.encoder.layer[layer].attention.self
            mods = att.query, att.key, att.value
        return [m(states[layer]) for m in mods]


@pytest.mark.parametrize("kind", ["bert", "distilbert", "albert", "xlm-roberta"])
def test_capture_equals_the_projections_by_hand(kind):
    model = tiny(kind)
    ids = torch.randint(5, 50, (2, 9))
    mask = padded_mask(2, 9, [9, 6])
    n = model.config.num_hidden_layers
    for layer in range(n):
        expected = by_hand(model, ids, mask, layer)
        with QKVCapture(model, layer - n if layer % 2 else layer) as cap, torch.no_grad():  # negative indices too
            model(input_ids=ids, attention_mask=mask)
        got = cap.take()
        assert all(g.shape == (2, 9, 32) for g in got)
        assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected)), (kind, layer)
    # the hooks are gone after the block
    assert all(not m._forward_hooks for m in cap.modules)


@pytest.mark.parametrize("kind", ["bert", "xmod"])
def test_capture_of_the_last_layer_through_masked_logits_has_every_position(kind):
    """masked_logits computes the last layer's queries at the masked positions only; the capture gives
    the queries at every position, as the full layer computes them."""
    model = tiny(kind)
    ids = torch.randint(5, 50, (2, 9))
    mask = padded_mask(2, 9, [9, 6])
    selected = torch.zeros(2, 9, dtype=torch.bool)
    selected[0, [1, 4]] = selected[1, 2] = True
    expected = by_hand(model, ids, mask, 1)
    lang = {"lang_ids": torch.zeros(2, dtype=torch.long)} if kind == "xmod" else {}
    with QKVCapture(model, -1) as cap, torch.no_grad():
        masked_logits(model, ids, mask, selected, **lang)
    got = cap.take()
    assert all(g.shape == (2, 9, 32) for g in got)
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))
    with pytest.raises(RuntimeError, match="no forward pass"):
        cap.take()  # handed over once


def test_capture_refuses_other_models_and_missing_layers():
    """Settings the models cannot serve are input errors (exit 2), named by their field."""
    electra = ElectraForMaskedLM(ElectraConfig(**SIZES, embedding_size=16))
    with pytest.raises(ConfigError, match=r"train.relation_teacher_layer \(teacher e\): .*ElectraForMaskedLM \(model_type 'electra'\) "
                                         r"is none of them"):
        QKVCapture(electra, -1, "train.relation_teacher_layer (teacher e)")
    with pytest.raises(ConfigError, match=r"train.relation_student_layer: 2 is not a layer of this 2-layer BertForMaskedLM; "
                                         r"allowed -2 to 1"):
        QKVCapture(tiny("bert"), 2, "train.relation_student_layer")
    with pytest.raises(ConfigError, match="-4 is not a layer of this 3-layer AlbertForMaskedLM"):
        QKVCapture(tiny("albert"), -4)


# ---- the training step ---------------------------------------------------------------------------
class StubTeachers:
    """What OnlineTeachers.predict returns, with fixed teacher Q/K/V (two teachers, 64 and 16 wide)."""

    def __init__(self, teachers):
        self.teachers, self.calls = teachers, []

    def predict(self, batch, relation_layer=None):
        self.calls.append(relation_layer)
        return batch if relation_layer is None else (batch, self.teachers)


def test_the_step_adds_the_weighted_relation_loss_from_the_students_own_forward(tmp_path):
    batch = a_batch()  # 4 rows of 12, the last one padded
    teachers = {"a": TeacherQKV(torch.tensor([0, 2]), *qkv(2, 12, 64, 5)),
                "b": TeacherQKV(torch.tensor([1, 3]), *qkv(2, 12, 16, 6))}
    student = student_of(config(tmp_path))  # 3 layers, 32 wide
    runs = {}
    for w in (0.0, 0.5):
        cfg = config(tmp_path, mode="online", relation_weight=w, relation_heads=4, relation_student_layer=0)
        m = DistillModule(cfg, copy.deepcopy(student), ["xx"], online=StubTeachers(teachers)).eval()  # eval: no dropout
        logged = {}
        m.log = lambda name, value, **k: logged.__setitem__(name, value)
        forwards = []
        m.student.base_model.embeddings.register_forward_hook(lambda *a: forwards.append(1))
        loss = m._step(batch, "train")
        loss.backward()
        runs[w] = loss.detach(), dict(m.student.named_parameters()), logged, m.online.calls, len(forwards)
    (l0, p0, log0, calls0, f0), (l1, p1, log1, calls1, f1) = runs[0.0], runs[0.5]
    assert calls0 == [None] and calls1 == [-1] and f0 == f1 == 1  # the teachers' layer -1; one student forward
    assert "train/relation_loss" not in log0
    s = by_hand(student.eval(), batch.input_ids, batch.attention_mask, 0)
    expected = routed_relation_loss(teachers, *s, batch.attention_mask, 4)
    assert torch.allclose(log1["train/relation_loss"], expected, atol=1e-6)
    assert torch.allclose(l1, l0 + 0.5 * expected, atol=1e-6) and torch.allclose(log1["train/loss"], l1)
    # the relation term reaches the student's layer 0 (and below), not the layers above it
    q0 = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(p1[q0].grad, p0[q0].grad)
    above = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(p1[above].grad, p0[above].grad)


def test_online_training_with_relations_logs_the_relation_loss(run_dir, tiny_teachers, corpora, monkeypatch):
    """A short online run: the loss with the relation term stays finite and train/loss holds it;
    predict gives exactly the batch it gives without relations, plus each teacher's Q/K/V for its rows."""
    from mergedistill.train import online

    real, seen = online.OnlineTeachers.predict, []

    def checked(self, batch, relation_layer=None):
        state = self.gen.get_state()
        out, qkv = real(self, batch, relation_layer=relation_layer)
        after = self.gen.get_state()
        self.gen.set_state(state)
        plain = real(self, batch)  # the old behaviour, from the same random state
        assert torch.equal(self.gen.get_state(), after)
        same = [(a is None and b is None) or torch.equal(a, b) for a, b in zip(vars(out).values(), vars(plain).values())]
        assert len(vars(out)) == len(vars(plain)) and all(same)
        rows = sorted(i for t in qkv.values() for i in t.rows.tolist())
        assert rows == list(range(batch.input_ids.shape[0]))
        assert all(x.shape == (len(t.rows), batch.input_ids.shape[1], 32) for t in qkv.values() for x in (t.q, t.k, t.v))
        seen.append(set(qkv))
        return out, qkv

    monkeypatch.setattr(online.OnlineTeachers, "predict", checked)
    cfg = tt.write_config(run_dir, tiny_teachers, corpora, mode="online", max_steps=20, relation_weight=1.0, relation_heads=4)
    assert main(["train", "--config", str(cfg)]) == 0
    assert len(seen) == 20 and set.union(*seen) == {"wp", "uni", "bbpe"}  # mixed batches: several teachers
    rows = tt.metrics(run_dir)
    rel = tt.series(rows, "train/relation_loss")
    assert [s for s, _ in rel] == [s for s, _ in tt.series(rows, "train/loss")] and len(rel) == 2
    assert all(math.isfinite(v) and v > 0 for _, v in rel)
    for r in rows:  # train/loss = alpha KD + (1 - alpha) MLM + weight x relation, at every written step
        if r.get("train/relation_loss"):
            parts = 0.5 * float(r["train/kd_loss"]) + 0.5 * float(r["train/mlm_loss"]) + float(r["train/relation_loss"])
            assert math.isclose(float(r["train/loss"]), parts, rel_tol=1e-4)


# ---- the config ----------------------------------------------------------------------------------
def test_config_refuses_relations_without_online_teachers(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, relation_weight=0.5)  # mode offline (the default)
    msg = str(e.value)
    assert "train.relation_weight: 0.5 needs train.mode: online with train.alpha > 0 (now mode offline, alpha 0.5)" in msg
    with pytest.raises(ConfigError) as e:
        config(tmp_path, relation_weight=0.5, mode="online", relation_heads=3, relation_student_layer=3)
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "train.relation_heads: 3 must divide student.hidden (32)" in msg
    assert "train.relation_student_layer: 3 must be from -3 to 2" in msg
    cfg = config(tmp_path, relation_weight=0.5, mode="online", relation_student_layer=-3)
    assert (cfg.train.relation_weight, cfg.train.relation_heads, cfg.train.relation_teacher_layer) == (0.5, 8, -1)
    assert config(tmp_path, relation_heads=3).train.relation_heads == 3  # unchecked while relations are off


def test_a_teacher_layer_the_teachers_lack_stops_training_as_bad_input(run_dir, tiny_teachers, corpora, capsys):
    cfg = tt.write_config(run_dir, tiny_teachers, corpora, mode="online", max_steps=5, relation_weight=1.0, relation_heads=4,
                          relation_teacher_layer=2)
    assert main(["train", "--config", str(cfg)]) == 2
    out = capsys.readouterr()
    # refused by the preflight, before any work (it used to be found when training started)
    assert "train.relation_teacher_layer: 2 is not a layer of teacher " in out.err and "(2 layers); allowed -2 to 1" in out.err
    assert "nothing was run" in out.err
