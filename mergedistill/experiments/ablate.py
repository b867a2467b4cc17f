"""`mergedistill ablate`: teacher-selection variants end to end, one comparison table and plot.

Every variant is the run's config with another routing. The variants share the run's vocabulary
(built with vocab.prune_candidates when pruning, so it serves every routing among the candidates);
each variant runs data and train in runs/<run>-<variant>/, and the data stage's shard store hands a
variant every shard whose inputs did not change: a language that keeps its teacher keeps its shards.
The variant with the configured routing is the run itself (its data and student are reused) unless
`ablate.train_steps` differs from `train.max_steps`: then it trains its own student, on the run's shards.
Students are compared by pseudo-perplexity per word (per character for eval.char_languages) on each
language's test split, read through the variant's tokenizer for that language: comparable across
routings, unlike per-token accuracy. Output: runs/<run>/ablate/{report.md, results.csv, ablate.png}.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path

import yaml

from mergedistill.config import RunConfig
from mergedistill.corpus import sample_lines
from mergedistill.errors import UserError
from mergedistill.experiments.variants import as_variant, train_variant
from mergedistill.fsutil import write_text_atomic
from mergedistill.lock import exclusive
from mergedistill.tables import dict_rows, markdown_table, write_csv

log = logging.getLogger(__name__)


def variants_of(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """Variant name -> full routing (language -> teacher)."""
    configured = {lang: cfg.teacher_of(lang) for lang in cfg.languages}
    if cfg.ablate.variants:
        out = {}
        for name, routing in cfg.ablate.variants.items():
            full = dict(configured)
            if "*" in routing:
                full = {lang: routing["*"] for lang in cfg.languages}
            full.update({k: v for k, v in routing.items() if k != "*"})
            out[name] = full
        return out
    out = {"configured": configured}
    for t in cfg.teachers:
        if all(t == cfg.teacher_of(lang) or t in lc.candidates for lang, lc in cfg.languages.items()):
            out[f"all-{t}"] = {lang: t for lang in cfg.languages}
    selected = cfg.run_dir / "select" / "routing.yaml"
    if selected.is_file():
        out["selected"] = {**configured, **yaml.safe_load(selected.read_text())["routing"]}
    return out


def _check(cfg: RunConfig, variants: dict[str, dict[str, str]]) -> None:
    problems = [f"languages.{lang}: ablate scores students on the test split (or valid); add one"
                for lang, lc in cfg.languages.items() if not (lc.test or lc.valid)]
    for name, routing in variants.items():
        for lang, t in routing.items():
            if lang not in cfg.languages:
                problems.append(f"ablate.variants.{name}: {lang!r} is not under languages")
            elif t not in cfg.teachers:
                problems.append(f"ablate.variants.{name}.{lang}: {t!r} is not a teacher")
            elif cfg.vocab.prune and t != cfg.teacher_of(lang) and t not in cfg.languages[lang].candidates:
                problems.append(f"ablate.variants.{name}.{lang}: {t!r} is neither the configured teacher nor a candidate; "
                                "with vocab.prune the shared vocabulary only covers those (add it to the candidates)")
    if problems:
        raise UserError(problems, header=f"ablate: {len(problems)} problem(s); nothing was run:")


def variant_config(cfg: RunConfig, name: str, routing: dict[str, str]) -> RunConfig:
    """The run's config with `routing`. A variant is the run itself only when nothing differs: with
    another routing or `ablate.train_steps` it gets runs/<run>-<name>/ (and the run's vocabulary), so
    the run's own student is never retrained or resumed at another length, and every variant trains
    for the same number of steps."""
    v = copy.deepcopy(cfg)
    configured = {lang: cfg.teacher_of(lang) for lang in cfg.languages}
    if cfg.ablate.train_steps:
        v.train.max_steps = cfg.ablate.train_steps
    if routing != configured or v.train.max_steps != cfg.train.max_steps:
        as_variant(v, cfg, name)
    for lang, t in routing.items():
        v.languages[lang].teacher = t
    return v


def student_ppl(cfg: RunConfig, export: Path) -> dict[str, dict]:
    """Pseudo-perplexity per word/char of an exported student on each language's test split, and its
    parameters: total, and active for the language (an X-Mod student: shared + the language's module)."""
    from mergedistill.eval.metrics import score_pll
    from mergedistill.eval.models import Export, autocast, eval_device
    from mergedistill.models.xmod import active_parameters, with_language

    problems: list[str] = []
    student = Export.open("student", export, problems, cfg.command("train"), eval_device(cfg))
    if student is None:
        raise UserError(problems)
    out = {}
    params = active_parameters(student.model(), list(cfg.languages))
    for lang, lc in cfg.languages.items():
        spec = lc.test or lc.valid
        texts = sample_lines(spec, f"languages.{lang}.test", cfg.eval.pll_lines, cfg.eval.seed)
        unit = "char" if lang in cfg.eval.char_languages else "word"
        with autocast(cfg):
            score = score_pll(with_language(student.model(), lang), student.tokenizer(lang), texts, unit)  # X-Mod: its module
        out[lang] = {"ppl": score["ppl"], "unit": unit, "lines": score["lines"], "units": score["units"],
                     "params_total": params["total"], "params_active": params["active"][lang]}
    return out


@exclusive("ablate", lambda cfg, archs=False: cfg.run_dir / ("archs" if archs else "ablate"))
def run_ablate(cfg: RunConfig, *, archs: bool = False) -> Path:
    """Every routing variant end to end (vocabulary shared, data, train, scores); `cfg` is not changed.
    archs: the dense vs X-Mod comparison instead (experiments/archs.py)."""
    if archs:
        from mergedistill.experiments.archs import run_archs

        return run_archs(cfg)
    from mergedistill.vocab.stage import run_vocab

    start = time.monotonic()
    variants = variants_of(cfg)
    _check(cfg, variants)
    if cfg.vocab.prune and not cfg.vocab.prune_candidates:
        log.info("ablate: pruning with the candidates too (vocab.prune_candidates), so one vocabulary serves every variant")
        cfg = replace(cfg, vocab=replace(cfg.vocab, prune_candidates=True))
    run_vocab(cfg)
    rows, times = [], {}
    done: dict[tuple, str] = {}  # routing -> the variant that already ran it
    for name, routing in variants.items():
        key = tuple(sorted(routing.items()))
        if key in done:  # e.g. `selected` when selection kept the configured routing: same student
            log.info("ablate: variant %s has the routing of %s; reusing its student and scores", name, done[key])
            rows += [{**r, "variant": name} for r in rows if r["variant"] == done[key]]
            times[name] = 0.0
            continue
        done[key] = name
        v = variant_config(cfg, name, routing)
        t0 = time.monotonic()
        log.info("ablate: variant %s (%s) in runs/%s", name, ", ".join(f"{k}: {t}" for k, t in routing.items()), v.run)
        export = train_variant(v)
        for lang, r in student_ppl(v, export).items():
            rows.append({"variant": name, "language": lang, "teacher": routing[lang], **r})
        times[name] = time.monotonic() - t0
    out = cfg.run_dir / "ablate"
    out.mkdir(parents=True, exist_ok=True)
    _write(out, cfg, variants, rows, times)
    log.info("ablate: %d variants in %.0f s; table at %s", len(variants), time.monotonic() - start, out / "report.md")
    return out


def _write(out: Path, cfg: RunConfig, variants: dict, rows: list[dict], times: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    header = ["variant", "language", "teacher", "ppl", "unit", "lines", "units", "params_total", "params_active"]
    write_csv(out / "results.csv", header, dict_rows(rows, header))
    langs = list(cfg.languages)
    names = list(variants)
    cell = {(r["variant"], r["language"]): r for r in rows}
    md = ["# Teacher-selection ablation", "",
          "Student pseudo-perplexity per word (per character for languages written without spaces) on each language's "
          "test split, through the variant's tokenizer for that language; lower is better. In brackets: the teacher "
          "the language was distilled from.", ""]
    geo = {n: float(np.exp(np.mean([np.log(cell[(n, lang)]["ppl"]) for lang in langs]))) for n in names}
    body = [[lang] + [f"{cell[(n, lang)]['ppl']:.2f} ({cell[(n, lang)]['teacher']})" for n in names] for lang in langs]
    body.append(["geometric mean"] + [f"**{geo[n]:.2f}**" for n in names])
    body.append(["parameters: total / active per language"] + [_params_cell([cell[(n, lang)] for lang in langs]) for n in names])
    md.append(markdown_table(["language"] + names, body))
    md += ["", "Wall time per variant (data, training, scoring; reused artifacts cost nothing): "
           + ", ".join(f"{n} {times[n]:.0f} s" for n in names), "", "![ablation](ablate.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(langs), 3.6))
    width = 0.8 / len(names)
    x = np.arange(len(langs))
    for i, n in enumerate(names):
        ax.bar(x + i * width, [cell[(n, lang)]["ppl"] for lang in langs], width, label=n)
    ax.set_xticks(x + width * (len(names) - 1) / 2, langs)
    ax.set_yscale("log")
    ax.set_ylabel("student pseudo-perplexity (per word / char)")
    ax.set_title("Teacher-selection variants (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ablate.png", dpi=110)
    plt.close(fig)


def _params_cell(cells: list[dict]) -> str:
    total = cells[0]["params_total"]
    active = sorted({c["params_active"] for c in cells})
    return f"{total:,} / " + (f"{active[0]:,}" if len(active) == 1 else f"{active[0]:,}-{active[-1]:,}")
