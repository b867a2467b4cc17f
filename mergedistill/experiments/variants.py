"""Variants of a run, shared by `ablate` (routings), `ablate --archs` (dense vs X-Mod) and `sweep` (recipes).

A variant is the run's config with some settings changed (the config given is never changed: callers
pass a deep copy). Unless it is the run itself, it lives in runs/<run>-<name>/ and, when nothing it
changes goes into the vocabulary, reads the run's vocabulary (vocab_run); the data stage's shard store
(data/stage.py) then hands it every shard whose inputs did not change, so it labels only what its
changes touch. Training continues a variant's checkpoint trained with the same settings and starts
over when they changed, so a rerun after a kill resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path

from mergedistill.config import RunConfig


def as_variant(v: RunConfig, cfg: RunConfig, name: str, share_vocab: bool = True) -> RunConfig:
    """Make `v` (a changed copy of `cfg`) the variant `name`: runs/<run>-<name>/, on the run's vocabulary
    when `share_vocab`, else on a vocabulary of its own (vocab/<run>-<name>/). Returns `v`."""
    v.run = f"{cfg.run}-{name}"
    v.vocab_run = (cfg.vocab_run or cfg.run) if share_vocab else None
    return v


def train_variant(v: RunConfig) -> Path:
    """The variant's shards (complete ones and the store's are kept) and its student (continued when
    trained with these settings, else retrained); returns the exported student's folder."""
    from mergedistill.data.stage import run_data
    from mergedistill.train.stage import run_train

    run_data(v)
    return run_train(v, restart_if_changed=True)
