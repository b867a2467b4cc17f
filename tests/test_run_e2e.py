"""`mergedistill run` end to end on tiny fixtures (slow: every stage, two students)."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import SENTENCES, make_config
from mergedistill.cli import main


@pytest.mark.slow
def test_run_all_stages_then_rerun_skips(workdir, tiny_teachers, tmp_path, caplog):
    caplog.set_level("INFO")
    corpora = {}
    for lang in ("de", "ru", "fr"):
        for split, reps in (("train", 8), ("valid", 2)):
            p = tmp_path / f"{lang}.{split}.txt"
            p.write_text("\n".join(SENTENCES[lang] * reps) + "\n", encoding="utf-8")
        p = tmp_path / f"{lang}.test.jsonl"
        p.write_text("\n".join(json.dumps({"text": s, "key": f"k{i}"}) for i, s in enumerate(SENTENCES[lang])) + "\n", encoding="utf-8")
        corpora[lang] = tmp_path / f"{lang}.train.txt"
    cfg_path = make_config(
        workdir / "c.yaml", tiny_teachers, corpora, {"de": "wp", "ru": "uni", "fr": "bbpe"},
        vocab={"prune": True}, data={"seq_len": 32, "shard_lines": 10},
        student={"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64},
        train={"max_steps": 6, "val_every": 3, "batch_size": 4, "warmup_steps": 1},
        eval={"max_lines": 10, "pll_lines": 3, "retrieval_pairs": 10},
    )
    data = yaml.safe_load(cfg_path.read_text())
    for lang in ("de", "ru", "fr"):
        data["languages"][lang]["valid"] = str(tmp_path / f"{lang}.valid.txt")
        data["languages"][lang]["test"] = str(tmp_path / f"{lang}.test.jsonl")
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(cfg_path)]) == 0
    assert (workdir / "vocab/t/fingerprint.json").is_file()
    assert (workdir / "runs/t/data/manifest.json").is_file()
    assert (workdir / "runs/t/train/export/model.safetensors").is_file()
    assert (workdir / "runs/t/baseline/export/model.safetensors").is_file()
    assert (workdir / "runs/t/eval/report.md").is_file()
    caplog.clear()
    assert main(["run", "--config", str(cfg_path)]) == 0
    assert "vocab/t is complete" in caplog.text and "are complete for these inputs; skipping" in caplog.text
    assert caplog.text.count("is complete for these inputs; skipping (--force retrains)") == 2


@pytest.mark.slow
def test_run_with_teachers_as_users_bring_them(workdir, tiny_teachers, hub_teachers, tmp_path):
    """ALBERT (rebuilt lowercasing), CamemBERT (NOTUSED tokens) and slow-only Japanese BERTs (character and
    WordPiece subwords) through every stage; the exported student answers each language in its ids."""
    from conftest import MORE_SENTENCES

    texts = {**SENTENCES, **MORE_SENTENCES}
    routing = {"en": "wp", "pl": "albert", "es": "camembert", "ja": "jachar", "zh": "jawp"}
    corpora = {}
    for lang in routing:
        for split, reps in (("train", 8), ("valid", 2), ("test", 2)):
            p = tmp_path / f"{lang}.{split}.txt"
            p.write_text("\n".join(texts[lang] * reps) + "\n", encoding="utf-8")
        corpora[lang] = tmp_path / f"{lang}.train.txt"
    teachers = {"wp": tiny_teachers["wp"], **hub_teachers}
    cfg_path = make_config(
        workdir / "c.yaml", teachers, corpora, routing,
        vocab={"prune": True}, data={"seq_len": 32, "shard_lines": 10, "whole_word_mask": True},
        student={"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64, "init": "teacher:jawp"},
        train={"max_steps": 4, "val_every": 2, "batch_size": 4, "warmup_steps": 1},
        eval={"max_lines": 10, "pll_lines": 3, "retrieval": False, "char_languages": ["ja", "zh"]},
    )
    data = yaml.safe_load(cfg_path.read_text())
    for lang in routing:
        data["languages"][lang]["valid"] = str(tmp_path / f"{lang}.valid.txt")
        data["languages"][lang]["test"] = str(tmp_path / f"{lang}.test.txt")
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(cfg_path)]) == 0
    export = workdir / "runs/t/train/export"
    langs = json.loads((export / "languages.json").read_text())
    assert langs == {lang: f"tokenizers/{t}" for lang, t in routing.items()}
    from mergedistill.models.exported import load_student

    for lang in routing:
        s = load_student(export, lang)
        assert len(s.tokenizer) == s.model.config.vocab_size
        preds = s.fill_mask(texts[lang][0].replace(texts[lang][0].split()[1], s.tokenizer.mask_token, 1) if lang not in ("ja", "zh")
                            else texts[lang][0][:2] + s.tokenizer.mask_token + texts[lang][0][3:])
        assert all(p["token"] in set(s.allowed.tolist()) for p in preds[0])
    report = (workdir / "runs/t/eval/report.md").read_text(encoding="utf-8")
    assert all(f"### {lang}" in report for lang in routing)
    # the card's example: a sentence of every language, and its code runs in the folder
    import subprocess
    import sys

    code = (export / "README.md").read_text(encoding="utf-8").split("```python\n", 1)[1].split("```", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=export, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(line.split(" | ")[0] for line in out.stdout.splitlines()) == sorted(routing)
