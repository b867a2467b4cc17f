"""The vocabulary folder under tampering, truncation, full disks, read-only folders and kills."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SENTENCES, in_dir, make_config
from mergedistill import fsutil
from mergedistill.cli import main
from mergedistill.config import load_config
from mergedistill.errors import UserError
from mergedistill.vocab.stage import load_vocab

ROUTING = {"de": "wp", "ru": "uni", "fr": "bbpe"}


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_teachers, tiny_corpora):
    work = tmp_path_factory.mktemp("vocab-integrity")
    with in_dir(work):
        make_config(work / "c.yaml", tiny_teachers, tiny_corpora, ROUTING, data={"seq_len": 64})
        assert main(["vocab", "--config", "c.yaml"]) == 0
    return work


@pytest.fixture
def run(golden, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(golden, work)
    monkeypatch.chdir(work)
    return work


def _refused(work: Path, what: str) -> None:
    with pytest.raises(UserError) as err:
        load_vocab(load_config(work / "c.yaml"))
    assert what in str(err.value) and "do not match its fingerprint.json" in str(err.value)
    assert "rerun `mergedistill vocab --config" in str(err.value)


def test_an_edited_vocab_txt_is_refused_and_the_next_run_rebuilds_it(run):
    txt = run / "vocab/t/vocab.txt"
    good = txt.read_text(encoding="utf-8")
    lines = good.splitlines()
    lines[10], lines[11] = lines[11], lines[10]
    txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _refused(run, "vocab.txt")
    assert main(["vocab", "--config", "c.yaml"]) == 0  # no skip: the folder does not match its fingerprint
    assert txt.read_text(encoding="utf-8") == good
    load_vocab(load_config(run / "c.yaml"))


def test_an_edited_token_column_of_vocab_parquet_is_refused(run):
    path = run / "vocab/t/vocab.parquet"
    t = pq.read_table(path)
    tokens = t.column("token").to_pylist()
    tokens[20] = "tampered"
    pq.write_table(t.set_column(t.schema.get_field_index("token"), "token", pa.array(tokens, pa.string())), path)
    assert pq.read_table(path).column("key").to_pylist() == t.column("key").to_pylist()  # keys (and id maps) unchanged
    _refused(run, "vocab.parquet")


@pytest.mark.parametrize("name,content", [("fingerprint.json", b'{"format": 1, "vocab": "ab'), ("fingerprint.json", b""),
                                          ("idmaps/wp.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<i4'"),
                                          ("tokenizers/uni/tokenizer.json", b"{")])
def test_truncated_files_exit_2_saying_rerun_vocab(run, capsys, name, content):
    (run / "vocab/t" / name).write_bytes(content)
    assert main(["data", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert name in err and "rerun `mergedistill vocab --config c.yaml --force`" in err and "Traceback" not in err


def _deny(monkeypatch, folder: Path, code: int) -> None:
    """Creating anything under `folder` fails with `code` (a read-only folder as root sees it)."""
    folder = Path(os.path.abspath(folder))
    for mod, name in ((fsutil.tempfile, "mkdtemp"), (fsutil.tempfile, "mkstemp"), (os, "open")):
        real = getattr(mod, name)

        def fake(*a, _real=real, **k):
            where = k.get("dir") or (a[0] if a else None)
            if where is not None and Path(os.path.abspath(where)).is_relative_to(folder):
                raise OSError(code, os.strerror(code), str(where))
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, fake)


def test_a_read_only_vocab_folder_exits_2_and_writes_nothing(run, monkeypatch, capsys):
    shutil.rmtree(run / "vocab")
    (run / "vocab").mkdir()
    _deny(monkeypatch, run / "vocab", errno.EROFS)
    assert main(["vocab", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write vocab" in err and "Read-only file system" in err and "Traceback" not in err
    assert not list((run / "vocab").iterdir())


def test_a_full_disk_while_writing_the_vocabulary_leaves_the_old_one(run, monkeypatch, capsys):
    before = {p: p.read_bytes() for p in (run / "vocab/t").rglob("*") if p.is_file()}
    import numpy as np

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    assert main(["vocab", "--config", "c.yaml", "--force"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write vocab/t: No space left on device" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in (run / "vocab/t").rglob("*") if p.is_file()} == before
    assert not [p for p in (run / "vocab").iterdir() if p.name.startswith(".t.")]


def test_the_next_run_removes_the_debris_of_killed_runs(run):
    dead = f"pid999999@{fsutil.temp_tag().split('@')[1]}"
    partial = run / "vocab" / f".t.{dead}.abc.partial"
    (partial / "idmaps").mkdir(parents=True)
    cached = run / "vocab/.cache/t" / f".counts-wp-de-train-x.npy.{dead}.y.tmp"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half")
    assert main(["vocab", "--config", "c.yaml"]) == 0
    assert not partial.exists() and not cached.exists()


def test_kill_9_of_vocab_leaves_no_worker_alive(tmp_path, tiny_teachers, tiny_corpora):
    big = {lang: tmp_path / f"{lang}.txt" for lang in ROUTING}  # long corpora: the pruning scans take a while
    for lang, p in big.items():
        p.write_text("\n".join(SENTENCES[lang] * 20000) + "\n", encoding="utf-8")
    make_config(tmp_path / "c.yaml", tiny_teachers, big, ROUTING, vocab={"prune": True})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "mergedistill", "vocab", "--config", "c.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> set[int]:
        out = set()
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            try:
                out |= {int(x) for x in (task / "children").read_text().split()}
            except OSError:
                pass
        return out

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    workers: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers |= children()
        time.sleep(0.01)
    assert len(workers) >= 2, "vocab finished before its workers were seen: make the corpora longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(w) for w in workers):
        time.sleep(0.05)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived the killed vocab stage"
