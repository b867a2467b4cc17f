"""`mergedistill evaluate`: the student against the teachers that know each language and against the
MLM-only baseline student, per language, on the held-out test splits.

  intrinsic    masked-token accuracy and masked cross-entropy, like for like (the student reads the routed
               teacher's tokenization mapped to student ids, with the same masked positions, and both
               predict among the same pieces), their student - teacher differences with paired bootstrap
               intervals over the test lines, top-1 agreement with the routed teacher,
               pseudo-log-likelihood per word (bits per char for eval.char_languages), and a unigram
               reference (token frequencies of the train split);
  retrieval    translations among aligned test paragraphs (JSON lines with a shared `key`), accuracy@1
               per language pair and direction, for every model covering both languages;
  downstream   fine-tuned classifiers / taggers per language (eval.downstream), with zero-shot transfer.

Output: runs/<run>/eval/{report.md, results.csv, plots/*.png, state.json} (built in a temporary folder
and renamed into place; tasks/ is carried over), and the results table in the exported student's
README.md ('## Evaluation'). A rerun with the same inputs skips; --force redoes it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mergedistill import __version__
from mergedistill.config import RunConfig
from mergedistill.configlib import to_dict
from mergedistill.corpus import (
    corpus_fingerprint,
    iter_lines,
    sample_lines,
    split_problems,
    spread_subset,
)
from mergedistill.data.masking import IGNORE_INDEX
from mergedistill.data.packing import tokenize_documents
from mergedistill.errors import UserError
from mergedistill.eval.downstream import fine_tune, read_examples, task_accuracy
from mergedistill.eval.metrics import (
    UnigramBaseline,
    bits_per_char,
    count_units,
    hit_rate,
    masked_eval_set,
    masked_scores,
    masked_top1,
    paired_bootstrap,
    per_unit_sums,
    pll_per_unit,
    pseudo_log_likelihoods,
    pseudo_perplexity,
    to_student_ids,
)
from mergedistill.eval.models import Export, Models, autocast, eval_device
from mergedistill.eval.report import (
    Row,
    Table,
    card_md,
    report_md,
    set_card_section,
    write_plots,
    write_results_csv,
)
from mergedistill.eval.retrieval import (
    MIN_SHARED,
    aligned_pairs,
    embed_texts,
    read_keyed,
    retrieval_accuracy,
)
from mergedistill.fsutil import (
    atomic_dir,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from mergedistill.lock import exclusive
from mergedistill.models.xmod import active_parameters, with_language
from mergedistill.teachers import model_fingerprint
from mergedistill.vocab.stage import load_vocab

log = logging.getLogger(__name__)

EVAL_FORMAT = 2
UNIGRAM_LINES = 5000
"""Train lines per language the unigram reference counts tokens on."""

DEFINITIONS = f"""\
- **masked acc** (`mlm_acc`): share of masked positions (eval.mask_prob of the tokens, fixed seed, every one
  replaced by the mask token, lines packed as in training) whose top-1 prediction is the original token.
  Like for like: student, baseline and routed teacher read the routed teacher's tokenization (the students
  mapped to student ids) with the same masked positions, and each predicts among the same pieces: the routed
  teacher among its tokens the student vocabulary keeps (specials excluded), the students among the ids that
  language's tokenizer can write (the same pieces, as the exported student is used per language). A gold token
  pruned from the student vocabulary is a miss for every model. A candidate teacher uses its own tokenizer and
  its whole vocabulary, so its per-token accuracy is not directly comparable.
- **masked CE** (`masked_ce`): mean -log p(original token) over the same masked positions, in nats (lower is
  better), each model's softmax renormalised over the same pieces as its accuracy. Positions whose gold token the
  student vocabulary pruned (or that is otherwise outside either set) are left out for every model (their count:
  `gold_pruned`, on the routed teacher), so no model scores an infinite loss.
