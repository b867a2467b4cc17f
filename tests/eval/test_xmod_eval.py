"""`evaluate` on an X-Mod student: every per-language figure goes through that language's module.

The student is test_evaluate's re-indexed `wp` teacher in the X-Mod layout: equal to the teacher with a
zero module (the equivalence of models/xmod.py), far from it with a noisy one. de's module is zero and
every other module (the default language's, en, included) is noise, so de's figures equal the teacher's
only if de is scored with de's module. Downstream and retrieval are checked call by call: each X-Mod
forward pass runs with the module of the language whose text it reads (fine-tuned with the source's
module, zero-shot tested with the target's)."""
from __future__ import annotations

import json

import pytest
import torch
from test_evaluate import ROUTING, reindexed, results, trained_teacher, value, write_config, write_corpora, write_export

from conftest import in_dir
from mergedistill.config import StudentConfig, load_config
from mergedistill.demo.source_task import build_source_task
from mergedistill.eval import stage as eval_stage
from mergedistill.models.xmod import init_module, init_xmod_from_teacher, parameter_counts, xmod_config
from mergedistill.vocab.stage import load_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

LANGS = list(ROUTING)  # en, de, ru, ja


def xmod_student(dense, vocab_size: int):
    """`dense` (a BERT masked LM over the student vocabulary) in the X-Mod layout, a module per language:
    de's zero, the others noise; the default language en."""
    from transformers import XmodForMaskedLM

    c = dense.config
    body = StudentConfig(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                         intermediate=c.intermediate_size, max_position=c.max_position_embeddings)
    model = XmodForMaskedLM(xmod_config(vocab_size=vocab_size, languages=LANGS, student=body, default_language="en"))
    init_xmod_from_teacher(model, dense, "wp")
    torch.manual_seed(0)
    with torch.no_grad():
        model.roberta.embeddings.word_embeddings.weight.copy_(dense.bert.embeddings.word_embeddings.weight)
        model.lm_head.bias.copy_(dense.cls.predictions.bias)
        for layer in model.roberta.encoder.layer:
            for name, adapter in layer.output.adapter_modules.items():
                init_module(adapter, 0.02 if name == "de" else 1.0, zero_up=name == "de")
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_teachers):
    """The X-Mod student exported, evaluate run once with spies on the calls that read per-language text."""
    work = tmp_path_factory.mktemp("xmod-evaluate")
    calls: dict[str, list] = {"fine_tune": [], "task_accuracy": [], "embed_texts": []}
    mp = pytest.MonkeyPatch()
    with in_dir(work):
        teachers = dict(tiny_teachers)
        trained_teacher(tiny_teachers["wp"], work / "wp-teacher")
        teachers["wp"] = work / "wp-teacher"
        corpora = write_corpora(work)
        cfg_path = write_config(work, teachers, corpora, baseline=False)
        from mergedistill.cli import main

        assert main(["vocab", "--config", str(cfg_path)]) == 0
        cfg = load_config(cfg_path)
        vocab, vrec = load_vocab(cfg)
        model = xmod_student(reindexed(teachers["wp"], vocab.idmaps["wp"], vocab.size), vocab.size)
        write_export(cfg.run_dir / "train" / "export", model, cfg, vrec, "# x\n")
        build_source_task(cfg, train_per_class=100, test_per_class=12, min_per_class=5)
        text_lang = {}
        for lang in LANGS:
            for line in open(corpora[lang]["test"], encoding="utf-8"):
                text_lang[json.loads(line)["text"]] = lang
            for split in ("train", "test"):
                for line in open(f"runs/t/tasks/source/{lang}.{split}.jsonl", encoding="utf-8"):
                    text_lang[json.loads(line)["text"]] = lang

        def module(m):
            return getattr(m.config, "default_language", None) if m.config.model_type == "xmod" else None

        real_ft, real_acc, real_embed = eval_stage.fine_tune, eval_stage.task_accuracy, eval_stage.embed_texts

        def fine_tune(mlm, tok, exs, *a, **k):
            ft = real_ft(mlm, tok, exs, *a, **k)
            if module(mlm):
                calls["fine_tune"].append((module(mlm), text_lang[exs[0].text], id(ft)))
            return ft

        def task_accuracy(ft, tok, test, *a, **k):
            if module(ft.encoder):
                calls["task_accuracy"].append((module(ft.encoder), text_lang[test[0].text], id(ft)))
            return real_acc(ft, tok, test, *a, **k)

        def embed_texts(m, tok, texts, *a, **k):
            if module(m):
                calls["embed_texts"].append((module(m), text_lang[texts[0]]))
            return real_embed(m, tok, texts, *a, **k)

        mp.setattr(eval_stage, "fine_tune", fine_tune)
        mp.setattr(eval_stage, "task_accuracy", task_accuracy)
        mp.setattr(eval_stage, "embed_texts", embed_texts)
        try:
            assert main(["evaluate", "--config", str(cfg_path)]) == 0
        finally:
            mp.undo()
        yield work, model, calls


def test_each_languages_intrinsic_figures_use_its_module(evaluated):
    work, _, _ = evaluated
    rows = results(work)
    # de's module is zero: the student is the routed teacher there, exactly
    assert value(rows, "intrinsic", "de", "student", "agreement") == 1.0
    assert value(rows, "intrinsic", "de", "student", "mlm_acc") == value(rows, "intrinsic", "de", "teacher:wp", "mlm_acc")
    assert value(rows, "intrinsic", "de", "student", "pll_per_word") == pytest.approx(
        value(rows, "intrinsic", "de", "teacher:wp", "pll_per_word"), abs=1e-4)
    # en (the default language) reads the same teacher's tokens through a noisy module: far from it
    assert value(rows, "intrinsic", "en", "student", "agreement") < 0.9
    assert value(rows, "intrinsic", "en", "student", "pll_per_word") < value(rows, "intrinsic", "en", "teacher:wp", "pll_per_word") - 0.5


def test_parameters_are_reported_total_and_active_per_language(evaluated):
    work, model, _ = evaluated
    rows = results(work)
    c = parameter_counts(model)
    for lang in LANGS:
        assert value(rows, "intrinsic", lang, "student", "params_total") == c["total"]
        assert value(rows, "intrinsic", lang, "student", "params_active") == c["active"][lang] == c["shared"] + c["modules"][lang]
    report = (work / "runs/t/eval/report.md").read_text()
    assert f"- parameters: student {c['total']:,} (active per language: de {c['active']['de']:,}, en {c['active']['en']:,}" in report


def test_downstream_and_retrieval_read_each_language_with_its_module(evaluated):
    _, _, calls = evaluated
    assert calls["fine_tune"] and calls["task_accuracy"] and calls["embed_texts"]
    for mod, lang, _ in calls["fine_tune"]:
        assert mod == lang  # fine-tuned with the module of the language it is trained on
    trained_on = {ft: lang for _, lang, ft in calls["fine_tune"]}
    for mod, lang, ft in calls["task_accuracy"]:
        assert mod == lang  # tested with the module of the test language, zero-shot too
    zero_shot = {(trained_on[ft], lang) for _, lang, ft in calls["task_accuracy"] if trained_on[ft] != lang}
    assert zero_shot == {("en", "de"), ("en", "ru"), ("en", "ja")}
    assert all(mod == lang for mod, lang in calls["embed_texts"]) and {lang for _, lang in calls["embed_texts"]} == set(LANGS)
