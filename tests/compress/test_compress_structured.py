"""Structured pruning: removing heads, neurons and layers equals masking them in the full model; the
smaller model saves and loads; importance picks the units whose removal hurts least."""
from __future__ import annotations

import copy

import pytest
import torch
from _tiny import inputs, tiny_bert
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from mergedistill.compress.disparity import spearman
from mergedistill.compress.importance import choose_heads, choose_layers, choose_neurons, taylor_importance
from mergedistill.compress.structured import PrunedBertForMaskedLM, drop_layers, heads_of, load_pruned, prune_heads, prune_neurons
from mergedistill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids, att):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=att).logits


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the references: the same units masked (zeroed) in the full model -------------------------
@torch.no_grad()
def mask_heads(model, heads):
    for li, hs in heads.items():
        att = model.bert.encoder.layer[li].attention
        d = att.self.attention_head_size
        for h in hs:
            att.self.value.weight[h * d:(h + 1) * d] = 0  # the head's values are 0, so its output is 0
            att.self.value.bias[h * d:(h + 1) * d] = 0


@torch.no_grad()
def mask_neurons(model, neurons):
    for li, ns in neurons.items():
        model.bert.encoder.layer[li].output.dense.weight[:, ns] = 0  # the neuron's output feeds nothing


def mask_layers(model, layers):
    for li in layers:  # the layer passes its input through unchanged
        model.bert.encoder.layer[li].register_forward_hook(lambda mod, args, out: args[0])


def test_removing_heads_equals_masking_them():
    heads = {0: [1, 3], 1: [0]}
    full, small = tiny_bert(heads=4), tiny_bert(heads=4)
    mask_heads(full, heads)
    prune_heads(small, heads)
    ids, att = inputs()
    assert torch.allclose(logits(small, ids, att), logits(full, ids, att), atol=1e-5)
    assert [heads_of(layer) for layer in small.bert.encoder.layer] == [2, 3]
    assert small.bert.encoder.layer[0].attention.self.query.weight.shape == (2 * 8, 32)
    assert n_params(small) == n_params(full) - 3 * (3 * (8 * 32 + 8) + 8 * 32)  # q, k, v rows + output columns


def test_removing_neurons_equals_masking_them():
    neurons = {0: [0, 5, 9, 63], 1: [1, 2, 3, 40]}
    full, small = tiny_bert(), tiny_bert()
    mask_neurons(full, neurons)
    prune_neurons(small, neurons)
    ids, att = inputs()
    assert torch.allclose(logits(small, ids, att), logits(full, ids, att), atol=1e-5)
    assert small.config.intermediate_size == 60 and not hasattr(small.config, "intermediate_sizes")


def test_removing_a_layer_equals_skipping_it():
    full, small = tiny_bert(layers=3), tiny_bert(layers=3)
    mask_layers(full, [1])
    drop_layers(small, [1])
    ids, att = inputs()
    assert torch.allclose(logits(small, ids, att), logits(full, ids, att), atol=1e-5)
    assert small.config.num_hidden_layers == 2 and len(small.bert.encoder.layer) == 2


def test_all_three_together_and_the_smaller_model_reloads(tmp_path):
    full, small = tiny_bert(layers=3), tiny_bert(layers=3)
    mask_heads(full, {0: [2], 2: [0, 1]})
    mask_neurons(full, {li: [0, 1, 2, 3] for li in range(3)})
    mask_layers(full, [1])
    prune_heads(small, {0: [2], 2: [0, 1]})
    prune_neurons(small, {li: [0, 1, 2, 3] for li in range(3)})
    drop_layers(small, [1])  # layer 2 (two heads pruned) becomes layer 1
    ids, att = inputs()
    expected = logits(full, ids, att)
    assert torch.allclose(logits(small, ids, att), expected, atol=1e-5)
    assert small.config.pruned_heads == {"0": [2], "1": [0, 1]}

    small.save_pretrained(tmp_path / "small")
    with pytest.raises(Exception, match="size mismatch|ignore_mismatched_sizes"):  # refuses, never loads wrongly
        BertForMaskedLM.from_pretrained(tmp_path / "small")
    again = load_pruned(tmp_path / "small").eval()
    assert isinstance(again, PrunedBertForMaskedLM)
    assert torch.equal(logits(again, ids, att), logits(small, ids, att))
    assert n_params(again) == n_params(small) < n_params(full)