- **difference vs the routed teacher** (`mlm_acc_diff`, `masked_ce_diff`, with `_lo` / `_hi`): the student's
  (and the baseline's) value minus the routed teacher's, with a paired percentile bootstrap 95% interval: each
  masked position is attributed to the test line it comes from, eval.bootstrap resamples of the lines (those
  holding a masked position; seed eval.seed) with replacement, both models scored on each resample; `n` is the
  lines. Verdict: **ahead** (accuracy: lo > 0; CE: hi < 0), **level** (the interval holds 0), **behind**.
- **agreement**: share of those positions where the model's top-1 equals the routed teacher's top-1 among
  the tokens the student vocabulary keeps (specials excluded), i.e. what distillation taught it.
- **PLL/word** (`pll_per_word`): pseudo-log-likelihood (each token masked in turn, log p of the true token,
  summed; Salazar et al., 2020) divided by the whitespace words scored, in nats (nearer 0 is better);
  comparable across tokenizers. Students: p over the ids the language's tokenizer can write (its unknown token
  included), as the exported student is used; teachers: over their whole vocabulary. **bits/char**
  (`bits_per_char`, for eval.char_languages): -PLL / (chars x ln 2), characters excluding whitespace (lower is better).
  **pseudo-ppl** (`pppl`): exp(-PLL / units).
  `tokens_scored`, `words_scored` / `chars_scored`: what the PLL covered.
- **unigram**: add-one-smoothed token frequencies of the routed teacher's tokenization of the train split
  (first {UNIGRAM_LINES:,} lines): it always predicts the most frequent token, its "PLL" is the sum of
  unigram log-probabilities. A model should beat it.
- **retrieval accuracy@1** (`retrieval_acc@1`, language `a->b`): for each aligned test paragraph of `a`,
  is its translation in `b` the most cosine-similar among the pair's paragraphs (mean-pooled last hidden
  layer, specials excluded, each side centred). Pairs: languages sharing >= {MIN_SHARED} paragraph keys,
  at most eval.retrieval_pairs paragraphs each.
- **downstream** (`<task>/acc`, `<task>/acc_from_<lang>`): accuracy of a copy of the encoder fine-tuned with a
  linear head on the language's training set (classify: mean-pooled text; tag: first token of each word;
  with eval.downstream.<task>.tune: head, a linear probe: the encoder frozen, only the head trained),
  tested on the same language, and for eval.downstream.<task>.zero_shot_from on every other language.
