"""Where teachers come from: local folders, and hub ids without a network (one attempt, then a message)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_config
from mergedistill import teachers
from mergedistill.cli import main
from mergedistill.config import TeacherConfig, looks_like_hub_id
from mergedistill.errors import UserError


@pytest.fixture
def hub(monkeypatch):
    """Count the requests to the hub; none answers (no network)."""
    import httpx
    import huggingface_hub

    calls = []

    def unreachable(url, **kwargs):
        calls.append((url, kwargs))
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    teachers._hub_access.cache_clear()
    yield calls
    teachers._hub_access.cache_clear()


def test_unreachable_hub_is_one_attempt_then_a_message(workdir, tiny_teachers, tiny_corpora, hub, capsys, monkeypatch):
    import transformers

    def no_transformers(*a, **k):
        raise AssertionError("transformers was asked to fetch from the hub (it retries for ~50 s)")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_transformers)
    # two teachers with the same hub id: still one request
    cfg = make_config(workdir / "c.yaml", {"a": "no-such-org/no-such-model", "b": "no-such-org/no-such-model"}, tiny_corpora,
                      {"en": "a", "de": "b"})
    assert main(["vocab", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(hub) == 1 and hub[0][1]["retry_on_errors"] is False
    assert "teachers.a.path: the Hugging Face hub cannot be reached (ConnectError" in err
    assert "is not in the local cache" in err and "HF_HUB_OFFLINE=1" in err and "teachers.b.path" in err


def test_offline_mode_reads_the_cache_only(workdir, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and 'no-such-org/no-such-model' is not in the local Hugging Face cache"):
        teachers.load_teacher_tokenizer("x", TeacherConfig(path="no-such-org/no-such-model"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        teachers.load_teacher_model("x", TeacherConfig(path="no-such-org/no-such-model"))
    assert hub == []  # not a single request


def test_relative_path_of_a_missing_folder_is_not_a_hub_id(workdir, tiny_teachers, tiny_corpora, hub, capsys):
    (workdir / "teachers").mkdir()
    assert not looks_like_hub_id("teachers/xlmr") and looks_like_hub_id("xlm-roberta-base") and looks_like_hub_id("google/muril")
    cfg = make_config(workdir / "c.yaml", {"wp": tiny_teachers["wp"], "x": "teachers/xlmr"}, tiny_corpora, {"en": "wp", "de": "x"})
    assert main(["vocab", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "teachers.x.path: no folder 'teachers/xlmr'" in err
    assert hub == []


@pytest.mark.parametrize("fname", ["tokenizer.json", "tokenizer_config.json"])
def test_a_broken_tokenizer_file_is_named(tmp_path, tiny_teachers, fname):
    import shutil

    folder = tmp_path / "wp"
    shutil.copytree(tiny_teachers["wp"], folder)
    (folder / fname).write_text("{ not json")
    with pytest.raises(UserError, match=rf"teachers\.wp: .*{fname} is not valid JSON \(JSONDecodeError"):
        teachers.load_teacher_tokenizer("wp", TeacherConfig(path=str(folder)))


def _saved_padding_and_truncating(src: Path, dst: Path, max_length: int) -> Path:
    """A copy of teacher folder `src` whose tokenizer.json was saved with padding and truncation on (what
    save_pretrained writes after a call with padding=True, truncation=True)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    tj["truncation"] = {"direction": "Right", "max_length": max_length, "strategy": "LongestFirst", "stride": 0}
    tj["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                     "pad_type_id": 0, "pad_token": "<pad>"}
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return dst


def test_a_tokenizer_saved_padding_and_truncating_encodes_whole_texts(tmp_path, tiny_teachers):
    """The vocab stage's corpus counts and the data stage read a teacher's raw backend: a tokenizer.json
    saved with padding and truncation on must neither pad the shorter texts nor cut the longer ones."""
    from transformers import AutoTokenizer

    folder = _saved_padding_and_truncating(tiny_teachers["uni"], tmp_path / "uni", max_length=6)
    texts = ["the cat sat on the mat and looked at the dog for a very long time indeed", "a cat"]
    t = teachers.load_teacher_tokenizer("uni", TeacherConfig(path=str(folder)))
    ref = AutoTokenizer.from_pretrained(str(tiny_teachers["uni"]))
    expected = [ref(x, add_special_tokens=False)["input_ids"] for x in texts]
    assert len(expected[0]) > 6
    assert t.encode_batch(texts) == expected
    assert t.reference(texts[0], add_special_tokens=False)["input_ids"] == expected[0]  # the teacher's own call


def test_vocab_with_a_teacher_saved_truncating_keeps_the_pieces_of_long_lines(workdir, tiny_teachers, tiny_corpora):
    """Pruning counts every piece of every line, beyond the saved max_length too, so the student tokenizer
    writes what the teacher writes on long lines (the exact check would refuse the vocabulary otherwise)."""
    folder = _saved_padding_and_truncating(tiny_teachers["uni"], workdir / "uni", max_length=4)
    long = workdir / "long.txt"
    long.write_text("\n".join(" ".join(tiny_corpora["ru"].read_text(encoding="utf-8").split()[i:i + 40])
                              for i in range(0, 400, 40)) + "\n", encoding="utf-8")
    cfg = make_config(workdir / "c.yaml", {"uni": folder}, {"ru": long}, {"ru": "uni"}, vocab={"prune": True})
    assert main(["vocab", "--config", str(cfg)]) == 0
