"""The X-Mod student: per-sequence module routing, initialisation from a teacher (exact where the
layer-norm settings allow), appending a language, export, errors, parameter counts."""
from __future__ import annotations

import contextlib
import copy
import io
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, XmodForMaskedLM

from conftest import SENTENCES, TINY_MODEL, in_dir, make_config
from mergedistill.cli import main
from mergedistill.config import StudentConfig, load_config
from mergedistill.errors import UserError
from mergedistill.models.init import copy_embedding_rows
from mergedistill.models.mlm import masked_logits
from mergedistill.models.xmod import (
    UnknownLanguage,
    add_language_module,
    build_xmod_student,
    grouped_routing,
    lang_id_table,
    lang_ids_for,
    language_modules,
    model_card_usage,
    module_map,
    parameter_counts,
    save_xmod_student,
    use_language,
    xmod_config,
)
from mergedistill.train.losses import distill_loss
from mergedistill.vocab.stage import load_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTING = {"de": "wp", "ru": "uni", "fr": "bbpe"}  # BERT, XLM-R and RoBERTa teachers
LANGS = list(ROUTING)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teachers, tiny_corpora):
    """A joint vocabulary of three teachers (the vocab stage), the teachers, the student tokenizers."""
    root = tmp_path_factory.mktemp("xmod")
    teachers = {n: tiny_teachers[n] for n in set(ROUTING.values())}
    with in_dir(root):
        cfg_path = make_config(root / "c.yaml", teachers, tiny_corpora, ROUTING)
        assert main(["vocab", "--config", str(cfg_path)]) == 0
        cfg = load_config(cfg_path)
        vocab, _ = load_vocab(cfg)
    models = {n: AutoModelForMaskedLM.from_pretrained(str(p)).eval() for n, p in teachers.items()}
    return SimpleNamespace(vocab=vocab, teachers=models, teacher_dirs=teachers, tokenizers=root / "vocab" / cfg.run / "tokenizers")


def student(run, **kw) -> XmodForMaskedLM:
    kw = {"embeddings_from_teachers": False, **TINY_MODEL, **kw}
    extra = {k: kw.pop(k) for k in ("zero_init_modules",) if k in kw}
    model, _ = build_xmod_student(vocab=run.vocab, languages=LANGS, student=StudentConfig(arch="xmod", **kw),
                                  load_teacher=run.teachers.__getitem__, **extra)
    return model.eval()


def random_batch(vocab_size: int, B: int = 4, L: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    ids[1, 8:], att[1, 8:] = 0, 0  # right padding in one sequence
    return ids, att


def logits(model, ids, att, langs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=att, lang_ids=lang_ids_for(model, langs)).logits


# ---- routing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["transformers", "grouped"])
def test_a_mixed_batch_trains_only_the_modules_of_its_languages(run, routing):
    model = student(run, zero_init_modules=False)  # non-zero up-projections: every module weight gets a gradient
    if routing == "grouped":
        grouped_routing(model)
    ids, att = random_batch(run.vocab.size)
    langs = ["fr", "de", "fr", "de"]  # no ru
    out = model(input_ids=ids, attention_mask=att, lang_ids=lang_ids_for(model, langs)).logits
    torch.nn.functional.cross_entropy(out.flatten(0, 1), ids.flatten()).backward()
    for layer in model.base_model.encoder.layer:
        for name, mod in layer.output.adapter_modules.items():
            grads = [p.grad for p in mod.parameters()]
            if name == "ru":
                # a zero gradient, not none: every parameter takes part, as DDP expects
                assert all(g is not None and not g.any() for g in grads), "ru's module got a gradient from a de/fr batch"
            else:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), f"{name}'s module got no gradient"
    # each sequence comes out as it would alone, with its own language's module
    for b, lang in enumerate(langs):
        alone = logits(model, ids[b: b + 1], att[b: b + 1], [lang])[0]
        torch.testing.assert_close(out[b].detach(), alone, atol=1e-5, rtol=0)
        other = logits(model, ids[b: b + 1], att[b: b + 1], ["ru"])[0]
        assert (other - alone).abs().max() > 1e-4  # the module matters


