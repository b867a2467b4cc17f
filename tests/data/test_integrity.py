"""Shards and records that a later stage must not trust: content hashes, `data --verify`, rebuilding a
corrupt shard, truncated manifests, sequences longer than a teacher accepts, debris of killed runs."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import SENTENCES, in_dir, make_config
from mergedistill.cli import main
from mergedistill.data.shards import open_shard, shard_record
from mergedistill.errors import UserError

ROUTING = {"de": "wp", "fr": "bbpe"}
DATA = {"seq_len": 32, "shard_lines": 10, "splits": ["train"], "batch_size": 8}
STUDENT = {"hidden": 32, "heads": 2, "layers": 1, "intermediate": 64, "max_position": 64}
TRAIN = {"max_steps": 2, "val_every": 1, "batch_size": 4, "accelerator": "cpu"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity-corpora")
    out = {}
    for lang in ROUTING:
        p = root / f"{lang}.txt"
        p.write_text("\n".join(SENTENCES[lang] * 6) + "\n", encoding="utf-8")
        out[lang] = p
    return out


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_teachers, corpora):
    """vocab + data built once; each test works on a copy."""
    work = tmp_path_factory.mktemp("integrity")
    with in_dir(work):
        make_config(work / "c.yaml", tiny_teachers, corpora, ROUTING, data=DATA, student=STUDENT, train=TRAIN)
        assert main(["vocab", "--config", "c.yaml"]) == 0
        assert main(["data", "--config", "c.yaml"]) == 0
    return work


@pytest.fixture
def run(golden, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(golden, work, symlinks=True)
    monkeypatch.chdir(work)
    return work


def first_shard(work: Path) -> Path:
    return sorted((work / "runs/t/data/de/train").glob("shard-*.arrow"))[0]


def relabel_in_place(path: Path, value: int = 7) -> None:
    """Replace every gold label of the shard in place: same size, same record, other content."""
    data = bytearray(path.read_bytes())
    buf = pa.py_buffer(bytes(data))
    values = pa.ipc.open_stream(buf).read_all().column("labels").chunks[0].values
    start = values.buffers()[1].address - buf.address + values.offset * values.type.byte_width
    new = np.full(len(values), value, dtype=values.type.to_pandas_dtype()).tobytes()
    data[start: start + len(new)] = new
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def test_a_shard_changed_after_it_was_written_is_refused_naming_it(run):
    shard = first_shard(run)
    assert len(open_shard(shard))
    relabel_in_place(shard)
    with pytest.raises(UserError) as err:
        open_shard(shard)
    assert f"{shard}: corrupt shard" in str(err.value) and "rerun `mergedistill data`" in str(err.value)


def test_train_on_a_corrupt_shard_exits_2_naming_it(run, capsys):
    relabel_in_place(first_shard(run))  # trains silently on wrong targets without the hash
    assert main(["train", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert "shard-00000.arrow: corrupt shard" in err and "Traceback" not in err
    assert not (run / "runs/t/train/export").exists()


def test_data_rebuilds_a_corrupt_shard_to_the_same_bytes(run, caplog):
    shard = first_shard(run)
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # in place: the store's hard link to it is corrupt too
    with open(shard, "r+b") as f:
        f.write(bytes(data))
    assert shard_record(shard) is None
    assert main(["data", "--config", "c.yaml"]) == 0
    assert "corrupt shard" in caplog.text and "rebuilding it" in caplog.text
    assert shard.read_bytes() == good and shard_record(shard) is not None


def test_verify_checks_every_shard_and_builds_nothing(run, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert main(["data", "--config", "c.yaml", "--verify"]) == 0
    assert "are complete and intact" in caplog.text
    shard = first_shard(run)
    relabel_in_place(shard)
    bad = shard.read_bytes()
    assert main(["data", "--config", "c.yaml", "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"{Path('runs/t/data/de/train') / shard.name}: corrupt shard" in err and "rebuilds what is missing or corrupt" in err
    assert shard.read_bytes() == bad


@pytest.mark.parametrize("content", ['{"format": 2, "vocab": "ab', "", '{"format": 2}'])
def test_a_truncated_or_invalid_manifest_says_rerun_data(run, capsys, content):
    (run / "runs/t/data/manifest.json").write_text(content)
    assert main(["train", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert "runs/t/data/manifest.json: " in err and "rerun `mergedistill data --config c.yaml`" in err and "Traceback" not in err


def test_sequences_longer_than_a_teacher_accepts_are_refused_before_any_work(run, capsys):
    shutil.rmtree(run / "runs")
    assert main(["data", "--config", "c.yaml", "--data.seq_len=100", "--student.max_position=128"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len: 100 tokens per sequence, but teacher wp accepts at most 64" in err
    assert "teacher bbpe accepts at most 64" in err  # RoBERTa-style: the table holds 64 + padding offset
    assert not list(run.rglob("*.arrow"))


def test_force_drops_the_manifest_before_rebuilding(run, monkeypatch):
    from mergedistill.data import stage

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "process_shards", killed)
    assert main(["data", "--config", "c.yaml", "--force"]) == 130
    assert not (run / "runs/t/data/manifest.json").exists()  # it described the shards being rebuilt


def test_the_next_run_removes_the_debris_of_killed_runs(run):
    from mergedistill.fsutil import temp_tag

    dead = f"pid999999@{temp_tag().split('@')[1]}"
    debris = [run / "runs/t/data/de/train" / f".shard-00000.arrow.{dead}.x.tmp", run / "runs/t/data/de/train/.shard-00001.arrow.a1b2.tmp",
              run / "runs/.shards" / f".shard-00000.arrow.{dead}.link"]
    for p in debris:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    assert main(["data", "--config", "c.yaml"]) == 0
    assert not [p for p in debris if p.exists()]


def test_run_refuses_sequences_longer_than_a_teacher_accepts_before_building_the_vocabulary(run, capsys):
    shutil.rmtree(run / "vocab")
    assert main(["run", "--config", "c.yaml", "--data.seq_len=100", "--student.max_position=128"]) == 2
    assert "data.seq_len: 100 tokens per sequence, but teacher wp accepts at most 64" in capsys.readouterr().err
    assert not (run / "vocab" / "t").exists()
