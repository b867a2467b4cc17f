"""One process per stage and output folder: a second `mergedistill <stage>` on the same run exits 2
naming the first one's pid, instead of both doing all the work.

The lock is `fcntl.flock` on a small file beside the stage's output folder (`runs/<run>/.lock-data`,
`vocab/.lock-<run>`): the kernel releases it when its holder dies, however it dies, so a lock left by a
killed run never blocks the next one. Holding it, a stage also removes the temporaries that killed runs
left in its folder (`fsutil.remove_leftovers`).

Processes that share a stage by design take no lock: the launcher ranks of the data stage (torchrun,
SLURM) and the worker processes of a DDP training (LOCAL_RANK > 0), which rerun the user's command.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

from mergedistill.errors import UserError
from mergedistill.fsutil import cannot_write, make_dirs, remove_leftovers

log = logging.getLogger(__name__)
_HELD: dict[str, int] = {}  # lock files this process holds -> depth (a stage may call itself on the same folder)


def _shares_work() -> bool:
    """True in one of several processes that run the same stage together by design."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0


def lock_file(output: Path) -> Path:
    """The lock of the stage that writes `output`: a hidden file beside it (never inside: a folder that is
    replaced whole would take the lock with it)."""
    return output.parent / f".lock-{output.name}"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def stage_lock(stage: str, output: Path, where: str | Path) -> Iterator[None]:
    """Hold the lock of `stage` (e.g. "data") writing `output` for the block; raise UserError naming the
    holder when another process has it. `where` names the run in the message (runs/<run>)."""
    if _shares_work():
        yield
        return
    path = lock_file(output)
    key = os.path.abspath(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    make_dirs(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise cannot_write(path.parent, e) from None  # the folder the stage writes to, not its lock file
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another mergedistill {stage} is running on {where} (pid {_holder(path)}); wait for it to "
                            f"finish or stop it, then rerun (a killed run's lock is released with it)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the lock (forked workers that inherited it are gone by now)


def exclusive(stage: str, output: Callable[..., Path]):
    """Decorator of a stage function `run_x(cfg, **flags)`: while it runs, it holds the lock of its output
    folder `output(cfg, **flags)` and first clears the temporaries killed runs left there. The run named
    in messages is the output's parent (runs/<run>), or the output itself for the vocabulary."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg, **flags):
            out = Path(output(cfg, **flags))
            label = f"{stage} --baseline" if flags.get("baseline") else stage
            where = out.parent if out.parent == cfg.run_dir else out
            with stage_lock(label, out, where):
                if not _shares_work():
                    remove_leftovers(out, log)
                return fn(cfg, **flags)
        return run
    return wrap