"""


def eval_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "eval"


def student_export_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "train" / "export"


def baseline_export_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "baseline" / "export"


# ---- preflight -----------------------------------------------------------------------------------
@dataclass
class Plan:
    student: Export
    baseline: Export | None
    vocab: object
    vrec: dict
    languages: list[str]


def preflight(cfg: RunConfig) -> Plan:
    """Check every input (exports, vocabulary, test corpora, task files); raise all problems at once."""
    problems: list[str] = []
    device = eval_device(cfg)
    train_cmd = cfg.command("train")
    student = Export.open("student", student_export_dir(cfg), problems, train_cmd, device)
    vocab = vrec = None
    try:
        vocab, vrec = load_vocab(cfg)
    except UserError as e:
        problems += e.problems
    baseline = None
    if cfg.eval.baseline:
        folder = baseline_export_dir(cfg)
        if (folder / "config.json").is_file():
            baseline = Export.open("baseline", folder, problems, train_cmd + " --baseline", device)
        else:
            log.warning("evaluate: no MLM-only baseline at %s (train it with `%s --baseline`, or set eval.baseline: false); "
                        "comparing without it", folder, train_cmd)
    for exp in (student, baseline):
        if exp is None:
            continue
        problems += exp.mismatch_problems(cfg, vrec)
        moved = [f"{lang} ({exp.languages[lang]}, config: tokenizers/{cfg.teacher_of(lang)})" for lang in cfg.languages
                 if lang in exp.languages and exp.languages[lang] != f"tokenizers/{cfg.teacher_of(lang)}"]
        if moved:
            problems.append(f"{exp.folder}: trained with another routing for {', '.join(moved)}; "
                            f"retrain (`{train_cmd} --force`) or restore the routing")
    problems += split_problems(cfg.languages, "test", "evaluate needs a held-out test corpus; add `test: <file>`")
    problems += _check_downstream(cfg)
    if problems:
        raise UserError(problems, header=f"evaluate: {len(problems)} problem(s); nothing was run:")
    return Plan(student, baseline, vocab, vrec, list(cfg.languages))  # type: ignore[arg-type]


def _check_downstream(cfg: RunConfig) -> list[str]:
    """Problems with eval.downstream (languages, files, settings)."""
    problems: list[str] = []
    for name, t in cfg.eval.downstream.items():
        where = f"eval.downstream.{name}"
        for split in ("train", "test"):
            for lang, spec in getattr(t, split).items():
                if lang not in cfg.languages:
                    problems.append(f"{where}.{split}.{lang}: not a language of this run (no tokenizer for it); "
                                    f"use one of {', '.join(cfg.languages)}")
                elif not spec.startswith("datasets:") and not Path(spec).is_file():
                    problems.append(f"{where}.{split}.{lang}: no file {spec!r}")
        for lang in t.zero_shot_from:
            if lang not in t.train:
                problems.append(f"{where}.zero_shot_from: {lang!r} has no training data in {where}.train")
        if not t.train:
            problems.append(f"{where}.train: no language has training data")
        if t.epochs < 1 or t.max_train < 1 or t.max_test < 1 or t.lr <= 0:
            problems.append(f"{where}: epochs, max_train, max_test must be >= 1 and lr > 0")
    return problems


def inputs_fingerprint(cfg: RunConfig, plan: Plan) -> dict:
    """Everything the outputs depend on."""
    teachers = sorted({t for lang in plan.languages for t in cfg.teachers_of(lang)})
    files = {}
    for name, t in cfg.eval.downstream.items():
        for split in ("train", "test"):
            for lang, spec in getattr(t, split).items():
                files[f"{name}.{split}.{lang}"] = corpus_fingerprint(spec)
    return {
        "format": EVAL_FORMAT,
        "student": plan.student.fingerprint(),
        "baseline": plan.baseline.fingerprint() if plan.baseline else None,
        "teachers": {n: model_fingerprint(n, cfg.teachers[n]) for n in teachers},
        "routing": {lang: cfg.teachers_of(lang) for lang in plan.languages},
        "test": {lang: corpus_fingerprint(cfg.languages[lang].test) for lang in plan.languages},  # type: ignore[arg-type]
        "train": {lang: corpus_fingerprint(cfg.languages[lang].train) for lang in plan.languages},
        "eval": to_dict(cfg.eval),
        "seq_len": cfg.data.seq_len,
        "tasks": files,
    }


# ---- intrinsic -----------------------------------------------------------------------------------
def _pll_rows(models: Models, key: str, lang: str, texts: list[str], unit: str, batch_size: int,
              allowed: torch.Tensor | None = None) -> tuple[list[Row], str]:
    """PLL rows of one model; `allowed` (V,) bool: the ids its softmax ranges over (None: all)."""
    model, tok = with_language(models.model(key), lang), models.tokenizer(key, lang)  # X-Mod: the language's module
    pll = sum(pseudo_log_likelihoods(model, tok, texts, max_len=models.max_len(key), batch_size=batch_size, allowed=allowed))
    return _pll_summary(models.role(key, lang), key, lang, pll, tok, texts, unit)


def _pll_summary(role: str, key: str, lang: str, pll: float, tok, texts: list[str], unit: str) -> tuple[list[Row], str]:
    docs, _ = tokenize_documents(tok, texts)
    tokens = sum(len(d) for d in docs)
    units = sum(count_units(t, unit) for t in texts)
    if units == 0:
        return [], "no text to score"
    r = lambda metric, value, n: Row("intrinsic", lang, key, role, metric, value, n)  # noqa: E731
    try:
        pppl = pseudo_perplexity(pll, units)
    except OverflowError:  # exp(> 709): a model that is hopeless on this language
        pppl = float("inf")
    if unit == "char":
        main = r("bits_per_char", bits_per_char(pll, units), units)
    else:
        main = r("pll_per_word", pll_per_unit(pll, units), units)
    rows = [main, r("pppl", pppl, units), r("tokens_scored", tokens, tokens), r(f"{unit}s_scored", units, units)]
    return rows, f"{main.metric} {main.value:.3f}, pseudo-ppl/{unit} {pppl:.4g} ({tokens:,} tokens, {units:,} {unit}s)"


def _among(ids: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """(M,) bool: which of `ids` (M,) are True in `ok` (V,) (False for -1 and for ids beyond it)."""
    inside = (ids >= 0) & (ids < ok.shape[0])
    return inside & ok[ids.clamp(0, ok.shape[0] - 1)]


def _mean(values: torch.Tensor) -> float:
    """Mean of a (M,) tensor as a float (nan when M = 0)."""
    return float(values.double().mean()) if values.numel() else float("nan")


def _vs_teacher_rows(lang: str, key: str, metric: str, mine: torch.Tensor, teacher: torch.Tensor, line: torch.Tensor,
                     n_lines: int, resamples: int, seed: int) -> list[Row]:
    """Rows `<metric>_diff`, `_diff_lo`, `_diff_hi`: the model's mean of its per-position values minus the routed
    teacher's on the same positions, with a paired bootstrap 95% interval over the test lines. mine, teacher: (M,)
    hits or nats; line: (M,) each position's line in [0, n_lines). n: the lines resampled (those with a position)."""
    counts = per_unit_sums(torch.ones(line.shape[0]), line, n_lines)
    diff, lo, hi = paired_bootstrap(per_unit_sums(mine.double(), line, n_lines), per_unit_sums(teacher.double(), line, n_lines),
                                    counts, resamples, seed)
    units = int((counts > 0).sum())
    return [Row("intrinsic", lang, key, key, f"{metric}_diff{suffix}", v, units)
            for suffix, v in (("", diff), ("_lo", lo), ("_hi", hi))]


