"""Checks of a run's settings against its teachers' model configs (read with AutoConfig: no weights),
made before a stage starts, and by `mergedistill run` for all of its stages before the first: what
would otherwise fail only after earlier stages did their work, or after a new run set an old student
aside. Every problem is collected and raised at once (UserError, exit 2).

  data   every routed teacher accepts data.seq_len tokens (its position table) and has at least
         data.top_k ids (vocab_size); a large data.top_k whose shards would not fit in this machine's
         memory (estimated from the first data.shard_lines lines of each routed train corpus)
  train  `student.init: teacher:<name>` names a teacher
         with BERT-layout layers of the student's shapes; with embeddings_from_teachers, a warning for
         each teacher whose embedding width differs from student.hidden (its rows are not copied); with
         train.relation_weight, every routed teacher has train.relation_teacher_layer and an attention
         width train.relation_heads divides
  extend (extend/stage.py's own preflight) the new language's teacher, with `seq_len_problems` and
         `top_k_problems`: its shards are built with the run's data settings
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

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

MEMORY_CHECK_K = 256
"""From this data.top_k up, the shards' memory is estimated against the machine's (reading the corpora's
first lines); below it the estimate is skipped: at k = 256 a default shard of 20,000 lines of 50 words
needs ~0.3 GB, and the default k = 8 a thirty-second of that."""
BYTES_PER_TOPK = 8
"""What the data stage holds per stored prediction while it builds a shard: the student id (int32) and the
logit (float32) of every labelled position of the shard, until it is written (a lower bound: the teacher
pass's int64 ids come on top for one masked copy)."""


def usable_positions_of(config) -> int | None:
    """The longest input (specials included) a teacher with this model config accepts, or None when its
    config has no position table."""
    from mergedistill.models.mlm import usable_positions

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
    routed = list(dict.fromkeys(cfg.teacher_of(lang) for lang in cfg.languages))
    if "data" in checks:
        problems += seq_len_problems(cfg, configs, routed)
        top_k = top_k_problems(cfg, configs, routed)
        problems += top_k
        if not top_k and cfg.data.top_k >= MEMORY_CHECK_K:
            problems += _shard_memory_problems(cfg)
    if "train" in checks:
        problems += _student_problems(cfg, configs)
        problems += _relation_problems(cfg, configs, routed)
    if problems:
        raise UserError(problems, header=f"{stage}: {len(problems)} problem(s) found before starting; nothing was run:")


def seq_len_problems(cfg: RunConfig, configs: dict, names: list[str]) -> list[str]:
    """data.seq_len against the position table of each teacher in `names` (that labels data)."""
    seq_len, out = cfg.data.seq_len, []
    for name in names:
        n = usable_positions_of(configs[name]) if name in configs else None
        if n is not None and n < seq_len:
            out.append(f"data.seq_len: {seq_len} tokens per sequence, but teacher {name} accepts at most {n} "
                       f"(max_position_embeddings {configs[name].max_position_embeddings}); set data.seq_len to {n} or less")
    return out


def top_k_problems(cfg: RunConfig, configs: dict, names: list[str]) -> list[str]:
    """data.top_k against the vocabulary of each teacher in `names`: its predictions are ranked among its own ids."""
    k, out = cfg.data.top_k, []
    for name in names:
        v = getattr(configs.get(name), "vocab_size", None)
        if isinstance(v, int) and k > v:
            out.append(f"data.top_k: {k:,} predictions per labelled position, but teacher {name} has {v:,} ids (vocab_size); "
                       f"set data.top_k to at most {v:,} (a few dozen keep most of the teacher's mass: the default is 8, and "
                       "train.kd_target: exact adds the rest as one outcome)")
    return out


def physical_memory() -> int | None:
    """Bytes of RAM this machine has (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _shard_memory_problems(cfg: RunConfig) -> list[str]:
    """A large data.top_k against the memory a shard needs while it is built: BYTES_PER_TOPK x k for every
    labelled position of the shard, at least one position per word of its lines x the labelled share x
    dupe_factor, every data.workers process building one. Estimated on the first shard of each routed train
    corpus that is a plain file (a `datasets:` spec is not read here)."""
    from mergedistill.corpus import iter_lines

    d, memory = cfg.data, physical_memory()
    if not memory:
        return []
    share = d.mask_prob + d.unmasked_kd_prob * (1 - d.mask_prob)
    worst = None
    for lang, lc in cfg.languages.items():
        if not Path(lc.train).is_file():
            continue
        cap = min(n for n in (d.shard_lines, cfg.max_lines_of(lang)) if n is not None)
        words = sum(len(t.split()) for t in iter_lines(lc.train, f"languages.{lang}.train", cap))
        positions = int(words * share * d.dupe_factor)
        need = positions * d.top_k * BYTES_PER_TOPK * d.workers
        if worst is None or need > worst[0]:
            worst = (need, lang, cap, positions)
    if worst is None or worst[0] <= memory:
        return []
    need, lang, cap, positions = worst
    workers = f", x {d.workers} workers (data.workers)" if d.workers > 1 else ""
    return [f"data.top_k: {d.top_k:,} predictions per labelled position need more memory than this machine has: a shard of "
            f"{cap:,} lines of languages.{lang}.train (data.shard_lines) holds about {positions:,} labelled positions (one per "
            f"word at least), {need / 1e9:,.1f} GB while the data stage builds it ({BYTES_PER_TOPK} bytes x {d.top_k:,} each"
            f"{workers}), against {memory / 1e9:,.1f} GB of RAM; lower data.top_k (the default is 8) or data.shard_lines"]


def _relation_problems(cfg: RunConfig, configs: dict, routed: list[str]) -> list[str]:
    """train.relation_* against every routed teacher (relation distillation reads each one's attention)."""
    tr, out = cfg.train, []
    if tr.relation_weight <= 0:
        return out
    for name in routed:
        c = configs.get(name)
        n = getattr(c, "num_hidden_layers", None)
        if isinstance(n, int) and not -n <= tr.relation_teacher_layer < n:
            out.append(f"train.relation_teacher_layer: {tr.relation_teacher_layer} is not a layer of teacher {name} "
                       f"({n} layers); allowed -{n} to {n - 1} (-1: the last)")
        width = getattr(c, "hidden_size", None)
        if isinstance(width, int) and width % tr.relation_heads:
            out.append(f"train.relation_heads: {tr.relation_heads} does not divide teacher {name}'s attention width "
                       f"{width} (hidden_size); choose a divisor of every routed teacher's and of student.hidden")
    return out


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
