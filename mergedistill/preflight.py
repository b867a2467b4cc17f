"""Checks of a run's settings against its teachers' model configs (read with AutoConfig: no weights),
made before a stage starts, and by `mergedistill run` for all of its stages before the first: what
would otherwise fail only after earlier stages did their work, or after a new run set an old student
aside. Every problem is collected and raised at once (UserError, exit 2).

  data   every routed teacher accepts data.seq_len tokens (its position table)
  train  `student.init: teacher:<name>` names a teacher
         with BERT-layout layers of the student's shapes; with embeddings_from_teachers, a warning for
         each teacher whose embedding width differs from student.hidden (its rows are not copied)
"""
from __future__ import annotations

import logging

from mergedistill.config import RunConfig
from mergedistill.errors import UserError

log = logging.getLogger(__name__)

STAGE_CHECKS: dict[str, tuple[str, ...]] = {
    "data": ("data",), "train": ("data", "train"), "ablate": ("data", "train"), "run": ("data", "train"),
}
"""What each command checks: `train` needs the data settings too (its shards come from them)."""

BERT_LAYOUT = ("bert", "roberta", "xlm-roberta", "camembert")
"""Model types whose encoder layers load into a BERT student layer (student.init: teacher:<name>)."""

_SHAPES = (("hidden_size", "hidden"), ("num_attention_heads", "heads"), ("intermediate_size", "intermediate"))


def usable_positions_of(config) -> int | None:
    """The longest input (specials included) a teacher with this model config accepts, or None when its
    config has no position table."""
    from mergedistill.mlm_models import usable_positions

    if not isinstance(getattr(config, "max_position_embeddings", None), int):
        return None
    return usable_positions(config)


def preflight(cfg: RunConfig, stage: str) -> None:
    """Run the checks `stage` needs (STAGE_CHECKS); raise every problem together."""
    from mergedistill.teachers import load_teacher_config

    checks = STAGE_CHECKS.get(stage, ())
    if not checks:
        return
    problems: list[str] = []
    configs = {}
    for name, tc in cfg.teachers.items():
        try:
            configs[name] = load_teacher_config(name, tc)
        except UserError as e:
            problems += e.problems
    seq_len = cfg.data.seq_len
    if "data" in checks:
        for name in dict.fromkeys(cfg.teacher_of(lang) for lang in cfg.languages):
            n = usable_positions_of(configs[name]) if name in configs else None
            if n is not None and n < seq_len:
                problems.append(f"data.seq_len: {seq_len} tokens per sequence, but teacher {name} accepts at most {n} "
                                f"(max_position_embeddings {configs[name].max_position_embeddings}); set data.seq_len to {n} or less")
    if "train" in checks:
        problems += _student_problems(cfg, configs)
    if problems:
        raise UserError(problems, header=f"{stage}: {len(problems)} problem(s) found before starting; nothing was run:")


def _student_problems(cfg: RunConfig, configs: dict) -> list[str]:
    s = cfg.student
    problems = []
    if s.init.startswith("teacher:") and s.init[8:] in configs:
        name = s.init[8:]
        tc = configs[name]
        kind = getattr(tc, "model_type", "?")
        if kind not in BERT_LAYOUT:
            problems.append(f"student.init: teacher:{name} is a {kind} model, whose layers do not load into the BERT student "
                            f"(teachers of type {', '.join(BERT_LAYOUT)} do); init from one of those, or `random`")
        else:
            wrong = [(attr, field, getattr(tc, attr, None)) for attr, field in _SHAPES if getattr(tc, attr, None) != getattr(s, field)]
            if wrong:
                problems.append(f"student.init: teacher:{name} has " + ", ".join(f"{a}={v}" for a, _, v in wrong)
                                + ", the student " + ", ".join(f"{f} {getattr(s, f)}" for _, f, _ in wrong) + "; set "
                                + ", ".join(f"student.{f}: {v}" for _, f, v in wrong) + " to copy its layers, or `init: random`")
    if s.embeddings_from_teachers:
        widths = {n: getattr(c, "embedding_size", None) or getattr(c, "hidden_size", None) for n, c in configs.items()}
        other = {n: w for n, w in widths.items() if w != s.hidden}
        if other:
            log.warning("student.embeddings_from_teachers: %s embedding rows are %s wide, the student's %d: not copied%s",
                        ", ".join(other), "/".join(str(w) for w in dict.fromkeys(other.values())), s.hidden,
                        " (no teacher's are: every row starts random)" if len(other) == len(widths) else "")
    return problems
