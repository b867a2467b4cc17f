"""Atomic outputs under a full disk or a read-only folder, leftovers of killed runs, JSON records that
cannot be trusted, and the CLI's exit status for all of them."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mergedistill import fsutil
from mergedistill.errors import UserError
from mergedistill.fsutil import (
    WriteError,
    atomic_dir,
    atomic_path,
    read_json_record,
    remove_leftovers,
    temp_tag,
    write_json_atomic,
    write_text_atomic,
)


def _full_after(monkeypatch, folder: Path, limit: int, code: int = errno.ENOSPC) -> None:
    """Files opened for writing under `folder` accept `limit` bytes, then fail like a full disk."""
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > limit:
                self.f.write(b[: max(0, limit - (self.n - len(b)))])  # the part that fit, as a real disk
                raise OSError(code, os.strerror(code))
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        inside = Path(os.path.abspath(os.fspath(file))).is_relative_to(folder) if isinstance(file, (str, os.PathLike)) else False
        return Full(f) if inside and any(m in mode for m in "wa") else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # Path.write_text / write_bytes


def test_a_full_disk_while_writing_keeps_the_old_file_and_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "out" / "results.txt"
    write_text_atomic(target, "the good old content\n" * 10)
    _full_after(monkeypatch, tmp_path, 50)
    with pytest.raises(WriteError) as err:
        write_text_atomic(target, "new content that does not fit\n" * 100)
    assert str(err.value).startswith(f"cannot write {target}: No space left on device")
    assert target.read_text() == "the good old content\n" * 10
    assert [p.name for p in target.parent.iterdir()] == ["results.txt"]  # no temporary left


def test_a_read_only_folder_is_a_write_error_naming_it(tmp_path, monkeypatch):
    real = fsutil.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if Path(dir).is_relative_to(tmp_path / "ro"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(fsutil.tempfile, "mkstemp", read_only)
    with pytest.raises(WriteError, match=r"^cannot write .*ro/x.json: Read-only file system; run from a writable folder"):
        write_json_atomic(tmp_path / "ro" / "x.json", {"a": 1})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod'ed folder anyway")
def test_a_chmoded_folder_is_a_write_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="cannot write .*Permission denied"):
            write_text_atomic(ro / "sub" / "x.txt", "x")
    finally:
        ro.chmod(0o755)


def test_a_full_disk_inside_an_atomic_folder_names_the_final_folder(tmp_path, monkeypatch):
    final = tmp_path / "vocab" / "run"
    with atomic_dir(final) as tmp:
        (tmp / "old.txt").write_text("complete")
    _full_after(monkeypatch, tmp_path, 10)
    with pytest.raises(WriteError) as err:
        with atomic_dir(final) as tmp:
            (tmp / "idmaps").mkdir()
            with open(tmp / "idmaps" / "a.bin", "wb") as f:
                f.write(b"x" * 100)
    assert str(err.value).startswith(f"cannot write {final}: No space left on device")  # a write error names no file
    assert (final / "old.txt").read_text() == "complete"
    assert sorted(p.name for p in final.parent.iterdir()) == ["run"]  # the .partial folder is gone


def test_a_read_error_inside_a_write_stays_what_it_is(tmp_path):
    missing = tmp_path / "nothere.txt"
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.txt"):
            missing.read_text()
    denied = OSError(errno.EACCES, "Permission denied", str(tmp_path / "input.txt"))
    with pytest.raises(OSError) as err:
        with atomic_path(tmp_path / "out.txt"):
            raise denied
    assert err.value is denied  # an unreadable input is not "cannot write"


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 KB file system (root with mount rights only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                          capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk(small_tmpfs):
    target = small_tmpfs / "data.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"1" * 20_000)
    with pytest.raises(WriteError, match="No space left on device"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"2" * 200_000)
    assert target.read_bytes() == b"1" * 20_000
    assert [p.name for p in small_tmpfs.iterdir()] == ["data.bin"]


def test_leftovers_of_dead_writers_go_and_live_ones_stay(tmp_path):
    out = tmp_path / "runs" / "r" / "data"
    (out / "de").mkdir(parents=True)
    dead = f"pid999999@{temp_tag().split('@')[1]}"
    debris = [out / "de" / f".shard-00001.arrow.{dead}.abc.tmp", tmp_path / "runs" / "r" / f".data.{dead}.x.partial",
              out / f".manifest.json.{dead}.old"]
    untagged = out / "de" / ".shard-00002.arrow.a1b2c3.tmp"
    live = out / "de" / f".shard-00003.arrow.{temp_tag()}.abc.tmp"  # this process: still writing
    elsewhere = out / "de" / ".shard-00004.arrow.pid1@otherhost.abc.tmp"  # another machine: cannot tell
    keep = [out / "de" / "shard-00000.arrow", out / "de" / ".hidden-but-not-ours"]
    for p in debris + [untagged, live, elsewhere] + keep:
        if p.suffix in (".partial", ".old"):
            p.mkdir()
            (p / "half").write_text("x")
        else:
            p.write_text("x")
    assert remove_leftovers(out, exclusive=False) == 3
    assert not any(p.exists() for p in debris) and untagged.exists()
    assert remove_leftovers(out) == 1  # holding the stage's lock: untagged (older) names go too
    assert not untagged.exists() and live.exists() and elsewhere.exists() and all(p.exists() for p in keep)


def test_records_that_cannot_be_trusted_say_what_to_rerun(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text('{"format": 2, "languages": {"de"')
    with pytest.raises(UserError, match=r"manifest.json: unreadable or truncated \(JSONDecodeError.*rerun `mergedistill data`"):
        read_json_record(p, "mergedistill data")
    p.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_json_record(p, "mergedistill data")
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match="UnicodeDecodeError"):
        read_json_record(p, "mergedistill data")


def test_cli_turns_a_write_failure_anywhere_into_exit_2(tmp_path, monkeypatch, capsys):
    """A library writing outside fsutil (e.g. a logger) hits a full disk: exit 2, no traceback."""
    from mergedistill import cli

    def stage(cfg, **flags):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/r/train/logs/metrics.csv")

    monkeypatch.setattr(cli, "load_config", lambda *a, **k: None)
    monkeypatch.setattr(cli, "stage_function", lambda name: stage)
    assert cli.main(["evaluate", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergedistill evaluate: error: cannot write runs/r/train/logs/metrics.csv: No space left on device")
    assert "Traceback" not in err

    def other(cfg, **flags):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cli, "stage_function", lambda name: other)
    assert cli.main(["evaluate", "--config", "c.yaml"]) == 1  # not the user's environment: an internal failure


def test_ctrl_c_while_reading_the_command_line_exits_130(tmp_path):
    # SIGINT as a terminal delivers it: a background job (nohup, `&`) starts with it ignored, so the handler is set
    # here; it runs at the interpreter's next check, which the sleep gives it even on a loaded machine
    code = ("import signal, os, time, mergedistill.cli as c\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "c.build_parser = lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(30))\n"
            "c.entry()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr
