import csv
import json
import logging

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from _pretrain_fixtures import patterned_texts, tiny_model, tiny_tokenizer
from mergedistill.pretrain import (
    MLMCollator,
    PretrainConfig,
    SpecialLayout,
    group_sample_weights,
    linear_warmup_decay,
    pack_documents,
    pack_texts,
    pretrain,
    sampling_probs,
)


def test_special_layout_follows_the_post_processor():
    bert = tiny_tokenizer("wordpiece")
    cls, sep = bert.cls_token_id, bert.sep_token_id
    assert SpecialLayout.of(bert) == SpecialLayout([cls], [sep], [sep])
    for kind in ("byte-bpe", "unigram"):
        tok = tiny_tokenizer(kind)
        s, e = tok.bos_token_id, tok.eos_token_id
        assert SpecialLayout.of(tok) == SpecialLayout([s], [e, e], [e])


def test_pack_documents_exact_layout():
    layout = SpecialLayout(prefix=[1], mid=[2, 2], suffix=[2])
    docs = [[10, 11], [12], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31]]
    words = [[0, 1], [0], [0, 0, 1, 2, 3, 3, 4, 5, 6], [0, 0]]
    p = pack_documents(docs, seq_len=8, layout=layout, pad_id=0, words=words)
    # room = 6 content tokens; doc 3 (9 tokens) is cut into 6 + 3; "30 31" does not fit beside the tail
    assert p.input_ids.tolist() == [
        [1, 10, 11, 2, 2, 12, 2, 0],
        [1, 20, 21, 22, 23, 24, 25, 2],
        [1, 26, 27, 28, 2, 0, 0, 0],
        [1, 30, 31, 2, 0, 0, 0, 0],
    ]
    assert p.attention_mask.sum(1).tolist() == [7, 8, 5, 4]
    # word ids: unique per sequence, shared by the pieces of a word, -1 on specials and padding
    assert p.word_ids.tolist()[0] == [-1, 0, 1, -1, -1, 2, -1, -1]
    assert p.word_ids.tolist()[1] == [-1, 0, 0, 1, 2, 3, 3, -1]
    assert p.word_ids.tolist()[2][:5] == [-1, 0, 1, 2, -1]


def test_pack_texts_with_a_real_tokenizer_round_trips():
    tok = tiny_tokenizer("wordpiece")
    texts = ["the cat sat on the mat", "the dog sat on the log"]
    p = pack_texts(tok, texts, seq_len=32)
    assert len(p) == 1
    row = p.input_ids[0][p.attention_mask[0]].tolist()
    assert row == tok(texts[0], texts[1])["input_ids"]  # the same as the tokenizer's own pair layout


def test_collator_masks_dynamically_but_reproducibly():
    tok = tiny_tokenizer("wordpiece")
    p = pack_texts(tok, patterned_texts(64), seq_len=32)
    a = MLMCollator(p, tok, 0.15, seed=0)
    b = MLMCollator(p, tok, 0.15, seed=0)
    first, second = a(list(range(8))), a(list(range(8)))
    assert not torch.equal(first["labels"], second["labels"])  # a new mask each time
    assert torch.equal(first["labels"], b(list(range(8)))["labels"])  # the same sequence of masks per seed
    specials = torch.tensor(tok.all_special_ids)
    assert not torch.isin(p.input_ids[:8].long(), specials)[first["labels"] != -100].any()


def test_sampling_probs_and_weights():
    q = sampling_probs([900, 100], alpha=0.3)
    expected = [0.9 ** 0.3 / (0.9 ** 0.3 + 0.1 ** 0.3), 0.1 ** 0.3 / (0.9 ** 0.3 + 0.1 ** 0.3)]
    assert q == pytest.approx(expected)
    assert sampling_probs([900, 100], alpha=1.0) == pytest.approx([0.9, 0.1])
    w = group_sample_weights([3, 1], [0.5, 0.5])
    assert w.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.5])


def test_linear_warmup_decay():
    f = linear_warmup_decay(warmup_steps=4, max_steps=14)
    assert f(0) == pytest.approx(0.2) and f(3) == pytest.approx(0.8)
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == 0.0


def test_pretrain_lowers_loss_and_saves_a_loadable_folder(tmp_path, caplog):
    tok = tiny_tokenizer("byte-bpe")
    model = tiny_model("byte-bpe", max_position=32)
    train = pack_texts(tok, patterned_texts(400, seed=1), seq_len=32)
    valid = pack_texts(tok, patterned_texts(60, seed=2), seq_len=32)
    cfg = PretrainConfig(seq_len=32, batch_size=16, max_steps=60, lr=3e-3, warmup_steps=5, eval_every=30,
                         eval_sequences=64, log_every=20, num_threads=1, accelerator="cpu")
    out = tmp_path / "mlm"
    probe = MLMCollator(valid, tok, 0.15, seed=9)(list(range(len(valid))))
    with torch.no_grad():
        initial = float(model(**probe).loss)
    with caplog.at_level(logging.INFO, logger="mergedistill.pretrain"):
        result = pretrain(model, tok, train, valid, cfg, out, name="tiny", meta={"note": "test"})
    assert result.steps == 60
    assert any("step 20/60" in r.message and "tok/s" in r.message and "ETA" in r.message for r in caplog.records)

    meta = json.loads((out / "pretrain.json").read_text())
    history = meta["history"]
    assert [h["step"] for h in history] == [30, 60] and meta["note"] == "test"
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5  # it learned
    assert history[-1]["val_loss"] < initial - 1.0
    assert not list(tmp_path.glob(".mlm*"))  # the temp folder was renamed into place

    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    text = "the cat sleeps near the mat"
    enc, enc2 = tok(text, return_tensors="pt"), loaded_tok(text, return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    assert loaded_tok.mask_token_id == tok.mask_token_id
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc2).logits, model(**enc).logits, rtol=0, atol=0)


def test_pretrain_reports_config_problems(tmp_path):
    tok = tiny_tokenizer("wordpiece")
    train = pack_texts(tok, patterned_texts(10), seq_len=16)
    with pytest.raises(ValueError) as e:
        pretrain(tiny_model("wordpiece", 16), tok, train, None,
                 PretrainConfig(seq_len=32, mask_prob=1.5, warmup_steps=-1), tmp_path / "x")
    msg = str(e.value)
    assert "mask_prob" in msg and "warmup_steps" in msg and "seq_len 32" in msg
    assert not (tmp_path / "x").exists()
