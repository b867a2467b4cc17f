"""Run independent tasks in forked worker processes (both cores of a small machine, or more).

Fork lets workers see the parent's large in-memory objects (vocabularies, parsed tokenizers) without
pickling them; only the task index goes in and a small result comes out. Callers keep the parent
free of threads that do not survive a fork (e.g. the tokenizers thread pool) until they are done.
Workers die with their parent, however it dies (`kill -9` included): none is left running on its own."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

_TASKS: Sequence[Callable[[], Any]] = ()
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Make this worker process die when `parent` does: the kernel sends it SIGKILL on Linux
    (prctl PR_SET_PDEATHSIG; the pool forks from the thread that calls it, which lives as long as the
    parent needs its workers); elsewhere a thread watches the parent's pid."""
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _run(i: int) -> Any:
    return _TASKS[i]()


def run_tasks(tasks: Sequence[Callable[[], Any]], workers: int | None = None) -> list[Any]:
    """Results of calling each task, in order. Serial when one worker suffices or fork is missing."""
    global _TASKS
    workers = min(len(tasks), workers or os.cpu_count() or 1)
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        return [t() for t in tasks]
    _TASKS = tasks
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            return list(pool.map(_run, range(len(tasks))))
    finally:
        _TASKS = ()
