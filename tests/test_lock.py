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


TRY = """
import sys
from pathlib import Path
from mergedistill.errors import UserError
from mergedistill.lock import stage_lock
try:
    with stage_lock(sys.argv[1], Path(sys.argv[2]), "runs/r"):
        print("taken")
except UserError:
    print("refused")
"""


def _another_process_gets(tmp_path: Path, stage: str, output: str) -> str:
    """What a separate process (no rank variables) gets when it asks for the lock: taken or refused."""
    env = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "SLURM_NTASKS", "LOCAL_RANK", "RANK")}
    return subprocess.run([sys.executable, "-c", TRY, stage, output], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_a_stage_may_take_its_own_lock_again_and_ranks_share_it(tmp_path, monkeypatch, clean_env):
    monkeypatch.chdir(tmp_path)
    lock = lock_file(Path("runs/r/data"))
    with stage_lock("data", Path("runs/r/data"), "runs/r"):
        with stage_lock("data", Path("runs/r/data"), "runs/r"):  # re-entered, not refused
            assert lock.read_text().strip() == str(os.getpid())
        # leaving the inner block keeps the lock: another process is still refused
        assert _another_process_gets(tmp_path, "data", "runs/r/data") == "refused"
    assert _another_process_gets(tmp_path, "data", "runs/r/data") == "taken"  # released with the outer block

    proc = _holder(tmp_path)
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker reruns the command the holder runs
        entered = False
        with stage_lock("train", Path("runs/r/train"), "runs/r"):
            entered = True
            # the worker neither took the lock nor wrote its pid: the holder still has it
            assert lock_file(Path("runs/r/train")).read_text().strip() == str(proc.pid)
            assert _another_process_gets(tmp_path, "train", "runs/r/train") == "refused"
        assert entered
        assert _another_process_gets(tmp_path, "train", "runs/r/train") == "refused"  # the worker's exit released nothing
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
