"""Global unstructured magnitude pruning, and saving pruned models."""
from __future__ import annotations

import pytest
import torch
from _tiny import inputs, tiny_bert
from torch.nn.utils import prune as torch_prune
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from mergedistill.compress.magnitude import (
    global_magnitude_masks,
    make_permanent,
    prunable_weights,
    prune_magnitude,
    sparsity_of,
)
from mergedistill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids, att):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=att).logits


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_global_sparsity_is_the_one_asked_for(sparsity):
    model = tiny_bert()
    weights = prunable_weights(model)
    n = sum(w.numel() for w in weights.values())
    prune_magnitude(model, sparsity)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(sparsity * n)  # exactly, not about
    assert sparsity_of(weights) == pytest.approx(sparsity, abs=0.5 / n)


def test_pruning_is_global_and_by_magnitude():
    model = tiny_bert()
    weights = prunable_weights(model)
    with torch.no_grad():
        weights["bert.encoder.layer.1.output.dense.weight"].mul_(0.01)  # one layer with small weights
    before = {k: w.detach().clone() for k, w in weights.items()}
    masks = prune_magnitude(model, 0.2)
    kept = torch.cat([before[k][m] .abs() for k, m in masks.items()])
    dropped = torch.cat([before[k][~m].abs() for k, m in masks.items()])
    assert dropped.max() <= kept.min()  # every pruned weight is at most as large as every kept one
    small = masks["bert.encoder.layer.1.output.dense.weight"]
    assert (~small).float().mean() > 0.9  # the global ranking takes most of the small layer...
    other = masks["bert.encoder.layer.0.output.dense.weight"]
    assert (~other).float().mean() < 0.2  # ...and spares the others


def test_ties_are_broken_to_the_exact_count():
    w = {"a": torch.tensor([1.0, 2.0, 2.0, 2.0]), "b": torch.tensor([[2.0, 3.0], [0.5, 2.0]])}
    masks = global_magnitude_masks(w, 0.5)  # 8 weights -> 4 go: 0.5, 1.0 and the first two of the five 2.0s
    assert masks["a"].tolist() == [False, False, False, True]
    assert masks["b"].tolist() == [[True, True], [False, True]]
    assert sum(int((~m).sum()) for m in masks.values()) == 4


def test_embeddings_and_head_are_dense_unless_asked():
    model = tiny_bert()
    names = set(prunable_weights(model))
    assert len(names) == 2 * 6 and all(".encoder.layer." in n for n in names)
    emb = model.bert.embeddings.word_embeddings.weight.detach().clone()
    head = model.cls.predictions.transform.dense.weight.detach().clone()
    prune_magnitude(model, 0.7)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, emb)
    assert torch.equal(model.cls.predictions.transform.dense.weight, head)

    model = tiny_bert()
    names = set(prunable_weights(model, include_embeddings=True, include_head=True))
    assert "bert.embeddings.word_embeddings.weight" in names and "cls.predictions.transform.dense.weight" in names
    assert "cls.predictions.decoder.weight" not in names  # tied to the word embeddings: ranked once
    prune_magnitude(model, 0.7, include_embeddings=True, include_head=True)
    emb = model.bert.embeddings.word_embeddings.weight
    assert int((emb == 0).sum()) > emb.shape[1] and model.cls.predictions.decoder.weight is emb  # beyond the padding row; tie holds


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "half"])
def test_sparsity_outside_0_1_is_a_user_error(bad):
    with pytest.raises(UserError, match=r"outside \[0, 1\)"):
        prune_magnitude(tiny_bert(), bad)


def test_pruned_model_saves_and_reloads_to_identical_logits(tmp_path):
    model = tiny_bert()
    prune_magnitude(model, 0.6)
    make_permanent(model)  # nothing to fold: the zeros are already in `weight`
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "pruned").eval()
    ids, att = inputs()
    assert torch.equal(logits(model, ids, att), logits(again, ids, att))
    assert sparsity_of(prunable_weights(again)) == pytest.approx(0.6, abs=1e-3)


def test_torch_prune_masks_must_be_made_permanent_before_saving(tmp_path):
    # The hazard the issue names: torch.nn.utils.prune keeps weight_orig + weight_mask, which
    # transformers does not know; from_pretrained then initialises `weight` at random and only says so
    # in a load report.
    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        torch_prune.l1_unstructured(layer.intermediate.dense, "weight", amount=0.5)
    ids, att = inputs()
    expected = logits(model, ids, att)
    model.save_pretrained(tmp_path / "with_masks")
    broken = BertForMaskedLM.from_pretrained(tmp_path / "with_masks").eval()
    assert not torch.allclose(logits(broken, ids, att), expected, atol=1e-4)  # silently different weights

    make_permanent(model)
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    model.save_pretrained(tmp_path / "permanent")
    good = BertForMaskedLM.from_pretrained(tmp_path / "permanent").eval()
    assert torch.equal(logits(good, ids, att), expected)
    w = good.bert.encoder.layer[0].intermediate.dense.weight
    assert int((w == 0).sum()) == w.numel() // 2
