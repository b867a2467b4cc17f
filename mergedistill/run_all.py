"""`mergedistill run`: every stage in order (vocab, data, train, the MLM-only baseline, evaluate);
each one skips when its outputs are complete for the same inputs, so a rerun resumes where it stopped."""
from __future__ import annotations

import argparse
import importlib
import logging
import time

from mergedistill.config import RunConfig

log = logging.getLogger(__name__)


def run_all(cfg: RunConfig, args) -> None:
    from mergedistill.cli import STAGES

    # train: continue an interrupted run with the same settings; start over when they changed
    steps = [("vocab", {}), ("data", {}), ("train", {"resume": True, "restart_changed": True})]
    if cfg.eval.baseline:
        steps.append(("train", {"resume": True, "restart_changed": True, "baseline": True}))
    steps.append(("evaluate", {}))
    times = []
    for stage, extra in steps:
        target = STAGES[stage][1]
        label = stage + (" --baseline" if extra.get("baseline") else "")
        if target is None:
            log.info("run: `%s` is not available in this version; stopping before it", label)
            break
        module, func = target.split(":")
        stage_args = argparse.Namespace(force=False, verbose=getattr(args, "verbose", False), resume=False, baseline=False, **{})
        for k, v in extra.items():
            setattr(stage_args, k, v)
        start = time.monotonic()
        log.info("run: %s", label)
        getattr(importlib.import_module(module), func)(cfg, stage_args)
        times.append((label, time.monotonic() - start))
    log.info("run: done; %s", ", ".join(f"{s} {t:.0f} s" for s, t in times))