def _allowed(model, idmap: np.ndarray, special_ids: list[int]) -> torch.Tensor:
    """(V,) bool over the teacher head's outputs: tokens the student vocabulary keeps, specials excluded."""
    n = model.get_output_embeddings().weight.shape[0]
    ok = torch.zeros(n, dtype=torch.bool)
    m = min(n, len(idmap))
    ok[:m] = torch.from_numpy(idmap[:m] >= 0)
    ok[[i for i in special_ids if 0 <= i < n]] = False
    return ok


def intrinsic(cfg: RunConfig, models: Models, plan: Plan, lang: str) -> list[Row]:
    e = cfg.eval
    spec = cfg.languages[lang].test
    texts = sample_lines(spec, f"languages.{lang}.test", None)  # type: ignore[arg-type]  # read once, subset twice
    acc_texts = spread_subset(texts, e.max_lines, e.seed)
    pll_texts = spread_subset(texts, e.pll_lines, e.seed)
    unit = "char" if lang in e.char_languages else "word"
    pll_batch = e.batch_size * 4  # PLL copies are single lines, a few times shorter than packed sequences
    routed = cfg.teacher_of(lang)
    rkey = f"teacher:{routed}"
    rmodel, rtok = models.teacher(routed)
    with_language(rmodel, lang)
    idmap = plan.vocab.idmaps[routed]
    students = [k for k in models.for_language(lang) if not k.startswith("teacher:")]  # student, baseline
    seq_len = min([models.max_len(rkey)] + [models.max_len(k) for k in students])
    rows: list[Row] = []

    # the routed teacher: its masked set is everybody's (student ids through the id map)
    t0 = time.monotonic()
    eset = masked_eval_set(rtok, acc_texts, seq_len, e.mask_prob, e.seed)
    sel = eset["labels"] != IGNORE_INDEX  # (N, L)
    gold = eset["labels"][sel]  # (M,) teacher ids
    line = eset["line"][sel]  # (M,) the test line (index in acc_texts) of each masked position
    s_gold = to_student_ids(idmap, gold, pruned=None)  # (M,) -1 where the student vocabulary pruned the piece
    # the teacher predicts among the pieces the student vocabulary keeps (specials excluded), the students among
    # the ids the language's tokenizer can write (as the exported student is used): the same pieces, so accuracy
    # and cross-entropy are like for like
    t_ok = _allowed(rmodel, idmap, rtok.all_special_ids)  # (V_teacher,)
    t_cols = t_ok.nonzero().squeeze(1)
    s_cols = torch.from_numpy(plan.vocab.producible_ids(routed)).long()
    s_ok = torch.zeros(plan.vocab.size, dtype=torch.bool)
    s_ok[s_cols] = True
    # (M,) masked cross-entropy is over these positions, for every model: the gold piece is among both sets
    scored = _among(gold, t_ok) & _among(s_gold, s_ok)
    t = masked_scores(rmodel, eset["input_ids"], eset["attention_mask"], sel, t_cols, gold.masked_fill(~scored, -1), e.batch_size)
    n, n_ce = int(gold.numel()), int(scored.sum())
    t_hits, t_nll = t.top == gold, -t.gold_logp[scored]
    t_acc, t_ce = hit_rate(t.top, gold), _mean(t_nll)
    rows += [Row("intrinsic", lang, rkey, "routed teacher", "mlm_acc", t_acc, n),
             Row("intrinsic", lang, rkey, "routed teacher", "masked_ce", t_ce, n_ce),
             Row("intrinsic", lang, rkey, "routed teacher", "gold_pruned", n - n_ce, n)]
    pll_rows, msg = _pll_rows(models, rkey, lang, pll_texts, unit, pll_batch)
    rows += pll_rows
    log.info("evaluate %s / %s (routed teacher): masked acc %.3f, masked CE %.3f nats (%s masked, %s of them with a gold piece "
             "the student vocabulary pruned, left out of CE), %s, %.1f s", lang, rkey, t_acc, t_ce, f"{n:,}", f"{n - n_ce:,}",
             msg, time.monotonic() - t0)

    s_in = to_student_ids(idmap, eset["input_ids"])
    s_teacher = to_student_ids(idmap, t.top, pruned=None)
    for key in students:
        t0 = time.monotonic()
        model = with_language(models.model(key), lang)  # X-Mod: this language's module
        s = masked_scores(model, s_in, eset["attention_mask"], sel, s_cols, s_gold, e.batch_size)
        nll = -s.gold_logp[scored]
        if not (bool(torch.isfinite(nll).all()) and bool(torch.isfinite(t_nll).all())):
            raise RuntimeError(f"{lang}: a scored gold piece without a log-probability")
        acc, agree, ce = hit_rate(s.top, s_gold), hit_rate(s.top, s_teacher), _mean(nll)
        rows += [Row("intrinsic", lang, key, key, "mlm_acc", acc, n), Row("intrinsic", lang, key, key, "agreement", agree, n),
                 Row("intrinsic", lang, key, key, "masked_ce", ce, n_ce)]
        vs = (_vs_teacher_rows(lang, key, "mlm_acc", s.top == s_gold, t_hits, line, len(acc_texts), e.bootstrap, e.seed)
              + _vs_teacher_rows(lang, key, "masked_ce", nll, t_nll, line[scored], len(acc_texts), e.bootstrap, e.seed))
        rows += vs
        params = active_parameters(model, [lang])
        rows += [Row("intrinsic", lang, key, key, "params_total", params["total"], 0),
                 Row("intrinsic", lang, key, key, "params_active", params["active"][lang], 0)]
        tok = models.tokenizer(key, lang)
        pll_allowed = s_ok.clone()
        if tok.unk_token_id is not None:
            pll_allowed[tok.unk_token_id] = True  # a test line may hold a piece the vocabulary lacks
        pll_rows, msg = _pll_rows(models, key, lang, pll_texts, unit, pll_batch, allowed=pll_allowed)
        rows += pll_rows
        d = {r.metric: r.value for r in vs}
        log.info("evaluate %s / %s: masked acc %.3f (%+.3f vs %s [%.3f, %.3f]), masked CE %.3f nats (%+.3f [%.3f, %.3f]), "
                 "agreement %.3f (%s masked), %s, %.1f s", lang, key, acc, d["mlm_acc_diff"], routed, d["mlm_acc_diff_lo"],
                 d["mlm_acc_diff_hi"], ce, d["masked_ce_diff"], d["masked_ce_diff_lo"], d["masked_ce_diff_hi"], agree,
                 f"{n:,}", msg, time.monotonic() - t0)

    for name in models.teachers_of(lang)[1:]:
        t0 = time.monotonic()
        key = f"teacher:{name}"
        cmodel, ctok = models.teacher(name)
        with_language(cmodel, lang)
        cset = masked_eval_set(ctok, acc_texts, models.max_len(key), e.mask_prob, e.seed)
        csel = cset["labels"] != IGNORE_INDEX
        top, _ = masked_top1(cmodel, cset["input_ids"], cset["attention_mask"], csel, e.batch_size)
        acc = hit_rate(top, cset["labels"][csel])
        rows.append(Row("intrinsic", lang, key, "candidate teacher", "mlm_acc", acc, int(csel.sum())))
        pll_rows, msg = _pll_rows(models, key, lang, pll_texts, unit, pll_batch)
        rows += pll_rows
        log.info("evaluate %s / %s (candidate): masked acc %.3f (%s masked, own tokenizer), %s, %.1f s", lang, key, acc,
                 f"{int(csel.sum()):,}", msg, time.monotonic() - t0)

    t0 = time.monotonic()
    train_lines = list(iter_lines(cfg.languages[lang].train, f"languages.{lang}.train", UNIGRAM_LINES))
    uni = UnigramBaseline.from_texts(rtok, train_lines)
    u_acc = uni.accuracy(eset)
    rows.append(Row("intrinsic", lang, "unigram", "unigram", "mlm_acc", u_acc.value, u_acc.count))
    u_rows, msg = _pll_summary("unigram", "unigram", lang, sum(uni.log_likelihoods(rtok, pll_texts)), rtok, pll_texts, unit)
    rows += [r for r in u_rows if r.metric not in ("tokens_scored", f"{unit}s_scored")]
    log.info("evaluate %s / unigram (%s train lines): masked acc %.3f, %s, %.1f s", lang, f"{len(train_lines):,}", u_acc.value, msg,
             time.monotonic() - t0)
    return rows


