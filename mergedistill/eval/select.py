"""`mergedistill select`: rank the candidate teachers of every language and write a routing file.

Each candidate (the language's routed teacher and its `candidates`) is scored on the language's valid
split by pseudo-perplexity per word (per character for `eval.char_languages`): the pseudo-log-
likelihood of every token with that token masked, summed, normalised by words, so that teachers
with different tokenizers are comparable. Lower is better. Output: runs/<run>/select/{routing.yaml,
ranking.md, ranking.csv}; pass the routing to later stages with `--routing=runs/<run>/select/routing.yaml`
(or `routing:` in the config).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from mergedistill.config import RunConfig
from mergedistill.corpus import sample_lines, split_problems
from mergedistill.errors import UserError
from mergedistill.fsutil import write_text_atomic
from mergedistill.lock import exclusive
from mergedistill.tables import dict_rows, markdown_table, write_csv

log = logging.getLogger(__name__)


@exclusive("select", lambda cfg: cfg.run_dir / "select")
def run_select(cfg: RunConfig) -> Path:
    from mergedistill.eval.metrics import score_pll
    from mergedistill.eval.models import Models, autocast
    from mergedistill.models.xmod import with_language

    start = time.monotonic()
    problems = split_problems(cfg.languages, "valid", "select scores teachers on the valid split; add one")
    if problems:
        raise UserError(problems, header=f"select: {len(problems)} problem(s); nothing was written:")
    models = Models(cfg, None, None)
    rows = []
    for lang, lc in cfg.languages.items():
        texts = sample_lines(lc.valid, f"languages.{lang}.valid", cfg.eval.pll_lines, cfg.eval.seed)
        unit = "char" if lang in cfg.eval.char_languages else "word"
        for name in cfg.teachers_of(lang):
            t0 = time.monotonic()
            model, tok = models.teacher(name)
            with autocast(cfg):
                score = score_pll(with_language(model, lang), tok, texts, unit)  # an X-Mod model: the language's module
            rows.append({"language": lang, "teacher": name, "unit": unit, **score})
            log.info("select: %s by %s: pseudo-perplexity %.2f per %s (%d lines, %d tokens, %.0f s)",
                     lang, name, score["ppl"], unit, score["lines"], score["tokens"], time.monotonic() - t0)
    best = {}
    for lang in cfg.languages:
        ranked = sorted((r for r in rows if r["language"] == lang), key=lambda r: r["ppl"])
        for i, r in enumerate(ranked, 1):
            r["rank"] = i
        best[lang] = ranked[0]["teacher"]
    out = cfg.run_dir / "select"
    out.mkdir(parents=True, exist_ok=True)
    header = ["language", "teacher", "rank", "ppl", "unit", "lines", "tokens", "units", "pll"]
    write_csv(out / "ranking.csv", header, dict_rows(rows, header))
    ordered = sorted(rows, key=lambda r: (list(cfg.languages).index(r["language"]), r["rank"]))
    md = ["# Teacher selection", "", "Pseudo-perplexity per word (per character for languages written without spaces) "
          "on each language's valid split; lower is better. The routing file sends each language to its best teacher.", "",
          markdown_table(["language", "teacher", "rank", "pseudo-perplexity", "per", "lines", "tokens", "configured"],
                         [[r["language"], r["teacher"], r["rank"], f"{r['ppl']:.2f}", r["unit"], r["lines"], r["tokens"],
                           cfg.teacher_of(r["language"]) == r["teacher"]] for r in ordered])]
    changed = {lang: t for lang, t in best.items() if t != cfg.teacher_of(lang)}
    md += ["", f"Routing changes against the config: {', '.join(f'{k} -> {v}' for k, v in changed.items()) or 'none'}.", ""]
    write_text_atomic(out / "ranking.md", "\n".join(md))
    write_text_atomic(out / "routing.yaml", "# written by `mergedistill select`; use with --routing=<this file>\n"
                      + yaml.safe_dump({"routing": best}, sort_keys=False))
    log.info("select: routing %s -> %s (%.0f s)", ", ".join(f"{k}: {v}" for k, v in best.items()), out / "routing.yaml",
             time.monotonic() - start)
    return out / "routing.yaml"
