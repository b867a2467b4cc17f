"""Training under a full disk, a corrupt checkpoint, Ctrl-C and debris of killed runs."""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, in_dir, make_config
from mergedistill.cli import main
from mergedistill.fsutil import WriteError, temp_tag
from mergedistill.train.guard import AtomicCheckpointIO, CorruptCheckpoint

ROUTING = {"de": "wp", "fr": "bbpe"}
DATA = {"seq_len": 32, "shard_lines": 20, "splits": ["train"], "batch_size": 8}
STUDENT = {"hidden": 32, "heads": 2, "layers": 1, "intermediate": 64, "max_position": 64}
TRAIN = {"max_steps": 6, "val_every": 2, "batch_size": 4, "lr": 0.003, "warmup_steps": 1, "accelerator": "cpu"}
pytestmark = pytest.mark.usefixtures("one_thread")


def _full_after(monkeypatch, folder: Path, limit: int) -> None:
    """Files opened for writing under `folder` take `limit` bytes, then fail like a full disk."""
    real_open = builtins.open

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def close(self):
            self.f.close()

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        inside = isinstance(file, (str, os.PathLike)) and Path(os.path.abspath(os.fspath(file))).is_relative_to(folder)
        return Full(f) if inside and "w" in mode else f

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 10, "w": torch.ones(1000)}, path)
    _full_after(monkeypatch, tmp_path, 2000)
    with pytest.raises(WriteError, match=r"cannot write .*last.ckpt: No space left on device"):
        io_.save_checkpoint({"global_step": 20, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert io_.load_checkpoint(path)["global_step"] == 10
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_that_cannot_be_read_is_named_corrupt(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpoint, match=r"last.ckpt: corrupt checkpoint, it cannot be read .*--force"):
        AtomicCheckpointIO().load_checkpoint(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_teachers):
    work = tmp_path_factory.mktemp("guard-prep")
    corpora = {}
    for lang in ROUTING:
        corpora[lang] = work / f"{lang}.txt"
        corpora[lang].write_text("\n".join(SENTENCES[lang] * 8) + "\n", encoding="utf-8")
    with in_dir(work):
        make_config(work / "c.yaml", tiny_teachers, corpora, ROUTING, data=DATA, student=STUDENT, train=TRAIN)
        assert main(["vocab", "--config", "c.yaml"]) == 0
        assert main(["data", "--config", "c.yaml"]) == 0
    return work


@pytest.fixture
def run(prepared, tmp_path, monkeypatch):
    """A fresh folder with the prepared config, vocab/ and runs/t/data/ (symlinked), as cwd."""
    (tmp_path / "runs" / "t").mkdir(parents=True)
    shutil.copy(prepared / "c.yaml", tmp_path / "c.yaml")
    os.symlink(prepared / "vocab", tmp_path / "vocab")
    os.symlink(prepared / "runs" / "t" / "data", tmp_path / "runs" / "t" / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _fill_disk_after_first_checkpoint(monkeypatch, fill) -> None:
    """Once the first checkpoint is on disk, `fill(its size)` takes the disk's space away."""
    import mergedistill.train.module as module

    real = module.DistillModule.training_step
    done = {"x": False}

    def step(self, batch, batch_idx):
        last = Path("runs/t/train/checkpoints/last.ckpt")
        if self.global_step == 3 and not done["x"] and last.is_file():
            done["x"] = True
            fill(last.stat().st_size)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(module.DistillModule, "training_step", step)


def test_train_on_a_disk_that_fills_up_exits_2_and_keeps_the_last_good_checkpoint(run, monkeypatch, capsys):
    ckpt_dir = (run / "runs/t/train/checkpoints").resolve()
    _fill_disk_after_first_checkpoint(monkeypatch, lambda size: _full_after(monkeypatch, ckpt_dir, size // 2))
    assert main(["train", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write" in err and "last.ckpt: No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(builtins, "open", io.open)
    assert _step(ckpt_dir / "last.ckpt") == 2


@pytest.fixture
def tmpfs_train(run):
    """runs/t/train on a real small file system (root with mount rights only)."""
    train = run / "runs/t/train"
    train.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(train)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield train
    subprocess.run(["umount", "-l", str(train)], capture_output=True)


def test_a_real_full_disk_while_saving_keeps_the_last_good_checkpoint(run, tmpfs_train, monkeypatch, capsys):
    def fill(size: int) -> None:  # all the space but half a checkpoint
        st = os.statvfs(tmpfs_train)
        with open(tmpfs_train / "filler", "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - size // 2))

    _fill_disk_after_first_checkpoint(monkeypatch, fill)
    assert main(["train", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert _step(tmpfs_train / "checkpoints/last.ckpt") == 2
    (tmpfs_train / "filler").unlink()
    assert main(["train", "--config", "c.yaml", "--resume"]) == 0  # space freed: the run goes on


def test_resume_from_a_corrupt_checkpoint_names_it(run, capsys):
    assert main(["train", "--config", "c.yaml", "--train.max_steps=2"]) == 0  # a checkpoint of step 2
    state = run / "runs/t/train/state.json"
    last = run / "runs/t/train/checkpoints/last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    shutil.rmtree(run / "runs/t/train/export")
    s = json.loads(state.read_text())
    state.write_text(json.dumps({**s, "status": "training"}))
    capsys.readouterr()
    assert main(["train", "--config", "c.yaml", "--train.max_steps=2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "last.ckpt: corrupt checkpoint, it cannot be read" in err and "--force" in err and "Traceback" not in err
    state.write_text('{"inputs": {"vocab": ')  # and a truncated state.json says what to rerun
    assert main(["train", "--config", "c.yaml", "--train.max_steps=2", "--resume"]) == 2
    assert "state.json: unreadable or truncated" in capsys.readouterr().err


def test_ctrl_c_says_the_step_and_how_to_continue(run):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "mergedistill", "train", "--config", "c.yaml", "--train.max_steps=100000"],
                            cwd=run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if pytest runs in the background
    last = run / "runs/t/train/checkpoints/last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "mergedistill train: interrupted at step " in err and "; continue with --resume" in err and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert step >= _step(last) >= 2


def test_the_next_run_removes_the_debris_of_killed_runs(run):
    dead = f"pid999999@{temp_tag().split('@')[1]}"
    debris = run / "runs/t/train/checkpoints" / f".last.ckpt.{dead}.x.tmp"
    debris.parent.mkdir(parents=True)
    debris.write_bytes(b"half a checkpoint")
    assert main(["train", "--config", "c.yaml", "--train.max_steps=2"]) == 0
    assert not debris.exists()
