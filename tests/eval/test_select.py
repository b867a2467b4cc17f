"""`select` ranks teachers where the better one is known by construction."""
from __future__ import annotations

import shutil

import torch
import yaml
from transformers import AutoModelForMaskedLM, AutoTokenizer

from conftest import SENTENCES, make_config
from mergedistill.cli import main
from mergedistill.config import load_config


def _unigram_teacher(src, dst, texts):
    """A copy of teacher `src` that predicts its language's unigram distribution at every position
    (near-zero weights, output bias = log token frequencies): by construction far better on that
    language's text than the same model predicting uniformly."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForMaskedLM.from_pretrained(str(src))
    counts = torch.ones(len(tok))
    for t in texts:
        for i in tok(t, add_special_tokens=False)["input_ids"]:
            counts[i] += 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-3)
        model.get_output_embeddings().bias.copy_(torch.log(counts / counts.sum()))
    model.save_pretrained(str(dst))
    return dst


def _uniform_teacher(src, dst):
    shutil.copytree(src, dst)
    model = AutoModelForMaskedLM.from_pretrained(str(src))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-3)
        model.get_output_embeddings().bias.zero_()
    model.save_pretrained(str(dst))
    return dst


def test_select_prefers_the_teacher_that_knows_the_language(workdir, tiny_teachers, tiny_corpora):
    de_text = SENTENCES["de"] * 3
    ru_text = SENTENCES["ru"] * 3
    teachers = {
        "good_de": _unigram_teacher(tiny_teachers["wp"], workdir / "good_de", de_text),
        "flat_de": _uniform_teacher(tiny_teachers["wp"], workdir / "flat_de"),
        "good_ru": _unigram_teacher(tiny_teachers["uni"], workdir / "good_ru", ru_text),
        "flat_ru": _uniform_teacher(tiny_teachers["uni"], workdir / "flat_ru"),
    }
    cfg_path = make_config(workdir / "c.yaml", teachers, tiny_corpora, {"de": "flat_de", "ru": "flat_ru"}, eval={"pll_lines": 6})
    data = yaml.safe_load(cfg_path.read_text())
    for lang, cand in (("de", "good_de"), ("ru", "good_ru")):
        data["languages"][lang]["valid"] = data["languages"][lang]["train"]
        data["languages"][lang]["candidates"] = [cand]
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["select", "--config", str(cfg_path)]) == 0
    routing = yaml.safe_load((workdir / "runs/t/select/routing.yaml").read_text())["routing"]
    assert routing == {"de": "good_de", "ru": "good_ru"}
    ranking = (workdir / "runs/t/select/ranking.md").read_text()
    assert "de -> good_de" in ranking and "ru -> good_ru" in ranking
    # the routing file is accepted by the later stages' config
    cfg = load_config(cfg_path, ["--routing=runs/t/select/routing.yaml"])
    assert cfg.teacher_of("de") == "good_de" and cfg.teacher_of("ru") == "good_ru"


def test_select_needs_a_valid_split(workdir, tiny_teachers, tiny_corpora, capsys):
    cfg_path = make_config(workdir / "c.yaml", tiny_teachers, tiny_corpora, {"de": "wp"})
    assert main(["select", "--config", str(cfg_path)]) == 2
    assert "languages.de.valid" in capsys.readouterr().err