def test_grouped_routing_gives_transformers_outputs_and_gradients(run):
    a = student(run, zero_init_modules=False).train()
    b = grouped_routing(copy.deepcopy(a))
    ids, att = random_batch(run.vocab.size, B=6)
    for langs in (["fr", "de", "ru", "de", "fr", "ru"], ["de", "de", "ru", "ru", "fr", "fr"], ["ru"] * 6):
        outs = []
        for m in (a, b):
            m.zero_grad()
            torch.manual_seed(0)  # the same dropout masks
            out = m(input_ids=ids, attention_mask=att, lang_ids=lang_ids_for(m, langs)).logits
            out.pow(2).mean().backward()
            outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
        assert torch.equal(outs[0][0], outs[1][0])
        for ga, gb in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_masked_logits_equal_the_full_head_at_the_selected_positions(run, pre_norm):
    model = student(run, zero_init_modules=False, pre_norm=pre_norm)
    ids, att = random_batch(run.vocab.size, B=5)
    sel = torch.zeros_like(att, dtype=torch.bool)
    sel[0, [1, 4]] = sel[1, [2, 7]] = sel[3, 5] = True  # sequence 2 and 4: nothing selected
    langs = ["ru", "de", "fr", "de", "ru"]
    full = logits(model, ids, att, langs)[sel]
    with torch.no_grad():
        fast = masked_logits(model, ids, att, sel, lang_ids_for(model, langs))
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    use_language(model, "fr")  # lang_ids=None: the default language's module
    with torch.no_grad():
        default = masked_logits(model, ids, att, sel)
    torch.testing.assert_close(default, logits(model, ids, att, ["fr"] * 5)[sel], atol=1e-5, rtol=1e-5)


def test_masked_logits_hands_xmod_models_their_lang_ids(run):
    """models.mlm.masked_logits (what training, evaluate and select call) takes an X-Mod model's lang_ids
    to its masked-position head; lang_ids for a dense model are refused rather than ignored."""
    from transformers import BertConfig, BertForMaskedLM

    model = student(run, zero_init_modules=False)
    ids, att = random_batch(run.vocab.size, B=3)
    sel = att.bool() & (torch.arange(ids.shape[1]) % 3 == 1)
    langs = ["ru", "fr", "de"]
    with torch.no_grad():
        got = masked_logits(model, ids, att, sel, lang_ids=lang_ids_for(model, langs))
        torch.testing.assert_close(got, logits(model, ids, att, langs)[sel], atol=1e-5, rtol=1e-5)
        use_language(model, "fr")
        torch.testing.assert_close(masked_logits(model, ids, att, sel), logits(model, ids, att, ["fr"] * 3)[sel], atol=1e-5, rtol=1e-5)
    dense = BertForMaskedLM(BertConfig(vocab_size=run.vocab.size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64))
    with pytest.raises(ValueError, match="lang_ids select X-Mod language modules; this is a bert model"):
        masked_logits(dense, ids, att, sel, lang_ids=torch.zeros(3, dtype=torch.long))


def test_with_language_prepares_an_xmod_model_for_dense_code_in_bfloat16(run):
    """Evaluation code calls models without lang_ids, under bfloat16 autocast (eval.dtype): with_language
    sets the module and the routing that autocast allows (transformers' 5.x own routing fails there:
    it writes bfloat16 module outputs into a float32 buffer)."""
    from mergedistill.models.xmod import with_language

    model = student(run, zero_init_modules=False)
    ids, att = random_batch(run.vocab.size, B=3)
    assert with_language(model, "ru") is model and model.config.default_language == "ru"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf = model(input_ids=ids, attention_mask=att).logits.float()
    torch.testing.assert_close(bf, logits(model, ids, att, ["ru"] * 3), atol=0.1, rtol=0.05)
    dense = torch.nn.Linear(2, 2)
    assert with_language(dense, "xx") is dense  # anything else: untouched


