"""Run independent tasks in forked worker processes (both cores of a small machine, or more).

Fork lets workers see the parent's large in-memory objects (vocabularies, parsed tokenizers) without
pickling them; only the task index goes in and a small result comes out. Callers keep the parent
free of threads that do not survive a fork (e.g. the tokenizers thread pool) until they are done."""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

_TASKS: Sequence[Callable[[], Any]] = ()


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
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(_run, range(len(tasks))))
    finally:
        _TASKS = ()
