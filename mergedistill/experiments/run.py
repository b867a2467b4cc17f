"""`mergedistill run`: every stage in order (vocab, data, train, the MLM-only baseline, evaluate);
each one skips when its outputs are complete for the same inputs, so a rerun resumes where it stopped."""
from __future__ import annotations

import logging
import time

from mergedistill.config import RunConfig

log = logging.getLogger(__name__)


def run_all(cfg: RunConfig, *, force: bool = False) -> None:
    """Run the pipeline on `cfg` (which no stage changes). Training continues an interrupted run with the
    same settings and starts over when they changed; `force` redoes every stage."""
    from mergedistill.data.stage import run_data
    from mergedistill.eval.stage import run_evaluate
    from mergedistill.preflight import preflight
    from mergedistill.train.stage import run_train
    from mergedistill.vocab.stage import run_vocab

    preflight(cfg, "run")  # what the data and train stages would refuse: said before the vocabulary is built
    steps = [
        ("vocab", lambda: run_vocab(cfg, force=force)),
        ("data", lambda: run_data(cfg, force=force)),
        ("train", lambda: run_train(cfg, restart_if_changed=True, force=force)),
    ]
    if cfg.eval.baseline:
        steps.append(("train --baseline", lambda: run_train(cfg, baseline=True, restart_if_changed=True, force=force)))
    steps.append(("evaluate", lambda: run_evaluate(cfg, force=force)))
    times = []
    for label, stage in steps:
        start = time.monotonic()
        log.info("run: %s", label)
        stage()
        times.append((label, time.monotonic() - start))
    log.info("run: done; %s", ", ".join(f"{s} {t:.0f} s" for s, t in times))