def test_kd_and_mlm_training_lowers_the_loss(run):
    model = student(run).train()
    ids, att = random_batch(run.vocab.size, B=6, L=16)
    sel = torch.zeros_like(att, dtype=torch.bool)
    sel[:, 3:6] = True
    labels = ids[sel]
    g = torch.Generator().manual_seed(1)
    topk_ids = torch.randint(5, run.vocab.size, (len(labels), 4), generator=g)
    topk_ids[:, 0] = labels
    topk_logits = torch.tensor([3.0, 1.0, 0.5, 0.0]).expand(len(labels), 4)
    lang_ids = lang_ids_for(model, ["de", "ru", "fr"] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = masked_logits(model, ids, att, sel, lang_ids)
        loss = distill_loss(out, labels, topk_ids, topk_logits, 0.5, 1.0)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---- starting equal to a teacher --------------------------------------------------------------------
EXACT = [  # the student reproduces a post-norm teacher bit for bit at initialisation (modules' up-projection zero)
    dict(ln_before_adapter=False),
    dict(ln_before_adapter=False, adapter_reuse_layer_norm=False),
    dict(ln_before_adapter=False, adapter_layer_norm=True),
    dict(ln_before_adapter=True, adapter_reuse_layer_norm=False),
]
ROUNDING = [  # LN(norm(h)) = LN(h) up to rounding only (README: 1.2e-7 to 1.5e-7)
    dict(ln_before_adapter=True, adapter_layer_norm=True),
]
NOT_EQUAL = [
    dict(ln_before_adapter=True, adapter_reuse_layer_norm=True),  # X-Mod's default: the LayerNorm twice
    dict(ln_before_adapter=False, pre_norm=True),  # a pre-LN network
]
TEACHERS = ["wp", "uni", "bbpe"]  # the README's table: tiny BERT, XLM-R and RoBERTa teachers


def trained_looking(teacher, seed: int = 0):
    """A copy of a teacher whose LayerNorms are no longer identity-like (as after training): with
    weight 1, bias 0 everywhere, LN(LN(h)) = LN(h) and the non-equivalent settings would pass."""
    t = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return t


def teacher_and_student_logits(run, name: str, settings: dict):
    teacher = trained_looking(run.teachers[name])
    model, info = build_xmod_student(vocab=run.vocab, languages=LANGS, load_teacher={name: teacher}.__getitem__,
                                     student=StudentConfig(arch="xmod", init=f"teacher:{name}", embeddings_from_teachers=False,
                                                           **TINY_MODEL, **settings))
    copy_embedding_rows(model, run.vocab, {name: teacher})  # this teacher's rows only: no averaging
    model.tie_weights()
    model.eval()
    assert info["layers_from"] == {name: [0, 1]}
    tok = AutoTokenizer.from_pretrained(str(run.teacher_dirs[name]))
    lang = next(lang for lang, t in ROUTING.items() if t == name)
    enc = tok(SENTENCES[lang], padding=True, return_tensors="pt")  # right padding, specials included
    s_ids = torch.from_numpy(run.vocab.student_ids(name, enc["input_ids"].numpy()))
    idmap = torch.from_numpy(run.vocab.idmaps[name]).long()
    assert (idmap >= 0).all()
    with torch.no_grad():
        t_out = teacher(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, L, Vt)
        s_out = model(input_ids=s_ids, attention_mask=enc["attention_mask"],
                      lang_ids=lang_ids_for(model, [lang] * len(s_ids))).logits[..., idmap]  # teacher's columns
    keep = enc["attention_mask"].bool()
    assert not keep.all()  # padding is part of the check
    return t_out[keep], s_out[keep]


def _ids(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


@pytest.mark.parametrize("name", TEACHERS)
@pytest.mark.parametrize("settings", EXACT, ids=_ids)
def test_a_student_from_a_teacher_starts_with_its_logits(run, name, settings):
    """The README's "exactly ... 0" rows: bit for bit, not within a tolerance."""
    t_out, s_out = teacher_and_student_logits(run, name, settings)
    assert torch.equal(s_out, t_out), (s_out - t_out).abs().max().item()


@pytest.mark.parametrize("name", TEACHERS)
@pytest.mark.parametrize("settings", ROUNDING, ids=_ids)
def test_a_fresh_adapter_norm_starts_equal_up_to_rounding(run, name, settings):
    t_out, s_out = teacher_and_student_logits(run, name, settings)
    torch.testing.assert_close(s_out, t_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", TEACHERS)
@pytest.mark.parametrize("settings", NOT_EQUAL, ids=_ids)
def test_other_layer_norm_settings_do_not_start_equal(run, name, settings):
    t_out, s_out = teacher_and_student_logits(run, name, settings)
    assert (s_out - t_out).abs().max() > 1e-2


def test_init_from_a_teacher_of_another_size_is_refused(run):
    with pytest.raises(UserError, match="hidden_size=32, the student 64; set student.hidden"):
        student(run, init="teacher:wp", hidden=64, intermediate=128)


# ---- appending a language -----------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["transformers", "grouped"])
def test_adding_a_language_leaves_the_others_bit_identical(run, routing, tmp_path):
    model = student(run, zero_init_modules=False)
    if routing == "grouped":
        grouped_routing(model)
    ids, att = random_batch(run.vocab.size, B=3)
    mixed = ["fr", "de", "ru"]
    before = {lang: logits(model, ids, att, [lang] * 3) for lang in LANGS}
    before_mixed = logits(model, ids, att, mixed)
    old_ids = lang_id_table(model, LANGS)
    add_language_module(model, "es")
    add_language_module(model, "it", init_from="fr")
    assert model.config.languages == ["de", "ru", "fr", "es", "it"]
    assert torch.equal(lang_id_table(model, LANGS), old_ids)
    for lang in LANGS:
        assert torch.equal(logits(model, ids, att, [lang] * 3), before[lang]), lang
    assert torch.equal(logits(model, ids, att, mixed), before_mixed)
    assert torch.equal(logits(model, ids, att, ["it"] * 3), before["fr"])  # a copy of fr's module
    es = logits(model, ids, att, ["es"] * 3)
    assert all((es - before[lang]).abs().max() > 1e-4 for lang in LANGS)
    for layer in model.base_model.encoder.layer:
        assert not layer.output.adapter_modules["es"].dense2.weight.any()  # starts as the shared body
    with pytest.raises(ValueError, match="'de' already has a module"):
        add_language_module(model, "de")
    # and the grown model exports as any other
    save_xmod_student(model, tmp_path / "x", default_language="es")
    again = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "x")).eval()
    for lang in [*LANGS, "es", "it"]:
        assert torch.equal(logits(again, ids, att, [lang] * 3), logits(model, ids, att, [lang] * 3)), lang


# ---- export -------------------------------------------------------------------------------------------
def test_export_round_trips_with_identical_logits_per_language(run, tmp_path):
    model = student(run, modules={"de": "west", "fr": "west"}, zero_init_modules=False)
    assert model.config.languages == ["west", "ru"]
    ids, att = random_batch(run.vocab.size, B=3)
    folder = save_xmod_student(model, tmp_path / "export", default_language="fr")
    again = AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    assert isinstance(again, XmodForMaskedLM)
    assert again.config.default_language == "west"
    assert language_modules(again) == {"de": "west", "ru": "ru", "fr": "west"}
    for lang in LANGS:
        assert torch.equal(logits(again, ids, att, [lang] * 3), logits(model, ids, att, [lang] * 3)), lang
    with torch.no_grad():  # without lang_ids: the default language's module
        default = again(input_ids=ids, attention_mask=att).logits
    assert torch.equal(default, logits(model, ids, att, ["fr"] * 3))
    use_language(again, "ru")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=att).logits, logits(model, ids, att, ["ru"] * 3))


