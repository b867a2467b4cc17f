import pytest
import torch
from transformers import (
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaForMaskedLM,
    XLMRobertaForMaskedLM,
)

from conftest import PATTERN_SENTENCES, tiny_model, tiny_tokenizer
from mergedistill.data.packing import pack_texts
from mergedistill.models.mlm import build_mlm, masked_logits, usable_positions

CLASSES = {"wordpiece": BertForMaskedLM, "unigram": XLMRobertaForMaskedLM, "sp-bpe": XLMRobertaForMaskedLM,
           "byte-bpe": RobertaForMaskedLM}


@pytest.mark.parametrize("kind", list(CLASSES))
def test_build_mlm_family_ids_and_forward(kind):
    tok = tiny_tokenizer(kind)
    model = tiny_model(kind, max_position=32)
    assert type(model) is CLASSES[kind]
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert cfg.pad_token_id == tok.pad_token_id
    if kind == "wordpiece":
        assert cfg.max_position_embeddings == 32
    else:  # RoBERTa numbering starts at padding_idx + 1
        assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
        assert cfg.max_position_embeddings == 32 + tok.pad_token_id + 1
    assert usable_positions(model) == 32
    packed = pack_texts(tok, [" ".join(PATTERN_SENTENCES * 3)], seq_len=32)  # one long text cut into full rows
    assert packed.attention_mask[0].all()
    out = model(input_ids=packed.input_ids.long(), attention_mask=packed.attention_mask.long())
    assert out.logits.shape == (len(packed), 32, len(tok))
    assert torch.isfinite(out.logits).all()


def test_roberta_position_table_is_exactly_large_enough():
    tiny_tokenizer("byte-bpe")
    model = tiny_model("byte-bpe", max_position=16)
    ids = torch.full((1, 16), 5)
    model(input_ids=ids)  # 16 tokens fit
    with pytest.raises(Exception):
        model(input_ids=torch.full((1, 17), 5))


@pytest.mark.parametrize("kind", list(CLASSES))
def test_masked_logits_match_full_logits(kind):
    tok = tiny_tokenizer(kind)
    model = tiny_model(kind)
    packed = pack_texts(tok, PATTERN_SENTENCES, seq_len=32)
    ids, att = packed.input_ids.long(), packed.attention_mask.long()
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[:, 3] = True
    selected[0, 5] = True
    full = model(input_ids=ids, attention_mask=att).logits  # (B, L, V)
    fast = masked_logits(model, ids, att, selected)  # (N, V)
    assert fast.shape == (int(selected.sum()), len(tok))
    torch.testing.assert_close(fast, full[selected], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_last_layer_at_selected_positions_only_matches_the_full_forward(kind, monkeypatch):
    """Uneven counts per row (one row with none), padding, and gradients: the split last layer is exact."""
    from mergedistill.models import mlm as mlm_models

    calls = []
    real = mlm_models.layer_at_positions
    monkeypatch.setattr(mlm_models, "layer_at_positions", lambda *a: calls.append(1) or real(*a))
    tok = tiny_tokenizer(kind)
    model = tiny_model(kind)
    packed = pack_texts(tok, PATTERN_SENTENCES * 3, seq_len=24)
    ids, att = packed.input_ids.long(), packed.attention_mask.long()
    gen = torch.Generator().manual_seed(0)
    selected = (torch.rand(ids.shape, generator=gen) < 0.3) & att.bool()
    selected[0] = False
    assert len(ids) >= 3 and selected.sum(1).unique().numel() > 1
    full = model(input_ids=ids, attention_mask=att).logits[selected]
    fast = masked_logits(model, ids, att, selected)
    assert calls, "the split path ran"
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    target = torch.randn_like(full)
    g_full = torch.autograd.grad((full * target).sum(), model.base_model.embeddings.word_embeddings.weight)[0]
    fast = masked_logits(model, ids, att, selected)
    g_fast = torch.autograd.grad((fast * target).sum(), model.base_model.embeddings.word_embeddings.weight)[0]
    torch.testing.assert_close(g_fast, g_full, rtol=1e-4, atol=1e-5)
    assert len(model.base_model.encoder.layer) == 2  # the model is left whole
    # ... also while it runs: the first layers are called, never swapped in for the model's layer list
    seen: list[int] = []
    hook = model.base_model.encoder.layer[0].register_forward_pre_hook(lambda m, a: seen.append(len(model.base_model.encoder.layer)))
    masked_logits(model, ids, att, selected)
    hook.remove()
    assert seen == [2]


def test_masked_logits_falls_back_for_other_models():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                   max_position_embeddings=16)).eval()
    ids = torch.randint(0, 50, (2, 10))
    selected = torch.rand(2, 10) < 0.4
    torch.testing.assert_close(masked_logits(model, ids, None, selected), model(input_ids=ids).logits[selected])


def test_build_mlm_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of heads"):
        build_mlm("wordpiece", tiny_tokenizer("wordpiece"), hidden=30, layers=1, heads=4, intermediate=8, max_position=8)
    with pytest.raises(ValueError, match="family"):
        build_mlm("gpt", tiny_tokenizer("wordpiece"), hidden=32, layers=1, heads=2, intermediate=8, max_position=8)


def test_top1_is_argmax_in_every_dtype():
    from mergedistill.models.mlm import top1

    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 5003, generator=g)
    for x in (z, z.bfloat16(), z.view(37, 1, 5003)):
        assert torch.equal(top1(x), x.argmax(-1))
