"""The train stage with `student.arch: xmod`: config checks, per-sequence modules in real mixed batches,
learning, export (per-language logits after reload, the model card's example), resume and DDP, as for
the dense student (tests/train/test_train.py, whose tiny shards these tests reuse)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_train as tt  # its tiny shards, fixtures and helpers
import torch
from transformers import AutoModelForMaskedLM, XmodForMaskedLM

from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.errors import ConfigError
from mergedistill.models.xmod import lang_ids_for, language_modules, parameter_counts
from mergedistill.train.batches import SampledBatches

corpora, prepared, run_dir = tt.corpora, tt.prepared, tt.run_dir  # fixtures
ROUTING, metrics, series, write_config = tt.ROUTING, tt.metrics, tt.series, tt.write_config
LANGS = list(ROUTING)  # en, de, ru, fr: the config's order = the modules' order
XMOD = ["--student.arch=xmod"]


def xmod_config(run_dir, tiny_teachers, corpora, *overrides, **train):
    return load_config(write_config(run_dir, tiny_teachers, corpora, **train), [*XMOD, *overrides])


# ---- config --------------------------------------------------------------------------------------------
def test_xmod_settings_are_checked_together(run_dir, tiny_teachers, corpora):
    path = write_config(run_dir, tiny_teachers, corpora)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["--student.adapter_reduction_factor=4"])  # an X-Mod setting on a dense student
    assert "student.adapter_reduction_factor: X-Mod settings (adapter_reduction_factor) need `student.arch: xmod`" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(path, [*XMOD, "--student.modules={xx: g, de: a.b}", "--student.adapter_reduction_factor=0",
                           "--student.arch=xmodd"])
    msg = str(e.value)
    assert "student.arch" in msg and "xmodd" in msg  # the literal is checked by the config machinery
    with pytest.raises(ConfigError) as e:
        load_config(path, [*XMOD, "--student.modules={xx: g, de: a.b}", "--student.adapter_reduction_factor=33"])
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "student.modules: xx is not under languages (" in msg
    assert "de: 'a.b'" in msg and "letters, digits, _ or -" in msg
    assert "student.adapter_reduction_factor: 33 must be from 1 to student.hidden (32)" in msg
    cfg = load_config(path, [*XMOD, "--student.modules={en: west, de: west}"])
    assert cfg.student.modules == {"en": "west", "de": "west"}


def test_a_dense_students_settings_are_what_they_were_before_xmod(run_dir, tiny_teachers, corpora):
    """The train stage's record of a dense student leaves the X-Mod fields out, so that students trained
    before they existed still count as complete (no retraining after an upgrade)."""
    from mergedistill.train.stage import student_inputs

    cfg = load_config(write_config(run_dir, tiny_teachers, corpora))
    d = student_inputs(cfg)
    assert not {"arch", "modules", "adapter_reduction_factor", "ln_before_adapter", "pre_norm"} & set(d)
    x = student_inputs(xmod_config(run_dir, tiny_teachers, corpora))
    assert x["arch"] == "xmod" and x["adapter_reduction_factor"] == 2 and x["modules"] == {}


# ---- the step: each sequence through its language's module -----------------------------------------------
def test_a_mixed_batch_reaches_only_the_modules_of_its_languages(run_dir, tiny_teachers, corpora):
    from mergedistill.data.stage import load_manifest
    from mergedistill.train.batches import LanguageShards, collate
    from mergedistill.train.language_head import FILL
    from mergedistill.train.stage import make_module
    from mergedistill.vocab.stage import load_vocab

    cfg = xmod_config(run_dir, tiny_teachers, corpora, "--student.modules={en: west, de: west}", "--student.init=teacher:wp")
    vocab, vrec = load_vocab(cfg)
    man = load_manifest(cfg, vrec["vocab"])
    module, info = make_module(cfg, vocab, LANGS)
    assert info["arch"] == "xmod" and info["layers_from"] == {"wp": [0, 1]}
    student = module.student
    assert isinstance(student, XmodForMaskedLM) and student.config.languages == ["west", "ru", "fr"]
    assert module.lang_table.tolist() == [0, 0, 1, 2]  # en, de -> west; ru; fr

    def rows(lang, n):
        shards = man["languages"][lang]["splits"]["train"]["shards"]
        src = LanguageShards([run_dir / "runs/t/data" / p for p in shards], vrec["vocab"], man["k"])
        return [src[i] for i in range(n)]

    # de and ru sequences interleaved (batch language indices 1 and 2), no en or fr
    batch = collate([r for pair in zip(rows("de", 2), rows("ru", 2)) for r in pair], [1, 2, 1, 2], man["k"])
    module.log = lambda *a, **k: None
    module._step(batch, "train").backward()
    for layer in student.base_model.encoder.layer:
        for name, mod in layer.output.adapter_modules.items():
            grads = {n: p.grad for n, p in mod.named_parameters()}
            assert all(g is not None for g in grads.values())  # grouped routing: zero gradients, not none (DDP)
            if name == "fr":
                assert all(not g.any() for g in grads.values()), "fr's module got a gradient from a de/ru batch"
            else:  # the up-projection starts at zero, so only its own gradient is non-zero at the first step
                assert grads["dense2.weight"].abs().sum() > 0, f"{name}'s module got no gradient"
    # the step's logits: each sequence with its own module, as the model computes it alone
    with torch.no_grad():
        for layer in student.base_model.encoder.layer:  # modules that change the output
            for mod in layer.output.adapter_modules.values():
                mod.dense2.weight.normal_(0, 0.5)
        student.eval()
        logits, _ = module.losses(batch)
        ref = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      lang_ids=lang_ids_for(student, ["de", "ru", "de", "ru"])).logits[batch.selected]
        wrong = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        lang_ids=lang_ids_for(student, ["ru", "de", "ru", "de"])).logits[batch.selected]
    # the language softmax (the default): each row holds its language's ids' logits, then FILL
    idx = module.columns.table[batch.lang]  # (N, S) student ids, -1 pads
    ref, wrong = (x.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, FILL) for x in (ref, wrong))
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert (logits - wrong).abs().max() > 1e-2


# ---- training, export ------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_the_export_round_trips(run_dir, tiny_teachers, corpora):
    from mergedistill.train.stage import make_module
    from mergedistill.vocab.stage import load_vocab

    path = write_config(run_dir, tiny_teachers, corpora, max_steps=60)
    args = ["train", "--config", str(path), *XMOD, "--student.init=teacher:wp", "--student.modules={en: west, de: west}"]
    assert main(args) == 0
    rows = metrics(run_dir)
    loss = [v for _, v in series(rows, "train/loss")]
    assert np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.3
    val = series(rows, "val/loss")
    assert len(val) >= 2 and val[-1][1] < val[0][1]
    assert series(rows, "val/fr/acc") and series(rows, "train/step_s")
    export = run_dir / "runs/t/train/export"
    model = AutoModelForMaskedLM.from_pretrained(str(export)).eval()
    assert isinstance(model, XmodForMaskedLM)
    assert model.config.default_language == "west"  # the first language's (en) module
    assert language_modules(model) == {"en": "west", "de": "west", "ru": "ru", "fr": "fr"}
    assert json.loads((export / "languages.json").read_text()) == {lang: f"tokenizers/{t}" for lang, t in ROUTING.items()}

    # the export holds the trained weights: per language, the logits of the last checkpoint's student
    cfg = load_config(path, args[3:])
    vocab, _ = load_vocab(cfg)
    module, _ = make_module(cfg, vocab, list(cfg.languages))  # the train stage's order (the YAML's)
    state = torch.load(run_dir / "runs/t/train/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    trained = module.student.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab.size, (4, 16), generator=g)
    att = torch.ones_like(ids)
    att[1, 10:] = 0
    with torch.no_grad():
        for lang in LANGS:
            lid = lang_ids_for(model, [lang] * 4)
            assert torch.equal(model(input_ids=ids, attention_mask=att, lang_ids=lid).logits,
                               trained(input_ids=ids, attention_mask=att, lang_ids=lid).logits), lang
        # modules differ after training: the language matters
        assert (model(input_ids=ids, lang_ids=lang_ids_for(model, ["ru"] * 4)).logits
                - model(input_ids=ids, lang_ids=lang_ids_for(model, ["fr"] * 4)).logits).abs().max() > 1e-4

    # the model card: X-Mod, its parameters, and a language-choosing fill-mask example that runs as written
    card = (export / "README.md").read_text()
    c = parameter_counts(model)
    assert "An X-Mod masked LM" in card and "## Choosing a language's module" in card
    assert card.index("## Choosing a language's module") < card.index("## Teachers and routing")
    assert f"{c['total']:,} in all" in card and f"| ru | `ru` | {c['modules']['ru']:,} | {c['active']['ru']:,} |" in card
    code = re.search(r"## Choosing a language's module.*?```python\n(.*?)```", card, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("PATH_TO_THIS_FOLDER", str(export)), {})
    assert "'token_str'" in out.getvalue()
    assert main(args) == 0  # a rerun with the same settings skips


def test_resume_continues_with_the_same_batches_and_weights(run_dir, tiny_teachers, corpora, monkeypatch):
    seen: list[tuple[int, int]] = []
    real = SampledBatches.batch
    crash_at = {"b": None}

    def spy(self, b):
        if b == crash_at["b"]:
            raise RuntimeError("simulated crash")
        out = real(self, b)
        seen.append((b, hash(out.input_ids.numpy().tobytes())))
        return out

    monkeypatch.setattr(SampledBatches, "batch", spy)
    path = str(write_config(run_dir, tiny_teachers, corpora, max_steps=20))
    assert main(["train", "--config", path, *XMOD]) == 0
    full = dict(seen)
    w_full = AutoModelForMaskedLM.from_pretrained(str(run_dir / "runs/t/train/export")).state_dict()
    crash_at["b"] = 12  # the checkpoint of step 10 is on disk
    assert main(["train", "--config", path, *XMOD, "--force"]) == 1
    crash_at["b"] = None
    seen.clear()
    assert main(["train", "--config", path, *XMOD, "--resume"]) == 0
    resumed = dict(seen)
    assert min(resumed) == 10 and all(resumed[b] == full[b] for b in resumed)
    w_res = AutoModelForMaskedLM.from_pretrained(str(run_dir / "runs/t/train/export")).state_dict()
    assert any("adapter_modules.fr.dense2" in k for k in w_full)
    for k in w_full:  # modules included: same batches, dropout and optimizer state give the same weights
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-4, atol=1e-5)


def test_ddp_on_two_cpu_processes_matches_one_process(run_dir, tiny_teachers, corpora):
    """2 processes (gloo) x 4 sequences vs 1 process x 8. Every module takes part in every step (zero
    gradients for absent languages), so DDP needs no find_unused_parameters."""
    path = str(write_config(run_dir, tiny_teachers, corpora, max_steps=20))
    tests = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))  # this checkout's mergedistill
    base = [sys.executable, "-m", "mergedistill", "train", "--config", path, *XMOD, "--train.accelerator=cpu"]
    one = subprocess.run(base + ["--train.devices=1", "--train.batch_size=8"], cwd=run_dir, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    v1, t1 = series(metrics(run_dir), "val/loss"), series(metrics(run_dir), "train/loss")
    w1 = AutoModelForMaskedLM.from_pretrained(str(run_dir / "runs/t/train/export")).state_dict()
    two = subprocess.run(base + ["--force", "--train.devices=2", "--train.strategy=ddp", "--train.batch_size=4"],
                         cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    v2, t2 = series(metrics(run_dir), "val/loss"), series(metrics(run_dir), "train/loss")
    assert [s for s, _ in v1] == [s for s, _ in v2] and len(v1) == 2
    np.testing.assert_allclose([v for _, v in v2], [v for _, v in v1], rtol=0.02)
    np.testing.assert_allclose([v for _, v in t2], [v for _, v in t1], rtol=0.05)
    w2 = AutoModelForMaskedLM.from_pretrained(str(run_dir / "runs/t/train/export")).state_dict()
    moved = [k for k in w1 if "adapter_modules" in k and "dense2.weight" in k]
    assert moved and all(w2[k].abs().sum() > 0 for k in moved)  # every module trained on both ranks' sequences