# ---- retrieval -----------------------------------------------------------------------------------
def retrieval(cfg: RunConfig, models: Models, languages: list[str]) -> list[Row]:
    e = cfg.eval
    keyed = {lang: read_keyed(cfg.languages[lang].test, f"languages.{lang}.test") for lang in languages}
    keyed = {lang: k for lang, k in keyed.items() if len(k) >= MIN_SHARED}
    pairs = aligned_pairs(keyed, e.retrieval_pairs, e.seed)
    if not pairs:
        log.info("evaluate: no language pairs share %d aligned test paragraphs (JSON lines with `key`); no retrieval", MIN_SHARED)
        return []
    keys_all = ["student"] + (["baseline"] if models.baseline is not None else [])
    keys_all += [f"teacher:{t}" for t in dict.fromkeys(t for lang in languages for t in models.teachers_of(lang))]
    rows: list[Row] = []
    for key in keys_all:
        mine = [(a, b) for a, b in pairs if models.knows(key, a) and models.knows(key, b)]
        if not mine:
            continue
        need: dict[str, set[str]] = {}
        for a, b in mine:
            need.setdefault(a, set()).update(pairs[(a, b)])
            need.setdefault(b, set()).update(pairs[(a, b)])
        emb: dict[str, dict[str, torch.Tensor]] = {}
        for lang, ks in need.items():
            t0 = time.monotonic()
            ks_sorted = sorted(ks)
            vecs = embed_texts(with_language(models.model(key), lang), models.tokenizer(key, lang), [keyed[lang][k] for k in ks_sorted],
                               models.max_len(key), e.batch_size)
            emb[lang] = dict(zip(ks_sorted, vecs))
            log.info("evaluate %s / %s: embedded %s aligned paragraphs, %.1f s", lang, key, f"{len(ks_sorted):,}",
                     time.monotonic() - t0)
        role = key if not key.startswith("teacher:") else "teacher"
        for a, b in mine:
            ks = pairs[(a, b)]
            va, vb = torch.stack([emb[a][k] for k in ks]), torch.stack([emb[b][k] for k in ks])
            rows.append(Row("retrieval", f"{a}->{b}", key, role, "retrieval_acc@1", retrieval_accuracy(va, vb), len(ks)))
            rows.append(Row("retrieval", f"{b}->{a}", key, role, "retrieval_acc@1", retrieval_accuracy(vb, va), len(ks)))
        log.info("evaluate retrieval / %s: %d pairs, mean accuracy@1 %.3f", key, len(mine),
                 sum(r.value for r in rows[-2 * len(mine):]) / (2 * len(mine)))
    return rows


