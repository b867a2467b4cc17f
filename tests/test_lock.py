"""One process per stage and run folder; a killed holder never blocks the next run; forked workers
die with their parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergedistill.errors import UserError
from mergedistill.lock import lock_file, stage_lock

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
HOLD = """
import sys, time
from pathlib import Path
from mergedistill.lock import stage_lock
with stage_lock("train", Path("runs/r/train"), "runs/r"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)


def test_a_second_run_of_a_stage_is_refused_naming_the_first(tmp_path, monkeypatch, clean_env):
    monkeypatch.chdir(tmp_path)
    proc = _holder(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"another mergedistill train is running on runs/r \(pid {proc.pid}\)"):
            with stage_lock("train", Path("runs/r/train"), "runs/r"):
                pass
        with stage_lock("data", Path("runs/r/data"), "runs/r"):  # another stage of the same run may run
            pass
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path, monkeypatch, clean_env):
    monkeypatch.chdir(tmp_path)
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_file(Path("runs/r/train")).read_text().strip() == str(proc.pid)  # the file stays; the lock does not
    with stage_lock("train", Path("runs/r/train"), "runs/r"):
        assert lock_file(Path("runs/r/train")).read_text().strip() == str(os.getpid())


def test_a_stage_may_take_its_own_lock_again_and_ranks_share_it(tmp_path, monkeypatch, clean_env):
    monkeypatch.chdir(tmp_path)
    with stage_lock("data", Path("runs/r/data"), "runs/r"):
        with stage_lock("data", Path("runs/r/data"), "runs/r"):
            pass
    proc = _holder(tmp_path)
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker reruns the command the holder runs
        with stage_lock("train", Path("runs/r/train"), "runs/r"):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_cli_exits_2_while_another_run_holds_the_stage(tmp_path, clean_env):
    (tmp_path / "t").mkdir()
    (tmp_path / "t/config.json").write_text('{"model_type": "bert"}')  # enough for the checks made before the lock
    (tmp_path / "de.txt").write_text("Hallo Welt\n")
    (tmp_path / "c.yaml").write_text("run: r\nteachers: {t: {path: t}}\nlanguages: {de: {train: de.txt, teacher: t}}\n")
    proc = _holder(tmp_path)
    try:
        out = subprocess.run([sys.executable, "-m", "mergedistill", "train", "--config", "c.yaml"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True)
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 2
    assert f"another mergedistill train is running on runs/r (pid {proc.pid})" in out.stderr and "Traceback" not in out.stderr


WORKERS = """
import os, time
from mergedistill.parallel import run_tasks

def task():
    os.write(1, f"{os.getpid()}\\n".encode())  # one write: the two workers' lines never interleave
    time.sleep(60)
    return 0

run_tasks([task, task], workers=2)
"""


def test_kill_9_of_the_parent_takes_its_workers_along(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WORKERS], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, text=True)
    workers = [int(proc.stdout.readline()) for _ in range(2)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    deadline = time.time() + 10
    while time.time() < deadline and any(alive(w) for w in workers):
        time.sleep(0.05)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"