def test_the_model_card_example_runs(run, tmp_path):
    model = student(run)
    folder = save_xmod_student(model, tmp_path / "export", default_language="de")
    shutil.copytree(run.tokenizers, folder / "tokenizers")
    card = model_card_usage(model, "ru", f"tokenizers/{ROUTING['ru']}")
    assert "| ru | ru | 1 |" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("PATH_TO_THIS_FOLDER", str(folder))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        namespace: dict = {}
        exec(code, namespace)
    assert "'score'" in out.getvalue() and "'token_str'" in out.getvalue()
    assert namespace["model"].config.default_language == "ru"
    assert namespace["logits"].shape[0] == 2


# ---- errors -------------------------------------------------------------------------------------------
def test_an_unknown_language_is_named_with_the_known_ones(run):
    model = student(run)
    with pytest.raises(UnknownLanguage, match=r"'xx' has no module .*known languages: de, fr, ru") as e:
        lang_ids_for(model, ["de", "xx", "fr"])
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    with pytest.raises(UnknownLanguage, match="'xx', 'yy' have no module"):
        lang_id_table(model, ["xx", "de", "yy"])
    with pytest.raises(UnknownLanguage, match="known languages: de, fr, ru"):
        use_language(model, "xx")
    ids, att = random_batch(run.vocab.size, B=2)
    sel = att.bool()
    with pytest.raises(UnknownLanguage, match=r"lang_ids \[3\] out of range: .* 3 modules, 0=de, 1=ru, 2=fr"):
        masked_logits(model, ids, att, sel, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        masked_logits(model, ids, att, sel, torch.tensor([0]))


def test_module_groupings_are_checked():
    assert module_map(["de", "fr", "es"], {"fr": "romance", "es": "romance"}) == {"de": "de", "fr": "romance", "es": "romance"}
    with pytest.raises(UserError, match="xx is not among the languages"):
        module_map(["de", "fr"], {"xx": "g"})
    assert module_map(["es", "gl"], {"gl": "es"}) == {"es": "es", "gl": "es"}  # gl shares es's module
    with pytest.raises(UserError, match="adapter_reduction_factor"):
        xmod_config(vocab_size=10, languages=["de"], student=StudentConfig(hidden=32, heads=2, adapter_reduction_factor=0))


# ---- parameters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_layer_norm", [False, True])
def test_parameter_counts_total_and_active_per_language(run, adapter_layer_norm):
    model = student(run, modules={"de": "west", "fr": "west"}, adapter_reduction_factor=4, adapter_layer_norm=adapter_layer_norm)
    V, H, I, n_layers, P = run.vocab.size, 32, 64, 2, 64 + 1  # X-Mod's position table: max_position + pad + 1
    r = H // 4
    embeddings = V * H + P * H + 1 * H + 2 * H  # words, positions, token type, LayerNorm
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H + (2 * H if adapter_layer_norm else 0)
    head = (H * H + H) + 2 * H + V  # dense, LayerNorm, output bias (the decoder is the word embeddings)
    module = (H * r + r) + (r * H + H)
    shared = embeddings + n_layers * layer + head
    c = parameter_counts(model)
    assert c["shared"] == shared
    assert c["modules"] == {"west": n_layers * module, "ru": n_layers * module}
    assert c["total"] == shared + 2 * n_layers * module == sum(p.numel() for p in model.parameters())
    assert c["active"] == {"de": shared + n_layers * module, "ru": shared + n_layers * module, "fr": shared + n_layers * module}