# ---- downstream ----------------------------------------------------------------------------------
def downstream(cfg: RunConfig, models: Models, name: str) -> list[Row]:
    e, task = cfg.eval, cfg.eval.downstream[name]
    order = [lang for lang in cfg.languages]
    train = {lang: read_examples(task.train[lang], task, f"eval.downstream.{name}.train.{lang}", task.max_train)
             for lang in order if lang in task.train}
    test = {lang: read_examples(task.test[lang], task, f"eval.downstream.{name}.test.{lang}", task.max_test)
            for lang in order if lang in task.test}
    labels = sorted({lab for exs in train.values() for ex in exs for lab in (ex.label if task.kind == "tag" else [ex.label])})
    if len(labels) < 2:
        raise UserError(f"eval.downstream.{name}: the training data has {len(labels)} label(s); a task needs at least two")
    joiner = lambda lang: "" if lang in e.char_languages else " "  # noqa: E731
    rows: list[Row] = []
    for src, exs in train.items():
        if not exs:
            log.warning("evaluate: eval.downstream.%s.train.%s has no examples; skipped", name, src)
            continue
        for key in models.for_language(src):
            t0 = time.monotonic()
            tok = models.tokenizer(key, src)
            ft = fine_tune(with_language(models.model(key), src), tok, exs, labels, task.kind, task.epochs, task.lr, e.batch_size,
                           models.max_len(key), e.seed, joiner(src), tune=task.tune)
            done = []
            targets = [src] + ([t for t in test if t != src] if src in task.zero_shot_from else [])
            for tgt in targets:
                if tgt not in test or not test[tgt] or not models.knows(key, tgt):
                    continue
                if tgt != src and key == "student":  # once per language pair, not once per model
                    warn = label_mismatch(_labels_of(exs, task.kind), _labels_of(test[tgt], task.kind))
                    if warn:
                        log.warning("evaluate: eval.downstream.%s zero-shot %s -> %s: %s", name, src, tgt, warn)
                with_language(ft.encoder, tgt)  # X-Mod: fine-tuned with src's module, tested with tgt's (zero-shot)
                acc, n = task_accuracy(ft, models.tokenizer(key, tgt), test[tgt], labels, models.max_len(key), e.batch_size,
                                       joiner(tgt))
                metric = f"{name}/acc" if tgt == src else f"{name}/acc_from_{src}"
                rows.append(Row("downstream", tgt, key, models.role(key, tgt), metric, acc, n))
                done.append(f"{tgt} {acc:.3f}")
            log.info("evaluate %s / %s: %s %s on %s examples (%d epochs): %s, %.1f s", src, key, name,
                     "fine-tuned" if task.tune == "full" else "linear probe", f"{len(exs):,}", task.epochs,
                     "; ".join(done) or "no test set", time.monotonic() - t0)
            del ft
    return rows


