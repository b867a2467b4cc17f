"""`ablate --archs`: a dense and an X-Mod student from the same shards, body and steps, one table."""
from __future__ import annotations

import csv
import json
import os

import pytest
import yaml
from transformers import AutoModelForMaskedLM, BertForMaskedLM, XmodForMaskedLM

from conftest import SENTENCES, make_config
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.eval.report import Row
from mergedistill.experiments import archs
from mergedistill.experiments.archs import arch_config, write_outputs
from mergedistill.models.xmod import parameter_counts


def test_dense_and_xmod_students_from_the_same_shards_in_one_table(workdir, tiny_teachers, tmp_path, monkeypatch):
    monkeypatch.setattr(archs, "TIMED_STEPS", 5)
    corpora = {}
    for lang in ("de", "ru"):
        p = tmp_path / f"{lang}.txt"
        p.write_text("\n".join(SENTENCES[lang] * 6) + "\n", encoding="utf-8")
        corpora[lang] = p
    cfg_path = make_config(
        workdir / "c.yaml", tiny_teachers, corpora, {"de": "wp", "ru": "uni"},
        data={"seq_len": 32, "shard_lines": 10, "splits": ["train"]},
        student={"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64, "init": "teacher:wp"},
        train={"max_steps": 4, "val_every": 4, "batch_size": 4, "warmup_steps": 1},
        eval={"pll_lines": 3, "max_lines": 10},
    )
    data = yaml.safe_load(cfg_path.read_text())
    for lang in ("de", "ru"):
        data["languages"][lang]["test"] = str(corpora[lang])
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["ablate", "--config", str(cfg_path), "--archs"]) == 0

    # the dense student is the run itself; the X-Mod one trains beside it on the same (hard-linked) shards
    dense = json.loads((workdir / "runs/t/train/state.json").read_text())
    xmod = json.loads((workdir / "runs/t-xmod/train/state.json").read_text())
    assert dense["steps"] == xmod["steps"] == 4
    assert xmod["inputs"]["student"]["arch"] == "xmod" and "arch" not in dense["inputs"]["student"]
    same_body = ("layers", "hidden", "heads", "intermediate", "init")
    assert all(dense["inputs"]["student"][k] == xmod["inputs"]["student"][k] for k in same_body)
    assert dense["inputs"]["train"] == xmod["inputs"]["train"] and dense["inputs"]["data"] == xmod["inputs"]["data"]
    for lang in ("de", "ru"):
        a = sorted((workdir / f"runs/t/data/{lang}/train").glob("*.arrow"))
        b = sorted((workdir / f"runs/t-xmod/data/{lang}/train").glob("*.arrow"))
        assert a and [os.stat(p).st_ino for p in a] == [os.stat(p).st_ino for p in b]
    assert isinstance(AutoModelForMaskedLM.from_pretrained(str(workdir / "runs/t/train/export")), BertForMaskedLM)
    xm = AutoModelForMaskedLM.from_pretrained(str(workdir / "runs/t-xmod/train/export"))
    assert isinstance(xm, XmodForMaskedLM)

    out = workdir / "runs/t/archs"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["arch"], r["language"], r["metric"]) for r in rows}
    for arch in ("dense", "xmod"):
        for lang in ("de", "ru"):
            for metric in ("mlm_acc", "agreement", "pll_per_word", "params_total", "params_active"):
                assert (arch, lang, metric) in got, (arch, lang, metric)
        assert (arch, "all", "step_s") in got
    c = parameter_counts(xm)
    active = {r["language"]: float(r["value"]) for r in rows if r["arch"] == "xmod" and r["metric"] == "params_active"}
    assert active == {lang: c["active"][lang] for lang in ("de", "ru")}
    report = (out / "report.md").read_text()
    assert "| de | wp |" in report and "X-Mod ahead of the dense student in masked accuracy on" in report
    assert f"X-Mod {c['total']:,} in all" in report and "training step time" in report
    assert (out / "archs.png").stat().st_size > 1000
    state = json.loads((out / "state.json").read_text())
    acc = {(r["arch"], r["language"]): float(r["value"]) for r in rows if r["metric"] == "mlm_acc"}
    assert state["wins"] == sum(acc[("xmod", lang)] > acc[("dense", lang)] for lang in ("de", "ru")) and state["languages"] == 2
    assert state["step_ratio"] == pytest.approx(float(next(r["value"] for r in rows if r["arch"] == "xmod" and r["metric"] == "step_s")) / float(
        next(r["value"] for r in rows if r["arch"] == "dense" and r["metric"] == "step_s")), rel=1e-4)
    # a rerun trains and scores nothing
    stamps = [(p, p.stat().st_mtime_ns) for p in (workdir / "runs/t-xmod/train/state.json", out / "report.md")]
    assert main(["ablate", "--config", str(cfg_path), "--archs"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps)


def test_an_xmod_run_compares_with_a_dense_copy_without_its_xmod_settings(workdir, tiny_teachers, tiny_corpora):
    cfg = load_config(make_config(workdir / "c.yaml", tiny_teachers, tiny_corpora, {"de": "wp", "ru": "uni"}),
                      ["--student.arch=xmod", "--student.adapter_reduction_factor=4", "--student.modules={de: g}"])
    dense, xmod = arch_config(cfg, "bert"), arch_config(cfg, "xmod")
    assert xmod.run == "t" and xmod.student == cfg.student
    assert dense.run == "t-bert" and dense.vocab_run == "t" and dense.student.arch == "bert"
    assert dense.student.modules == {} and dense.student.adapter_reduction_factor == 2
    assert cfg.student.arch == "xmod" and cfg.student.modules == {"de": "g"}  # the config given is left as it was


def test_the_table_counts_the_languages_where_xmod_is_ahead(tmp_path, tiny_teachers, tiny_corpora):
    cfg = load_config(make_config(tmp_path / "c.yaml", tiny_teachers, tiny_corpora, {"de": "wp", "ru": "uni", "fr": "bbpe"}))
    acc = {"de": (0.30, 0.35), "ru": (0.40, 0.38), "fr": (0.20, 0.20)}  # X-Mod ahead on de only (a tie is not ahead)
    rows = []
    for lang, (d, x) in acc.items():
        for model, v in (("dense", d), ("xmod", x)):
            rows += [Row("intrinsic", lang, model, model, "mlm_acc", v, 100), Row("intrinsic", lang, model, model, "agreement", v, 100),
                     Row("intrinsic", lang, model, model, "pll_per_word", -3.0, 10),
                     Row("intrinsic", lang, model, model, "params_total", 1000 if model == "dense" else 1300, 0),
                     Row("intrinsic", lang, model, model, "params_active", 1000 if model == "dense" else 1100, 0)]
        rows.append(Row("intrinsic", lang, f"teacher:{cfg.teacher_of(lang)}", "routed teacher", "mlm_acc", 0.5, 100))
    summary = write_outputs(tmp_path, cfg, rows, {"dense": 0.010, "xmod": 0.012}, {"dense": 60.0, "xmod": None}, list(acc))
    assert summary == {"wins": 1, "languages": 3, "step_ratio": 0.012 / 0.010}
    report = (tmp_path / "report.md").read_text()
    assert "on **1 of 3** languages" in report and "**1.20x**" in report
    assert "| de | wp | 0.300 | 0.350 | 0.500 | yes |" in report and "| fr | bbpe | 0.200 | 0.200 | 0.500 | no |" in report
    assert "dense 1,000 (all active for every language), X-Mod 1,300 in all" in report
    assert "dense 60 s, xmod -" in report
