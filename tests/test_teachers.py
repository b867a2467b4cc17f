"""Where teachers come from: local folders, and hub ids without a network (one attempt, then a message)."""
from __future__ import annotations

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
