"""MiniJoint's secondary head (train.mini_head_layer): with weight 0 the primary loss path is exactly the
one without the head; with weight > 0 the head and the shared layers learn from it; it is saved and loaded
with the export; the config refuses a layer the student does not have."""
from __future__ import annotations

import copy

import pytest
import torch

from mergedistill.config import load_config
from mergedistill.errors import ConfigError
from mergedistill.models.student import build_student
from mergedistill.train.batches import Batch
from mergedistill.train.mini_head import LayerTap, MiniHead, load_mini_head, save_mini_head
from mergedistill.train.module import DistillModule
from mergedistill.vocab.joint import build_joint_vocab

pytestmark = pytest.mark.usefixtures("one_thread")
V = 90


def config(tmp_path, **train):
    (tmp_path / "t").mkdir(exist_ok=True)
    (tmp_path / "x.txt").write_text("a b\n")
    data = {"run": "r", "teachers": {"t": {"path": str(tmp_path / "t")}}, "languages": {"xx": {"train": str(tmp_path / "x.txt"), "teacher": "t"}},
            "student": {"layers": 3, "hidden": 32, "heads": 2, "intermediate": 64, "max_position": 64, "init": "random",
                        "embeddings_from_teachers": False},
            "data": {"seq_len": 64}, "train": {"alpha": 0.5, "softmax": "all", **train}}  # synthetic ids: no vocabulary
    return load_config(None, data=data)


def student_of(cfg):
    vocab = build_joint_vocab({"t": ["S[PAD]", "S[UNK]", "S[CLS]", "S[SEP]", "S[MASK]"] + [f"Wtok{i}" for i in range(V - 5)]})
    return build_student(cfg, vocab, lambda name: None)[0]


def a_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (4, 12), generator=g)
    att = torch.ones_like(ids)
    att[-1, 9:] = 0
    sel = (torch.rand(ids.shape, generator=g) < 0.25) & att.bool()
    sel[:, 2] = True
    n = int(sel.sum())
    topk = torch.randint(5, V, (n, 4), generator=g)
    return Batch(ids, att, sel, ids[sel], topk, torch.randn(n, 4, generator=g), torch.zeros(n, dtype=torch.long),
                 torch.zeros(4, dtype=torch.long))


def module(cfg, student) -> DistillModule:
    m = DistillModule(cfg, student, ["xx"])
    m.log = lambda *a, **k: None  # no trainer here: the figures are not the point
    return m.train()


def loss_and_grads(m: DistillModule, batch: Batch):
    torch.manual_seed(123)  # dropout draws the same in both modules
    loss = m._step(batch, "train")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.student.named_parameters() if p.grad is not None}


def test_weight_zero_leaves_the_primary_loss_path_unchanged(tmp_path):
    plain_cfg = config(tmp_path)
    student = student_of(plain_cfg)
    plain = module(plain_cfg, copy.deepcopy(student))
    zero = module(config(tmp_path, mini_head_layer=1, mini_head_weight=0.0), copy.deepcopy(student))
    assert plain.mini_head is None and zero.mini_head is not None
    batch = a_batch()
    l0, g0 = loss_and_grads(plain, batch)
    l1, g1 = loss_and_grads(zero, batch)
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    # the head itself got a (zero-weighted) pass: it exists in the graph but moved nothing
    assert all(p.grad is None or not p.grad.any() for p in zero.mini_head.parameters())
    # with weight 1 the head learns, and its gradient reaches the shared layers below it and the embeddings
    one = module(config(tmp_path, mini_head_layer=1, mini_head_weight=1.0), copy.deepcopy(student))
    l2, g2 = loss_and_grads(one, batch)
    assert l2 > l0
    assert one.mini_head.dense.weight.grad.abs().sum() > 0
    first = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(g2[first], g0[first])
    last = "bert.encoder.layer.2.output.dense.weight"  # above layer 1: only the primary loss reaches it
    assert torch.equal(g2[last], g0[last])
    # the optimizer holds the head's parameters
    opt = one.configure_optimizers()["optimizer"]
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in held for p in one.mini_head.parameters())


def test_layer_tap_keeps_the_output_of_layer_k(tmp_path):
    student = student_of(config(tmp_path)).eval()
    tap = LayerTap(student, 2)
    ids = torch.randint(5, V, (2, 7))
    with torch.no_grad():
        states = student.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(tap.take(), states[2])
    with pytest.raises(RuntimeError, match="no forward pass"):
        tap.take()  # handed over once
    tap.remove()
    with pytest.raises(ValueError, match="a tap after layer 3 of 3"):
        LayerTap(student, 3)  # the last layer's output is the student's own


def test_mini_head_round_trips_through_its_folder(tmp_path):
    student = student_of(config(tmp_path))
    head = MiniHead.from_student(student, 2)
    with torch.no_grad():
        head.bias.normal_()
    save_mini_head(head, tmp_path / "mini_head")
    back = load_mini_head(tmp_path / "mini_head")
    assert back.layer == 2 and all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), back.state_dict().values()))


def test_config_refuses_a_layer_the_student_does_not_have(tmp_path):
    with pytest.raises(ConfigError, match="train.mini_head_layer: 3 must be from 1 to student.layers - 1"):
        config(tmp_path, mini_head_layer=3)
    assert config(tmp_path, mini_head_layer=2).train.mini_head_layer == 2