def _labels_of(examples, kind: str) -> set[str]:
    return {lab for ex in examples for lab in (ex.label if kind == "tag" else [ex.label])}


def label_mismatch(source: set[str], target: set[str]) -> str | None:
    """Why a zero-shot accuracy from a language trained on `source` labels to a test set with `target`
    labels may mislead (None when both sets agree): the classifier can predict labels the target never
    has, and cannot predict labels it never saw."""
    extra, missing = sorted(source - target), sorted(target - source)
    parts = []
    if extra:
        parts.append(f"the source's labels {', '.join(extra)} never occur in the target's test set")
    if missing:
        parts.append(f"the target's labels {', '.join(missing)} were never trained on")
    if not parts:
        return None
    return "; ".join(parts) + " (the zero-shot accuracy counts such predictions as wrong: prefer languages with the same labels)"


# ---- the stage -------------------------------------------------------------------------------------
@exclusive("evaluate", lambda cfg, **_: eval_dir(cfg))
def run_evaluate(cfg: RunConfig, *, force: bool = False) -> Path:
    """Evaluate, write runs/<run>/eval/ and the model card's Evaluation section; returns the eval folder.
    A rerun with the same inputs skips; `force` redoes it."""
    start = time.monotonic()
    plan = preflight(cfg)
    out = eval_dir(cfg)
    inputs = inputs_fingerprint(cfg, plan)
    state = out / "state.json"
    if state.is_file() and (out / "report.md").is_file() and not force:
        try:
            same = read_json(state).get("inputs") == inputs
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            log.info("evaluate: %s is complete for these inputs; skipping (--force redoes it)", out)
            return out
    models = Models(cfg, plan.student, plan.baseline)
    log.info("evaluate: %d languages (%s); models: student%s, teachers %s", len(plan.languages), ", ".join(plan.languages),
             ", baseline" if plan.baseline else "",
             ", ".join(dict.fromkeys(t for lang in plan.languages for t in models.teachers_of(lang))))
    rows: list[Row] = []
    with autocast(cfg):
        for lang in plan.languages:
            rows += intrinsic(cfg, models, plan, lang)
        if cfg.eval.retrieval:
            rows += retrieval(cfg, models, plan.languages)
        for name in cfg.eval.downstream:
            rows += downstream(cfg, models, name)

    table = Table(rows)
    seconds = time.monotonic() - start
    with atomic_dir(out) as tmp:
        write_results_csv(rows, tmp / "results.csv")
        plots = write_plots(table, tmp / "plots")
        (tmp / "report.md").write_text(report_md(table, _header(cfg, plan, seconds, table), DEFINITIONS, plots), encoding="utf-8")
        write_json_atomic(tmp / "state.json", {"inputs": inputs, "rows": len(rows), "seconds": round(seconds, 1),
                                               "mergedistill": __version__})
    readme = plan.student.folder / "README.md"
    card = readme.read_text(encoding="utf-8") if readme.is_file() else f"# {cfg.run}\n"
    # the card travels with the student folder: it names the run's report, it does not link to it
    write_text_atomic(readme, set_card_section(card, card_md(table, f"runs/{cfg.run}/eval/report.md")))
    log.info("evaluate: %d results in %.0f s; report %s, model card %s", len(rows), time.monotonic() - start,
             out / "report.md", readme)
    return out


