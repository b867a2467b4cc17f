"""`mergedistill extend` on a broken original export: refused with exit 2 and a message naming the export and
what to do, before any work (no tokenizer trained, nothing under runs/<run>/extend/). Tiny exports written
here (a dense BERT, an X-Mod student), no trained run: the refusal comes before the vocabulary is needed."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForMaskedLM, XmodConfig, XmodForMaskedLM

from mergedistill.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
EXPORT = Path("runs/t/train/export")
SMALL = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64, type_vocab_size=1)


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_corpora) -> Path:
    """A run config (de distilled, en to add) and a dense export of de in runs/t/train/export."""
    (tmp_path / "teachers/wp").mkdir(parents=True)
    cfg = {"run": "t", "teachers": {"wp": {"path": "teachers/wp"}},
           "languages": {"de": {"train": str(tiny_corpora["de"]), "teacher": "wp"}},
           "extend": {"languages": {"en": {"train": str(tiny_corpora["en"]), "test": str(tiny_corpora["en"])}}, "method": "full",
                      "steps": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    export(BertForMaskedLM(BertConfig(**SMALL)), {"de": "tokenizers/wp"})
    return tmp_path


def export(model, languages: dict[str, str]) -> None:
    model.save_pretrained(str(EXPORT))
    (EXPORT / "languages.json").write_text(json.dumps(languages))
    for sub in set(languages.values()):
        (EXPORT / sub).mkdir(parents=True, exist_ok=True)
        (EXPORT / sub / "tokenizer.json").write_text("{}")


def extend(capsys, *extra: str) -> str:
    assert main(["extend", "--config", "c.yaml", "--language", "en", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not Path("runs/t/extend/en/work").exists() and not Path("runs/t/extend/en/export").exists()
    return err


def test_truncated_weights_are_refused_before_any_work(work, capsys):
    p = EXPORT / "model.safetensors"
    p.write_bytes(p.read_bytes()[:2000])
    err = extend(capsys)
    assert f"{EXPORT}: cannot load the exported student (SafetensorError" in err and "mergedistill train --config c.yaml --force" in err


def test_a_corrupt_config_json_is_refused(work, capsys):
    """It used to end in a JSONDecodeError traceback (exit 1)."""
    (EXPORT / "config.json").write_text('{"num_hidden_la')
    err = extend(capsys)
    assert f"{EXPORT / 'config.json'}: unreadable or truncated" in err and "--force" in err


def test_a_language_without_its_tokenizer_folder_is_refused(work, capsys):
    """It used to fail after training, when the old languages were evaluated."""
    (EXPORT / "tokenizers/wp/tokenizer.json").unlink()
    (EXPORT / "tokenizers/wp").rmdir()
    assert f"{EXPORT}: no tokenizer for de: tokenizers/wp" in extend(capsys)


def test_module_init_on_a_dense_student_is_refused(work, capsys):
    """An X-Mod-only setting on a dense student used to be ignored silently."""
    err = extend(capsys, "--extend.module_init=de")
    assert "extend.module_init: 'de' sets where an X-Mod student's new language module starts" in err
    assert "is a bert model with no language modules" in err


def _xmod(languages: list[str]) -> XmodForMaskedLM:
    torch.manual_seed(0)
    return XmodForMaskedLM(XmodConfig(**SMALL, languages=languages, default_language=languages[0]))


def test_an_xmod_export_without_a_module_s_weights_is_refused(work, capsys):
    """Weights that lack ru's module used to load with that module random (a warning from transformers only)."""
    from safetensors.torch import load_file, save_file

    export(_xmod(["de", "ru"]), {"de": "tokenizers/wp", "ru": "tokenizers/wp"})
    p = EXPORT / "model.safetensors"
    save_file({k: v for k, v in load_file(str(p)).items() if ".adapter_modules.ru." not in k}, str(p), metadata={"format": "pt"})
    err = extend(capsys, "--extend.method=xmod")
    assert f"{p}: 8 weight(s) of the model its config describes are not in it" in err and "adapter_modules.ru" in err


def test_an_xmod_export_without_a_language_s_module_is_refused(work, capsys):
    """languages.json has ru, the X-Mod config has no module for it: said before training, not when ru is evaluated."""
    export(_xmod(["de"]), {"de": "tokenizers/wp", "ru": "tokenizers/wp"})
    assert "the X-Mod student has no module for 'ru'" in extend(capsys, "--extend.method=xmod")


def test_leftovers_of_a_killed_run_are_removed(work, capsys):
    """extend holds its lock and clears what killed runs left (even when it then refuses its input)."""
    debris = Path(f"runs/t/extend/en/.export.pid999999@{socket.gethostname().replace('.', '_')}.x1.partial")
    debris.mkdir(parents=True)
    (debris / "half.txt").write_text("half")
    p = EXPORT / "model.safetensors"
    p.write_bytes(p.read_bytes()[:2000])
    extend(capsys)
    assert not debris.exists()