def test_neuron_and_layer_pruning_load_with_plain_from_pretrained(tmp_path):
    model = tiny_bert(layers=3)
    prune_neurons(model, {li: list(range(0, 64, 2)) for li in range(3)})
    drop_layers(model, [0])
    model.save_pretrained(tmp_path / "small")
    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "small").eval()
    assert type(again) is BertForMaskedLM
    assert again.config.intermediate_size == 32 and again.config.num_hidden_layers == 2
    ids, att = inputs()
    assert torch.equal(logits(again, ids, att), logits(model, ids, att))


def test_uneven_neuron_counts_are_recorded_and_reload(tmp_path):
    model = tiny_bert()
    prune_neurons(model, {0: list(range(10))})
    assert model.config.intermediate_sizes == [54, 64]
    model.save_pretrained(tmp_path / "m")
    again = load_pruned(tmp_path / "m").eval()
    ids, att = inputs()
    assert torch.equal(logits(again, ids, att), logits(model, ids, att))


def test_pruning_heads_twice_records_original_indices():
    model = tiny_bert(heads=4)
    prune_heads(model, {0: [1]})  # left: original heads 0, 2, 3
    prune_heads(model, {0: [1]})  # position 1 now is original head 2
    assert model.config.pruned_heads == {"0": [1, 2]}


@pytest.mark.parametrize("call, fragment", [
    (lambda m: prune_heads(m, {0: [4]}), "layer 0 has 4 heads, cannot prune head 4"),
    (lambda m: prune_heads(m, {0: [0, 1, 2, 3]}), "pruning all 4 heads of layer 0"),
    (lambda m: prune_heads(m, {5: [0]}), "layer 5 does not exist"),
    (lambda m: prune_neurons(m, {1: [64]}), "cannot prune neuron 64"),
    (lambda m: drop_layers(m, [0, 1]), "dropping all 2 layers"),
    (lambda m: drop_layers(m, [2]), "cannot drop layer 2"),
])
def test_impossible_pruning_is_a_user_error(call, fragment):
    with pytest.raises(UserError, match=fragment):
        call(tiny_bert(heads=4))


# ---- importance ------------------------------------------------------------------------------
def mlm_loss_fn(model, batch):
    ids, att, labels = batch
    out = model(input_ids=ids, attention_mask=att).logits  # (B, L, V)
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten(), ignore_index=-100)


def batches(n=3):
    out = []
    for i in range(n):
        ids, att = inputs(batch=4, length=12, seed=10 + i)
        labels = torch.where(att.bool(), ids, torch.full_like(ids, -100))
        out.append((ids, att, labels))
    return out


def loss_after(model, data):
    with torch.no_grad():
        return sum(float(mlm_loss_fn(model, b)) for b in data) / len(data)


def test_taylor_importance_ranks_units_as_removing_them_does():
    """Every layer, head and neuron: the first-order score against the exact loss change of removing that
    unit alone (mean over the batches of |change|, as the score is a mean of |gradient|). Layers in the same
    order; heads and neurons with rank correlation >= 0.95 (measured: 1.0). Float64, so that rounding does
    not order near-equal changes."""
    data = batches(3)
    model = tiny_bert(layers=3).double()
    imp = taylor_importance(model, data, mlm_loss_fn)
    assert [len(h) for h in imp.heads] == [4, 4, 4] and [len(n) for n in imp.neurons] == [64, 64, 64]
    assert imp.layers.shape == (3,) and (imp.layers > 0).all()
    assert not model.training and all(p.grad is None for p in model.parameters())  # the model is untouched

    def losses(m):
        with torch.no_grad():
            return torch.tensor([float(mlm_loss_fn(m, b)) for b in data], dtype=torch.float64)

    base = losses(model)

    def change(remove) -> float:
        m = copy.deepcopy(model)
        remove(m)
        return float((losses(m) - base).abs().mean())

    exact_layers = [change(lambda m, i=i: drop_layers(m, [i])) for i in range(3)]
    assert torch.argsort(imp.layers).tolist() == torch.argsort(torch.tensor(exact_layers)).tolist(), (imp.layers, exact_layers)
    exact_heads = [change(lambda m, i=i, h=h: mask_heads(m, {i: [h]})) for i in range(3) for h in range(4)]
    assert spearman(torch.cat(imp.heads).tolist(), exact_heads) >= 0.95
    exact_neurons = []
    for i in range(3):  # masked in place and restored: 192 copies would take a while
        w = model.bert.encoder.layer[i].output.dense.weight
        for n in range(64):
            saved = w[:, n].clone()
            mask_neurons(model, {i: [n]})
            exact_neurons.append(float((losses(model) - base).abs().mean()))
            with torch.no_grad():
                w[:, n] = saved
    assert spearman(torch.cat(imp.neurons).tolist(), exact_neurons) >= 0.95


