"""`mergedistill compress` on a broken export: refused with exit 2 and a message naming the export and what to
do, before any variant is built. A tiny export written here, no trained run (the refusal lists the missing
vocabulary too: every problem at once)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from _tiny import tiny_bert

from mergedistill.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
EXPORT = Path("runs/t/train/export")


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_corpora) -> Path:
    (tmp_path / "teachers/wp").mkdir(parents=True)
    cfg = {"run": "t", "teachers": {"wp": {"path": "teachers/wp"}},
           "languages": {"de": {"train": str(tiny_corpora["de"]), "test": str(tiny_corpora["de"]), "teacher": "wp"}},
           "student": {"hidden": 32, "heads": 4, "layers": 2, "intermediate": 64}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    tiny_bert().save_pretrained(str(EXPORT))
    (EXPORT / "languages.json").write_text(json.dumps({"de": "tokenizers/wp"}))
    return tmp_path


def compress(capsys) -> str:
    assert main(["compress", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert not list(Path("runs/t").glob("compress/*/config.json"))
    return err


def test_truncated_weights_are_refused_before_any_variant(work, capsys):
    p = EXPORT / "model.safetensors"
    p.write_bytes(p.read_bytes()[:2000])
    err = compress(capsys)
    assert f"{EXPORT}: cannot load the exported student (SafetensorError" in err and "mergedistill train --config c.yaml --force" in err


def test_a_corrupt_config_json_is_refused(work, capsys):
    """transformers raises OSError for it, which used to end as an internal error (exit 1)."""
    (EXPORT / "config.json").write_text('{"model_type": "be')
    err = compress(capsys)
    assert f"{EXPORT / 'config.json'}: cannot read the exported student's config" in err and "--force" in err


def test_leftovers_of_a_killed_run_are_removed(work, capsys):
    """compress holds its lock and clears what killed runs left (even when it then refuses its input)."""
    debris = Path(f"runs/t/compress/.sparse-50.pid999999@{socket.gethostname().replace('.', '_')}.x1.partial")
    debris.mkdir(parents=True)
    (debris / "half.txt").write_text("half")
    p = EXPORT / "model.safetensors"
    p.write_bytes(p.read_bytes()[:2000])
    compress(capsys)
    assert not debris.exists()


def test_a_full_disk_in_safetensors_is_a_write_error_naming_the_variant(tmp_path, monkeypatch):
    """safetensors raises a full disk as SafetensorError("... (os error 28)"), which used to end the stage as an
    internal error (exit 1): it is a WriteError naming the variant's file, and no variant folder is left."""
    from safetensors import SafetensorError
    from transformers import BertForMaskedLM

    from mergedistill.compress.export import write_variant
    from mergedistill.compress.variants import Variant
    from mergedistill.eval.models import Export
    from mergedistill.fsutil import WriteError

    student = tmp_path / "export"
    tiny_bert().save_pretrained(str(student))
    (student / "tokenizers").mkdir()
    (student / "languages.json").write_text("{}")

    def full(self, *a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(BertForMaskedLM, "save_pretrained", full)
    out = tmp_path / "compress" / "sparse-50"
    with pytest.raises(WriteError, match=f"cannot write {out / 'model.safetensors'}: No space left on device; free some space"):
        write_variant(out, tiny_bert(), Export("student", student, {}, {}), Variant("sparse-50", "sparse", 0.5), {})
    assert not out.exists() and not list(out.parent.glob("*.partial"))
