"""int8 weight quantization: close to fp32, saved and loaded through its own folder format."""
from __future__ import annotations

import json

import pytest
import torch
from _tiny import inputs, tiny_bert
from transformers import BertForMaskedLM

from mergedistill.compress.magnitude import prune_magnitude
from mergedistill.compress.measure import count_weights, weights_bytes
from mergedistill.compress.quantize import (
    Int8Embedding,
    Int8Linear,
    dequantize_model,
    load_quantized,
    quantize_int8,
    quantize_rows,
    save_quantized,
)
from mergedistill.compress.structured import drop_layers, prune_heads
from mergedistill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

# int8 per row keeps each weight within half a step (max|w_row| / 254) of its value. On the tiny model
# (logits up to ~0.5) the logits moved by 2.7e-3 to 3.7e-3 at most (measured, seeds 0-4); 1e-2 leaves
# room and still fails on a wrong scale: scales 5% off moved them by 4.0e-2.
LOGIT_ATOL = 1e-2


def logits(model, ids, att):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=att).logits


def test_rows_round_within_half_a_step():
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different sizes
    w[3] = 0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert (q[3] == 0).all() and s[3] == 1  # an all-zero (pruned) row stays exact zeros


@pytest.mark.parametrize("seed", [0, 1])
def test_quantized_logits_are_close_to_fp32(seed):
    model = tiny_bert(seed)
    ids, att = inputs()
    ref = logits(model, ids, att)
    quantize_int8(model)
    out = logits(model, ids, att)
    assert (out - ref).abs().max() < LOGIT_ATOL
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    assert not torch.equal(out, ref)  # something was quantized
    lin = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(lin) == 2 * 6 + 2  # encoder, head transform, decoder
    assert isinstance(model.bert.embeddings.word_embeddings, Int8Embedding)
    assert model.cls.predictions.decoder.qweight is model.bert.embeddings.word_embeddings.qweight  # one table
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def test_save_and_load_give_the_same_logits(tmp_path):
    model = quantize_int8(tiny_bert())
    ids, att = inputs()
    expected = logits(model, ids, att)
    folder = save_quantized(model, tmp_path / "int8")
    meta = json.loads((folder / "quantization.json").read_text())
    assert meta["aliases"]["cls.predictions.decoder.qweight"] == "bert.embeddings.word_embeddings.qweight"
    again = load_quantized(folder)
    assert torch.equal(logits(again, ids, att), expected)
    assert again.cls.predictions.decoder.qweight is again.bert.embeddings.word_embeddings.qweight
    assert count_weights(again) == count_weights(model)

    plain = load_quantized(folder, dequantize=True)  # a standard float model with the int8-rounded weights
    assert type(plain) is BertForMaskedLM and not any(isinstance(m, Int8Linear) for m in plain.modules())
    assert torch.allclose(logits(plain, ids, att), expected, atol=1e-5)
    assert plain.cls.predictions.decoder.weight is plain.bert.embeddings.word_embeddings.weight


def test_the_folder_is_smaller_and_refuses_plain_from_pretrained(tmp_path):
    model = tiny_bert(hidden=64, intermediate=128)
    model.save_pretrained(tmp_path / "fp32")
    save_quantized(quantize_int8(model), tmp_path / "int8")
    ratio = weights_bytes(tmp_path / "int8") / weights_bytes(tmp_path / "fp32")
    assert ratio < 0.4  # ~1/4 for the matrices; biases, norms and positions stay float
    with pytest.raises(OSError):  # no model.safetensors: from_pretrained cannot silently re-initialise
        BertForMaskedLM.from_pretrained(tmp_path / "int8")
    with pytest.raises(UserError, match="not a quantized variant"):
        load_quantized(tmp_path / "fp32")


def test_pruned_then_quantized_keeps_zeros_and_loads(tmp_path):
    model = tiny_bert(layers=3)
    prune_magnitude(model, 0.5)
    prune_heads(model, {0: [1]})
    drop_layers(model, [2])
    ids, att = inputs()
    expected = logits(quantize_int8(model), ids, att)
    q = model.bert.encoder.layer[1].intermediate.dense.qweight
    assert (q == 0).float().mean() > 0.3  # pruned zeros are exact zeros in int8
    again = load_quantized(save_quantized(model, tmp_path / "pq"))
    assert torch.equal(logits(again, ids, att), expected)


def test_tables_false_keeps_embeddings_and_decoder_float():
    model = quantize_int8(tiny_bert(), tables=False)
    assert isinstance(model.bert.embeddings.word_embeddings, torch.nn.Embedding)
    assert isinstance(model.cls.predictions.decoder, torch.nn.Linear)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_quantizing_twice_or_saving_a_float_model_is_refused(tmp_path):
    model = quantize_int8(tiny_bert())
    with pytest.raises(UserError, match="already quantized"):
        quantize_int8(model)
    with pytest.raises(UserError, match="no int8 modules"):
        save_quantized(tiny_bert(), tmp_path / "x")
    dequantize_model(model)
    assert not any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def test_the_readme_int8_figures_are_the_recorded_ones():
    """Every int8 ratio the README states (x0.26 on disk, throughput against fp32) is in the measurement
    table quantize.py records, and the README names that table's CPU (AVX2 only), not the bf16 one."""
    import re
    from pathlib import Path

    import mergedistill.compress.quantize as q

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    item = readme[readme.index("- `int8`: int8 weights"):readme.index("- `small`: a smaller student")]
    stated = re.findall(r"x(\d\.\d+)", item)
    assert len(stated) >= 3, item
    recorded = q.__doc__[q.__doc__.index("Measured on"):q.__doc__.index("- `torch.ao.quantization`")]
    assert all(f"x{r}" in recorded for r in stated), (stated, recorded)
    assert "AVX2" in recorded and "AVX2 only" in item and "no AVX-512" in item
