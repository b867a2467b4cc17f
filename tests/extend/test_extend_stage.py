"""`mergedistill extend` end to end on a tiny run (en, de, ru distilled; fr added): old languages exactly
unchanged, the new tokenizer served by the new rows, the plugged student loads and fills masks in fr,
teacher (KD) and no-teacher (MLM) paths, X-Mod students, reruns, and bad input exiting 2."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

from conftest import SENTENCES, in_dir
from mergedistill.cli import main
from mergedistill.data.masking import IGNORE_INDEX
from mergedistill.eval.metrics import masked_eval_set
from mergedistill.fsutil import sha256_file
from mergedistill.models.mlm import masked_logits

pytestmark = pytest.mark.usefixtures("one_thread")
ROUTING = {"en": "wp", "de": "wp", "ru": "uni"}


def _lines(lang: str) -> list[str]:
    sents = SENTENCES[lang]
    return [f"{s} {' '.join(sents[(i + 1) % len(sents)].split()[: i % 4])}".strip() for i, s in enumerate(sents * 10)]


def config(root: Path, teachers: dict, **extend) -> dict:
    return {
        "run": "t",
        "teachers": {n: {"path": str(teachers[n])} for n in ("wp", "uni", "bbpe")},
        "languages": {lang: {"train": f"{lang}.txt", "valid": f"{lang}.valid.txt", "test": f"{lang}.valid.txt", "teacher": t}
                      for lang, t in ROUTING.items()},
        "vocab": {"prune": True},  # bbpe is no language's teacher: the vocabulary keeps little of it, so fr needs new rows
        "data": {"seq_len": 32, "shard_lines": 20, "batch_size": 8},
        "student": {"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64, "init": "teacher:wp"},
        "train": {"max_steps": 12, "val_every": 6, "batch_size": 8, "lr": 0.003, "warmup_steps": 2, "mini_head_layer": 1,
                  "accelerator": "cpu"},
        "eval": {"max_lines": 30, "pll_lines": 3, "batch_size": 8},
        "extend": {"languages": {"fr": {"train": "fr.txt", "valid": "fr.valid.txt", "test": "fr.valid.txt", "teacher": "bbpe"}},
                   "method": "minipost", "compare": ["full", "minijoint"], "steps": 12, "eval_every": 6, "batch_size": 8,
                   "mini_align_steps": 6, "old_lines": 20, "curve_lines": 12, "lr": 0.01, **extend},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teachers):
    """vocab, data and train (with a mid head at layer 1) of the tiny run, once."""
    root = tmp_path_factory.mktemp("extend-run")
    for lang in [*ROUTING, "fr"]:
        lines = _lines(lang)
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / f"{lang}.valid.txt").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    (root / "c.yaml").write_text(yaml.safe_dump(config(root, tiny_teachers)))
    with in_dir(root):
        for stage in ("vocab", "data", "train"):
            assert main([stage, "--config", "c.yaml"]) == 0, stage
    return root


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
    """A fresh working folder holding the trained run (its extend/ outputs are this test's own)."""
    for name in os.listdir(trained):
        src = trained / name
        if name == "runs":
            shutil.copytree(src, tmp_path / name, symlinks=True)
        else:
            os.symlink(src, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(run: Path, tiny_teachers, name: str = "c2.yaml", **extend) -> str:
    cfg = config(run, tiny_teachers, **extend)
    (run / name).write_text(yaml.safe_dump(cfg))
    return name


def files_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@torch.no_grad()
def predictions(model, tok, texts: list[str], own: torch.Tensor | None = None):
    """(hidden states at masked positions, logits there, top-1 among `own` ids) on a fixed masked set."""
    eset = masked_eval_set(tok, texts, 32, 0.15, 0)
    sel = eset["labels"] != IGNORE_INDEX
    hidden = model.base_model(input_ids=eset["input_ids"].long(), attention_mask=eset["attention_mask"].long()).last_hidden_state[sel]
    logits = masked_logits(model, eset["input_ids"].long(), eset["attention_mask"].long(), sel)
    top = logits if own is None else logits.masked_fill(~own[: logits.shape[1]], float("-inf"))
    return hidden, logits, top.argmax(-1)


def test_extend_adds_the_language_and_leaves_the_old_ones_exactly_as_they_were(run, tiny_teachers):
    original = run / "runs/t/train/export"
    before = files_hash(original)
    cfg = write(run, tiny_teachers)
    assert main(["extend", "--config", cfg, "--language", "fr"]) == 0
    assert files_hash(original) == before  # the original export is only read
    out = run / "runs/t/extend/fr"
    export = out / "export"
    langs = json.loads((export / "languages.json").read_text())
    assert langs["fr"] == "tokenizers/new-fr" and {k: v for k, v in langs.items() if k != "fr"} == \
        json.loads((original / "languages.json").read_text())
    meta = json.loads((export / "mergedistill.json").read_text())["extended"]
    assert meta["method"] == "minipost" and meta["vocab_size"] > meta["old_vocab_size"]
    for f in ("report.md", "results.csv", "plots/curve.png"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "minipost (exported)" in report and "| full |" in report and "| minijoint |" in report
    # the card names where fr came from and carries the exported method's measured figures
    card = (export / "README.md").read_text(encoding="utf-8")
    rows = [r.split(",") for r in (out / "results.csv").read_text().splitlines()]
    acc = float(next(r[3] for r in rows if r[:3] == ["minipost", "test", "acc_own"]))
    agree = float(next(r[3] for r in rows if r[:3] == ["minipost", "test", "agreement"]))
    assert "## Extended to `fr`" in card and "distilled from its teacher `bbpe`" in card, card[-1500:]
    assert f"masked accuracy {acc:.4f} among its own tokens" in card and f"agreement with the teacher {agree:.4f}" in card
    assert "The old languages (" in card

    # the plugged student loads as a standard masked LM, its new rows are the learned ones, and fills masks in fr
    old_model = AutoModelForMaskedLM.from_pretrained(original).eval()
    new_model = AutoModelForMaskedLM.from_pretrained(export).eval()
    v0, v1 = meta["old_vocab_size"], meta["vocab_size"]
    assert new_model.get_input_embeddings().weight.shape[0] == v1
    from safetensors.torch import load_file

    learned = load_file(str(out / "work/methods/minipost/params.safetensors"))
    assert torch.equal(new_model.get_input_embeddings().weight[v0:], learned["rows"])
    assert torch.equal(new_model.cls.predictions.bias[v0:], learned["bias"])
    fr_tok = AutoTokenizer.from_pretrained(export / "tokenizers/new-fr")
    assert len(fr_tok) == v1
    fill = pipeline("fill-mask", model=new_model, tokenizer=fr_tok)
    assert len(fill(f"Les élèves apprennent le {fr_tok.mask_token} à l'école.")) == 5

    # exported.load_student serves the new language (its ids: what the new tokenizer writes) and the old ones
    from mergedistill.models.exported import load_student

    assert len(load_student(export, "fr").fill_mask(f"Les élèves apprennent le {fr_tok.mask_token} à l'école.")[0]) == 5
    fr_ids = np.load(export / "token_ids/fr.npy")
    written = {i for s in SENTENCES["fr"] for i in fr_tok(s, add_special_tokens=False)["input_ids"]}
    assert written - {fr_tok.unk_token_id} <= set(fr_ids.tolist()) and fr_ids.max() < v1 and (fr_ids >= v0).any()
    for lang in json.loads((original / "languages.json").read_text()):
        assert np.array_equal(np.load(export / f"token_ids/{lang}.npy"), np.load(original / f"token_ids/{lang}.npy"))

    # the new tokenizer emits ids the new rows serve (and no id outside the grown vocabulary)
    ids = [i for s in SENTENCES["fr"] for i in fr_tok(s)["input_ids"]]
    assert max(ids) < v1 and any(i >= v0 for i in ids)
    rows_touched = {i for i in ids if i >= v0}
    assert not torch.equal(new_model.get_input_embeddings().weight[sorted(rows_touched)],
                           old_model.get_input_embeddings().weight.new_zeros(len(rows_touched), 32))

    # every old language: hidden states bit for bit, logits at the old ids and top-1 among its own tokens unchanged
    from mergedistill.extend.vocab import predicted_ids
    from mergedistill.vocab.joint import JointVocab

    for lang, sub in json.loads((original / "languages.json").read_text()).items():
        tok_old = AutoTokenizer.from_pretrained(original / sub)
        tok_new = AutoTokenizer.from_pretrained(export / sub)
        texts = _lines(lang)[:12]
        assert [tok_new(t)["input_ids"] for t in texts] == [tok_old(t)["input_ids"] for t in texts]
        teacher = Path(sub).name
        own = predicted_ids(JointVocab.load(run / "vocab/t", [teacher]).idmaps[teacher], v1)
        h0, l0, t0 = predictions(old_model, tok_old, texts, own)
        h1, l1, t1 = predictions(new_model, tok_new, texts, own)
        assert torch.equal(h0, h1), lang
        torch.testing.assert_close(l1[:, :v0], l0, atol=1e-6, rtol=0)
        assert torch.equal(t0, t1), lang
    # and the report says so, for every method (all are embeddings-only here)
    csv = (out / "results.csv").read_text().splitlines()
    diffs = [float(r.split(",")[3]) for r in csv if ",max_abs_logit_diff," in r]
    changed = [float(r.split(",")[3]) for r in csv if ",top1_changed_own," in r]
    assert len(diffs) == 9 and max(diffs) < 1e-5 and max(changed) == 0.0


def test_rerun_skips_and_switching_the_method_reuses_the_trained_ones(run, tiny_teachers, caplog):
    cfg = write(run, tiny_teachers, steps=6, eval_every=3, compare=["full"])
    assert main(["extend", "--config", cfg, "--language", "fr"]) == 0
    params = run / "runs/t/extend/fr/work/methods/full/params.safetensors"
    stamp = params.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergedistill"):
        assert main(["extend", "--config", cfg, "--language", "fr"]) == 0
    assert "complete for these inputs; skipping" in caplog.text
    cfg = write(run, tiny_teachers, steps=6, eval_every=3, compare=["full"], method="full")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergedistill"):
        assert main(["extend", "--config", cfg, "--language", "fr"]) == 0
    assert "full is trained for these inputs" in caplog.text and params.stat().st_mtime_ns == stamp
    assert json.loads((run / "runs/t/extend/fr/export/mergedistill.json").read_text())["extended"]["method"] == "full"


def test_without_a_teacher_a_tokenizer_is_trained_and_the_objective_is_mlm(run, tiny_teachers):
    cfg = write(run, tiny_teachers, compare=[], method="full", tokenizer="unigram", tokenizer_vocab_size=120, steps=6, eval_every=3,
                guard_positions=40, guard_batch=8)
    assert main(["extend", "--config", cfg, "--language", "fr", "--extend.languages.fr.teacher=null"]) == 0
    out = run / "runs/t/extend/fr"
    report = (out / "report.md").read_text()
    assert "objective: MLM" in report and "tokens from new-fr" in report and "guard: 40 old positions" in report
    card = (out / "export/README.md").read_text(encoding="utf-8")
    assert "from its corpus alone (MLM: no teacher)" in card and "masked accuracy" in card and "agreement" not in card.split("## Extended to")[1]
    export = out / "export"
    tok = AutoTokenizer.from_pretrained(export / "tokenizers/new-fr")
    meta = json.loads((export / "mergedistill.json").read_text())["extended"]
    ids = [i for s in SENTENCES["fr"] for i in tok(s)["input_ids"]]
    assert any(i >= meta["old_vocab_size"] for i in ids) and max(ids) < meta["vocab_size"]
    assert AutoModelForMaskedLM.from_pretrained(export).config.vocab_size == meta["vocab_size"]


def _xmod_run(run: Path) -> Path:
    """runs/x: an X-Mod student built from the run's vocabulary (as the train stage exports one), with the
    run's tokenizers and shards. Returns its export folder."""
    from mergedistill.config import StudentConfig
    from mergedistill.models.xmod import build_xmod_student, save_xmod_student
    from mergedistill.vocab.joint import JointVocab

    vocab = JointVocab.load(run / "vocab/t", ["wp", "uni", "bbpe"])
    body = StudentConfig(arch="xmod", hidden=32, layers=2, heads=2, intermediate=64, max_position=64, embeddings_from_teachers=False)
    student, _ = build_xmod_student(vocab=vocab, languages=list(ROUTING), student=body, zero_init_modules=False)
    src = run / "runs/t/train/export"
    dst = run / "runs/x/train/export"
    save_xmod_student(student, dst, default_language="en")
    shutil.copytree(src / "tokenizers", dst / "tokenizers")
    for f in ("languages.json", "mergedistill.json"):
        shutil.copy(src / f, dst / f)
    os.symlink(run / "runs/t/data", run / "runs/x/data")
    return dst


def test_xmod_student_gets_a_module_and_the_other_languages_stay_bit_identical(run, tiny_teachers):
    """An X-Mod student: the `xmod` method trains the new rows and fr's module; every old language's outputs
    stay bit-identical."""
    from mergedistill.models.xmod import use_language

    dst = _xmod_run(run)
    cfg = write(run, tiny_teachers, method="xmod", compare=["full"], steps=6, eval_every=3)
    assert main(["extend", "--config", cfg, "--language", "fr", "--run=x", "--vocab_run=t", "--train.mini_head_layer=null"]) == 0
    export = run / "runs/x/extend/fr/export"
    new = AutoModelForMaskedLM.from_pretrained(export).eval()
    old = AutoModelForMaskedLM.from_pretrained(dst).eval()
    assert new.config.languages == [*ROUTING, "fr"] and new.config.default_language == "en"
    layer = new.roberta.encoder.layer[0] if hasattr(new, "roberta") else new.base_model.encoder.layer[0]
    assert layer.output.adapter_modules["fr"].dense2.weight.abs().sum() > 0  # fr's module trained (it started at zero)
    for lang in ROUTING:
        tok = AutoTokenizer.from_pretrained(dst / json.loads((dst / "languages.json").read_text())[lang])
        ids = tok(_lines(lang)[:6], padding=True, truncation=True, max_length=32, return_tensors="pt")  # the run's seq_len
        with torch.no_grad():
            a = use_language(old, lang)(**ids).logits
            b = use_language(new, lang)(**ids).logits
        assert torch.equal(a, b[..., : a.shape[-1]]), lang
    report = (run / "runs/x/extend/fr/report.md").read_text()
    assert "xmod (exported)" in report


@pytest.mark.parametrize("args, extend, message", [
    (["--language", "en"], {}, "'en' is already a language of this run"),
    (["--language", "fr", "--extend.languages.en.train=en.txt"], {}, "extend.languages.en: 'en' is already a language of this run"),
    (["--language", "xx"], {}, "no corpus for 'xx'"),
    (["--language", "fr", "--extend.languages.fr.train=missing.txt"], {}, "extend.languages.fr.train: no file 'missing.txt'"),
    (["--language", "fr"], {"mini_layers": 2}, "extend.mini_layers: 2 must be from 1 to student.layers - 1"),
    (["--language", "fr", "--student.layers=3"], {"mini_layers": 2}, "k = 2 is not smaller than the student's depth (2 layers"),
    (["--language", "fr"], {"method": "xmod"}, "extend.method xmod: needs an X-Mod student"),
    (["--language", "fr", "--extend.languages.fr.teacher=nobody"], {}, "extend.languages.fr.teacher: 'nobody' is not defined"),
    (["--language", "fr", "--data.top_k=10000000"], {}, "data.top_k: 10,000,000 predictions per labelled position, but teacher bbpe has"),
    ([], {}, "the following arguments are required: --language"),
])
def test_bad_input_exits_2_with_a_clear_message(run, tiny_teachers, capsys, args, extend, message):
    cfg = write(run, tiny_teachers, **extend)
    try:
        rc = main(["extend", "--config", cfg, *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (run / "runs/t/extend/fr/export").exists()


def test_minijoint_needs_a_student_trained_with_the_mid_head(run, tiny_teachers, capsys):
    shutil.rmtree(run / "runs/t/train/export/mini_head")
    cfg = write(run, tiny_teachers, method="minijoint", compare=[])
    assert main(["extend", "--config", cfg, "--language", "fr"]) == 2
    assert "has no mini_head/" in capsys.readouterr().err


def test_a_language_the_student_already_has_exits_2(run, tiny_teachers, capsys):
    """Declared as new in the config but present in the student's languages.json (e.g. added by hand)."""
    export = run / "runs/t/train/export"
    langs = json.loads((export / "languages.json").read_text())
    (export / "languages.json").write_text(json.dumps({**langs, "fr": "tokenizers/wp"}))
    cfg = write(run, tiny_teachers)
    assert main(["extend", "--config", cfg, "--language", "fr"]) == 2
    assert "the student already has 'fr'" in capsys.readouterr().err


def test_nothing_new_to_learn_is_said_before_any_work(run, tiny_teachers, capsys):
    """A new language whose tokenizer (here wp, a routed teacher, on en's text) has every token it needs in the
    student already: 0 new rows. The row-only methods would train nothing (this used to label shards, align the
    mini-model and die in backward with "element 0 of tensors does not require grad"): exit 2 before any shard
    or training step, naming the methods and what to change; with share_tokens off it gets rows and trains."""
    cfg = write(run, tiny_teachers, compare=["full"], steps=4, eval_every=2, mini_align_steps=2,
                languages={"es": {"train": "en.txt", "valid": "en.valid.txt", "test": "en.valid.txt", "teacher": "wp"}})
    assert main(["extend", "--config", cfg, "--language", "es"]) == 2
    err = capsys.readouterr().err
    assert "extend es: nothing new to learn: every one of the" in err and "tokens wp's tokenizer keeps for es already has a row" in err
    assert "extend.method minipost, extend.compare full would train nothing" in err
    assert "extend.share_tokens: false" in err and "extend.method: xmod" in err and "Traceback" not in err
    out = run / "runs/t/extend/es"
    assert not (out / "export").exists() and not (out / "work" / "data").exists() and not (out / "work" / "methods").exists()
    assert not (run / "runs/t/extend/mini").exists()  # no mini-model aligned either

    assert main(["extend", "--config", cfg, "--language", "es", "--extend.share_tokens=false", "--extend.compare=[]",
                 "--extend.method=full"]) == 0
    meta = json.loads((out / "export" / "mergedistill.json").read_text())["extended"]
    assert meta["vocab_size"] > meta["old_vocab_size"]


def test_with_nothing_new_an_xmod_student_trains_the_module_alone(run, tiny_teachers):
    """0 new rows on an X-Mod student: the xmod method still has the language's module to train, and does,
    leaving every old language bit-identical and the vocabulary as it was."""
    from mergedistill.models.xmod import use_language

    dst = _xmod_run(run)
    cfg = write(run, tiny_teachers, method="xmod", compare=[], steps=4, eval_every=2,
                languages={"es": {"train": "en.txt", "valid": "en.valid.txt", "test": "en.valid.txt", "teacher": "wp"}})
    assert main(["extend", "--config", cfg, "--language", "es", "--run=x", "--vocab_run=t", "--train.mini_head_layer=null"]) == 0
    export = run / "runs/x/extend/es/export"
    meta = json.loads((export / "mergedistill.json").read_text())["extended"]
    assert meta["vocab_size"] == meta["old_vocab_size"]
    new = AutoModelForMaskedLM.from_pretrained(export).eval()
    old = AutoModelForMaskedLM.from_pretrained(dst).eval()
    assert new.config.languages == [*ROUTING, "es"]
    assert new.base_model.encoder.layer[0].output.adapter_modules["es"].dense2.weight.abs().sum() > 0  # trained
    for lang in ROUTING:
        tok = AutoTokenizer.from_pretrained(dst / json.loads((dst / "languages.json").read_text())[lang])
        ids = tok(_lines(lang)[:6], padding=True, truncation=True, max_length=32, return_tensors="pt")  # the run's seq_len
        with torch.no_grad():
            assert torch.equal(use_language(old, lang)(**ids).logits, use_language(new, lang)(**ids).logits), lang


def test_compare_mlm_trains_the_method_without_its_teacher_on_the_same_batches(run, tiny_teachers):
    """extend.compare_mlm: the exported method again with alpha 0 (MLM only) on the same batches, reported beside
    it as `<method>-mlm` and never exported; the two learn different rows from the same start."""
    from safetensors.torch import load_file

    cfg = write(run, tiny_teachers, "c_mlm.yaml", steps=6, eval_every=3, compare=[], method="full", compare_mlm=True)
    assert main(["extend", "--config", cfg, "--language", "fr"]) == 0
    out = run / "runs/t/extend/fr"
    kd, mlm = (load_file(str(out / f"work/methods/{m}/params.safetensors")) for m in ("full", "full-mlm"))
    assert kd["rows"].shape == mlm["rows"].shape and not torch.equal(kd["rows"], mlm["rows"])
    results = {m: json.loads((out / f"work/methods/{m}/result.json").read_text())["result"] for m in ("full", "full-mlm")}
    assert results["full"]["alpha"] == 0.5 and results["full-mlm"]["alpha"] == 0.0 and results["full-mlm"]["mlm_only"]
    assert results["full"]["steps"] == results["full-mlm"]["steps"] == 6
    report = (out / "report.md").read_text()
    assert "| full-mlm |" in report and "| full (exported) |" in report
    assert {r.split(",")[0] for r in (out / "results.csv").read_text().splitlines()[1:]} == {"full", "full-mlm"}
    assert json.loads((out / "export/mergedistill.json").read_text())["extended"]["method"] == "full"


def test_compare_mlm_without_a_teacher_is_refused(run, tiny_teachers, capsys):
    cfg = config(run, tiny_teachers, compare=[], method="full", compare_mlm=True)
    del cfg["extend"]["languages"]["fr"]["teacher"]
    (run / "c_noteacher.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["extend", "--config", "c_noteacher.yaml", "--language", "fr"]) == 2
    assert "extend.compare_mlm: extend.languages.fr has no teacher" in capsys.readouterr().err