def _header(cfg: RunConfig, plan: Plan, seconds: float, table: Table | None = None) -> str:
    e = cfg.eval
    base = f"`{plan.baseline.folder}`" if plan.baseline else "none (no baseline export, or eval.baseline: false)"
    return "\n".join([
        f"# Evaluation: {cfg.run}",
        "",
        f"- student: `{plan.student.folder}` ({plan.student.weights_text()}); MLM-only baseline: {base}",
        f"- vocabulary `{plan.vrec['vocab']}`; languages and teachers: "
        + "; ".join(f"{lang} -> {', '.join(cfg.teachers_of(lang))}" for lang in plan.languages),
        f"- test lines per language (a seeded random sample spread over the split): {e.max_lines if e.max_lines is not None else 'all'} for masked accuracy "
        f"(mask rate {e.mask_prob}, seed {e.seed}; intervals from {e.bootstrap:,} bootstrap resamples of the lines), "
        f"{e.pll_lines} for PLL; "
        f"per-char languages: {', '.join(e.char_languages) or 'none'}",
        *([parameters_line(table, plan.languages)] if table is not None else []),
        f"- {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {seconds:.0f} s, mergedistill {__version__}",
    ])


def parameters_line(table: Table, languages: list[str]) -> str:
    """Total and per-language active parameters of the students (X-Mod: shared + that language's module)."""
    parts = []
    for key in ("student", "baseline"):
        total = next((r.value for r in table.rows if r.model == key and r.metric == "params_total"), None)
        if total is None:
            continue
        active = {lang: table.value("intrinsic", lang, key, "params_active") for lang in languages}
        same = len({v for v in active.values() if v is not None}) == 1 and next(iter(active.values())) == total
        parts.append(f"{key} {int(total):,}" + ("" if same else " (active per language: " + ", ".join(
            f"{lang} {int(v):,}" for lang, v in active.items() if v is not None) + ")"))
    return "- parameters: " + ("; ".join(parts) or "-")
