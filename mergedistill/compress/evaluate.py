"""Every variant evaluated per language exactly as `evaluate` evaluates the student: the same function
(`eval.stage.intrinsic`) on the same held-out test lines, masks and settings (`eval:`), with the variants
in place of student and baseline: masked-token accuracy, agreement with the routed teacher, PLL per word
(bits per char for eval.char_languages). The routed teacher and the unigram reference are scored alongside.

Results are cached per variant in runs/<run>/compress/eval/<variant>.json with what they depend on (the
variant folder's fingerprint, the eval settings, teachers and test corpora), so a rerun scores only new or
changed variants.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from mergedistill.config import RunConfig
from mergedistill.configlib import to_dict
from mergedistill.corpus import corpus_fingerprint
from mergedistill.eval.models import Export, Models, autocast
from mergedistill.eval.report import Row
from mergedistill.eval.stage import Plan, intrinsic
from mergedistill.fsutil import read_json_or_none, write_json_atomic
from mergedistill.teachers import model_fingerprint

log = logging.getLogger(__name__)

REFERENCE_FILE = "_reference.json"
"""The routed teachers' and the unigram reference's rows (no variant in them)."""


class VariantModels(Models):
    """evaluate's model pool with the variants as its students (keys: variant names, `student` for the
    uncompressed one) and only each language's routed teacher (the reference of agreement)."""

    def __init__(self, cfg: RunConfig, exports: dict[str, Export]):
        super().__init__(cfg, None, None)
        self.exports = exports

    def teachers_of(self, lang: str) -> list[str]:
        return [self.cfg.teacher_of(lang)]

    def for_language(self, lang: str) -> list[str]:
        return [k for k in self.exports if self.knows(k, lang)] + [f"teacher:{self.cfg.teacher_of(lang)}"]

    def _export(self, key: str) -> Export:
        return self.exports[key]


def eval_inputs(cfg: RunConfig, languages: list[str]) -> dict:
    """What a variant's scores depend on besides the variant: eval settings, routed teachers, corpora."""
    e = {k: v for k, v in to_dict(cfg.eval).items() if k not in ("retrieval", "retrieval_pairs", "downstream", "baseline", "device")}
    routed = sorted({cfg.teacher_of(lang) for lang in languages})
    return {"eval": e, "seq_len": cfg.data.seq_len, "teachers": {n: model_fingerprint(n, cfg.teachers[n]) for n in routed},
            "routing": {lang: cfg.teacher_of(lang) for lang in languages},
            "test": {lang: corpus_fingerprint(cfg.languages[lang].test) for lang in languages},  # type: ignore[arg-type]
            "train": {lang: corpus_fingerprint(cfg.languages[lang].train) for lang in languages}}


def _cached(path: Path, inputs: dict) -> list[Row] | None:
    rec = read_json_or_none(path, log)
    if rec is None or rec.get("inputs") != inputs:
        return None
    return [Row(**r) for r in rec["rows"]]


def _store(path: Path, inputs: dict, rows: list[Row]) -> None:
    write_json_atomic(path, {"inputs": inputs, "rows": [dataclasses.asdict(r) for r in rows]})


def evaluate_variants(cfg: RunConfig, plan: Plan, exports: dict[str, Export], folder: Path) -> list[Row]:
    """Intrinsic rows of every export (variant name -> Export) and of the references, per language;
    cached in `folder`. Variants whose cache matches are not loaded."""
    common = eval_inputs(cfg, plan.languages)
    inputs = {name: {**common, "model": exp.fingerprint()} for name, exp in exports.items()}
    rows: dict[str, list[Row]] = {}
    for name in exports:
        got = _cached(folder / f"{name}.json", inputs[name])
        if got is not None:
            rows[name] = got
    reference = _cached(folder / REFERENCE_FILE, common)
    pending = [name for name in exports if name not in rows]
    if reference is None and not pending:
        pending = list(exports)[:1]  # the references come with any variant's evaluation
    if pending:
        log.info("compress: evaluating %s per language (%s)", ", ".join(pending), ", ".join(plan.languages))
        models = VariantModels(cfg, {name: exports[name] for name in pending})
        new: list[Row] = []
        with autocast(cfg):
            for lang in plan.languages:
                new += intrinsic(cfg, models, plan, lang)
        reference = [r for r in new if r.model not in models.exports]
        _store(folder / REFERENCE_FILE, common, reference)
        for name in pending:
            rows[name] = [r for r in new if r.model == name]
            _store(folder / f"{name}.json", inputs[name], rows[name])
        for exp in models.exports.values():
            exp._model = None  # free the evaluation copies
    return [r for name in exports for r in rows[name]] + list(reference or [])