def test_pruning_by_importance_hurts_less_than_pruning_the_most_important():
    data = batches()
    model = tiny_bert(layers=2, intermediate=64)
    imp = taylor_importance(model, data, mlm_loss_fn)
    least = choose_neurons(imp, 0.25)
    most = {li: sorted(torch.argsort(s, descending=True)[:16].tolist()) for li, s in enumerate(imp.neurons)}
    a, b = tiny_bert(layers=2), tiny_bert(layers=2)
    prune_neurons(a, least)
    prune_neurons(b, most)
    base = loss_after(model, data)
    assert abs(loss_after(a, data) - base) < abs(loss_after(b, data) - base)


def test_choosing_units():
    imp = taylor_importance(tiny_bert(layers=3), batches(1), mlm_loss_fn)
    heads = choose_heads(imp, 0.5)
    assert sum(len(v) for v in heads.values()) == 6 and all(len(v) < 4 for v in heads.values())
    neurons = choose_neurons(imp, 0.25)
    assert all(len(v) == 16 for v in neurons.values()) and len(neurons) == 3  # the same count in every layer
    assert choose_layers(imp, 1) == [int(imp.layers.argmin())]
    with pytest.raises(UserError, match="every layer must keep one head"):
        choose_heads(imp, 0.95)  # 11 of 12 heads, but 3 layers need one each
    with pytest.raises(UserError, match=r"outside \[0, 1\)"):
        choose_heads(imp, 1.0)
    with pytest.raises(UserError, match="cannot remove 3 of 3 layers"):
        choose_layers(imp, 3)


def test_importance_needs_batches():
    with pytest.raises(UserError, match="no batches"):
        taylor_importance(tiny_bert(), [], mlm_loss_fn)


def shard_like_batch(seed=0, k=4):
    """A train_data.Batch as the shards give it: masked positions, gold ids, a teacher's top-k."""
    from mergedistill.train.batches import Batch

    ids, att = inputs(batch=4, length=12, seed=seed)
    g = torch.Generator().manual_seed(seed)
    selected = (torch.rand(ids.shape, generator=g) < 0.3) & att.bool()
    selected[:, 1] = True
    labels = ids[selected]
    n = int(selected.sum())
    topk_ids = torch.randint(5, 60, (n, k), generator=g)
    topk_ids[:, 0] = labels
    topk_logits = torch.sort(torch.randn(n, k, generator=g), descending=True).values
    lang = torch.zeros(n, dtype=torch.long)
    return Batch(ids, att, selected, labels, topk_ids, topk_logits, lang, torch.zeros(4, dtype=torch.long))


def test_importance_on_shard_batches_with_the_training_loss():
    from mergedistill.compress.importance import distill_loss_fn
    from mergedistill.models.mlm import masked_logits
    from mergedistill.train.losses import distill_loss

    model = tiny_bert(layers=2)
    imp = taylor_importance(model, [shard_like_batch(0), shard_like_batch(1)], distill_loss_fn(0.5, 1.0))
    assert (imp.layers > 0).all() and all((h > 0).all() for h in imp.heads)

    def piecewise(model, b):  # the last layer computed at masked positions only: its layer gate never runs
        out = masked_logits(model, b.input_ids, b.attention_mask, b.selected)
        return distill_loss(out, b.labels, b.topk_ids, b.topk_logits, 0.5, 1.0)["loss"]
    with pytest.raises(AssertionError, match="bypassed"):
        taylor_importance(model, [shard_like_batch(0)], piecewise)


def test_masked_logits_on_a_head_pruned_model():
    from mergedistill.models.mlm import masked_logits

    model = tiny_bert()
    prune_heads(model, {1: [0]})
    b = shard_like_batch()
    with torch.no_grad():
        fast = masked_logits(model, b.input_ids, b.attention_mask, b.selected)
    assert torch.allclose(fast, logits(model, b.input_ids, b.attention_mask)[b.selected], atol=1e-5)
