"""The compress report: runs/<run>/compress/{report.md, results.csv, drops.csv, variants.csv, plots/}.
Pure functions of result rows and measurements (no models).

    results.csv    every score: variant (`model`), language, metric, value (evaluate's columns)
    drops.csv      each language's relative drop against the uncompressed student, per variant and metric
    variants.csv   what each variant costs: weights, non-zeros, bytes on disk, CPU throughput, held-out loss
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from mergedistill.compress.disparity import drops, findings, size_correlation, spread
from mergedistill.compress.variants import REFERENCE, Variant
from mergedistill.eval.report import Row, bar_chart, write_results_csv
from mergedistill.tables import dict_rows, markdown_table, write_csv

QUALITY = ("mlm_acc", "agreement", "pll")
"""The metrics compared; `pll` is pll_per_word for languages scored per word, bits_per_char for the others."""
LABELS = {"mlm_acc": "masked-token accuracy", "agreement": "agreement with the routed teacher",
          "pll": "PLL per word (bits per char for per-char languages)"}
VARIANT_FIELDS = ["variant", "kind", "amount", "recovered", "description", "weights", "nonzero", "weights_bytes", "folder_bytes",
                  "size_ratio", "tokens_per_s", "speed_ratio", "tokens_per_cpu_s", "cpu_speed_ratio", "heldout_loss", "loader"]
DROP_FIELDS = ["variant", "language", "metric", "reference", "value", "drop"]

DEFINITIONS = """\
- **drop**: relative quality lost against the uncompressed student on the same language, positive = worse:
  (student - variant) / |student| for accuracy, agreement and PLL per word (a log-likelihood: nearer 0 is
  better), (variant - student) / student for bits per char. -5% means the variant is 5% better there.
- **masked acc**, **agreement**, **PLL**: exactly as `mergedistill evaluate` computes them (same code, test
  lines, masks and `eval:` settings; see runs/<run>/eval/report.md for their definitions).
- **weights**: numbers the model holds (parameters and int8 tables; tied tables once); **non-zeros**: of
  those, the ones not exactly 0 (unstructured pruning zeroes weights without removing them).
- **on disk**: bytes of the weight files (tokenizers are the same for every variant).
- **tokens/s**: CPU inference throughput of a full masked-LM forward (all positions, logits over the
  vocabulary), the same shard batches for every model, measured in one process with the models interleaved
  (median of the repeats); x student: the ratio to the uncompressed student in the same measurement.
  Unstructured sparsity runs on dense kernels (no speed-up expected); int8 widens its weights at each call
  (mergedistill's own weight-only format: on CPUs without int8 matrix kernels it saves size, not time).
- **held-out loss**: the training loss (alpha x KD + (1 - alpha) x MLM) on the valid shards.
- **Spearman with data size**: rank correlation, over languages, of the drop with the language's training
  tokens (data manifest); negative = the languages with less data lose more. p: the two-sided exact permutation
  p-value at that number of languages n (every ordering of the drops); a relation is claimed only below 0.05,
  which 3 languages can never reach (least p 0.33) and 4 neither (0.083).
"""


def drop_rows(rows: Sequence[Row]) -> list[dict]:
    """Relative drops of every variant against `student`, per language; PLL per word and bits per char
    both become metric `pll` (each language has one of them)."""
    recs = [{"variant": r.model, "language": r.language, "metric": r.metric, "value": r.value} for r in rows
            if not r.model.startswith("teacher:") and r.model != "unigram"]
    out = drops(recs, REFERENCE, metrics=["mlm_acc", "agreement", "pll_per_word", "bits_per_char"])
    for d in out:
        if d["metric"] in ("pll_per_word", "bits_per_char"):
            d["metric"] = "pll"
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.1%}"


def _value(rows: Sequence[Row], variant: str, lang: str, metric: str) -> float | None:
    names = ("pll_per_word", "bits_per_char") if metric == "pll" else (metric,)
    return next((r.value for r in rows if r.model == variant and r.language == lang and r.metric in names), None)


def quality_md(rows: Sequence[Row], dropped: list[dict], names: list[str], languages: list[str], metric: str) -> str:
    """Variants (rows) x languages (columns): the value, and the drop in brackets."""
    d = {(r["variant"], r["language"]): r["drop"] for r in dropped if r["metric"] == metric}
    routed = sorted({r.model for r in rows if r.model.startswith("teacher:")})
    table = []
    for name in names + (routed if metric != "agreement" else []):
        cells = []
        for lang in languages:
            v = _value(rows, name, lang, metric)
            if v is None:
                cells.append("")
                continue
            cells.append(f"{v:.3f}" + (f" ({_pct(d.get((name, lang)))})" if name not in (REFERENCE, *routed) else ""))
        if any(cells):
            table.append([name, *cells])
    header = ["variant"] + [lang + (" (bits/char)" if metric == "pll" and _value(rows, REFERENCE, lang, "bits_per_char") is not None
                                    else "") for lang in languages]
    return markdown_table(header, table, "l" + "r" * len(languages))


def variants_md(costs: list[dict]) -> str:
    rows = []
    for c in costs:
        rows.append([c["variant"], c["description"], f"{c['weights']:,}", f"{c['nonzero']:,}", f"{c['weights_bytes'] / 1e6:.2f}",
                     f"x{c['size_ratio']:.2f}", f"{c['tokens_per_s']:,.0f}", f"x{c['speed_ratio']:.2f}", f"x{c['cpu_speed_ratio']:.2f}",
                     f"{c['heldout_loss']:.3f}", f"`{c['loader']}`"])
    return markdown_table(["variant", "what", "weights", "non-zeros", "on disk (MB)", "size", "tokens/s", "speed",
                           "speed (CPU time)", "held-out loss", "load with"], rows, "llrrrrrrrrl")


def spread_md(dropped: list[dict], metric: str) -> str:
    rows = [[s["variant"], s["languages"], _pct(s["mean_drop"]), f"{s['std']:.1%}", f"{s['range']:.1%}",
             f"{s['worst']} ({_pct(s['worst_drop'])})", f"{s['best']} ({_pct(s['best_drop'])})"] for s in spread(dropped, metric)]
    return markdown_table(["variant", "languages", "mean drop", "std", "range", "loses most", "loses least"], rows, "lrrrrll")


def correlation_md(dropped: list[dict], sizes: dict[str, float]) -> str:
    per = {m: {c["variant"]: c for c in size_correlation(dropped, sizes, m)} for m in QUALITY}
    variants = list(dict.fromkeys(v for m in QUALITY for v in per[m]))
    rows = [[v] + [f"{per[m][v]['spearman_size']:+.2f} (p {per[m][v]['spearman_p']:.2f}, n {per[m][v]['languages']}) / "
                   f"{per[m][v]['pearson_log_size']:+.2f}" if v in per[m] else "-" for m in QUALITY]
            for v in variants]
    return markdown_table(["variant"] + [f"{m}: Spearman (p, n) / Pearson(log size)" for m in QUALITY], rows, "l" + "r" * len(QUALITY))


def write_plots(rows: Sequence[Row], dropped: list[dict], variants: list[Variant], costs: list[dict], folder: Path) -> list[str]:
    """plots/*.png: drops per language per variant; quality against sparsity and against size per language."""
    from mergedistill.compress.plots import plot_quality

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    names = [v.name for v in variants]
    langs = list(dict.fromkeys(r["language"] for r in dropped))
    for metric in QUALITY:
        series = {lang: {r["variant"]: r["drop"] * 100 for r in dropped if r["metric"] == metric and r["language"] == lang}
                  for lang in langs}
        if any(series.values()):
            bar_chart(folder / f"drop_{metric}.png", f"relative drop against the student: {LABELS[metric]} (%, positive = worse)",
                      names, series, "drop (%)")
            made.append(f"plots/drop_{metric}.png")
    recs = [{"variant": r.model, "language": r.language, "metric": r.metric, "value": r.value} for r in rows]
    size_mb = {c["variant"]: c["weights_bytes"] / 1e6 for c in costs}
    for metric in ("mlm_acc", "agreement", "pll_per_word", "bits_per_char"):
        if not any(r["metric"] == metric and r["variant"] == REFERENCE for r in recs):
            continue
        for recovered in (False, True):
            x_of = {REFERENCE: 0.0, **{v.name: v.amount for v in variants if v.kind == "sparse" and v.recovered == recovered}}
            if len(x_of) > 1:
                name = f"sparsity_{metric}{'_rec' if recovered else ''}.png"
                plot_quality(recs, metric, x_of, folder / name, "sparsity of the encoder's linear weights",
                             f"{metric} per language against sparsity ({'gradual, with recovery' if recovered else 'one-shot'})")
                made.append(f"plots/{name}")
        name = f"size_{metric}.png"
        plot_quality(recs, metric, size_mb, folder / name, "weights on disk (MB)", f"{metric} per language against size (every variant)",
                     connect=False)
        made.append(f"plots/{name}")
    return made


def report_md(header: str, rows: Sequence[Row], dropped: list[dict], variants: list[Variant], costs: list[dict],
              languages: list[str], sizes: dict[str, float], mild: float, plots: list[str]) -> str:
    names = [REFERENCE] + [v.name for v in variants]
    sparsity = {v.name: v.amount for v in variants if v.kind == "sparse"}
    parts = [header, "", "## Findings", ""]
    for metric in QUALITY:
        parts += [f"- {line}" for line in findings(dropped, sizes, metric, sparsity, mild=mild, variant_lines=False)]
    parts += ["", "## What each variant costs", "", variants_md(costs), ""]
    for metric in QUALITY:
        parts += [f"## {LABELS[metric][0].upper()}{LABELS[metric][1:]} per language", "",
                  "In brackets: the relative drop against the uncompressed student (positive = worse). The routed "
                  "teachers' rows are their own scores (the student's view of them is the agreement)." if metric == "mlm_acc" else
                  "In brackets: the relative drop against the uncompressed student (positive = worse).", "",
                  quality_md(rows, dropped, names, languages, metric), "", "Spread of the drops over languages:", "",
                  spread_md(dropped, metric), ""]
    parts += ["## Drops against training data size", "",
              "Training tokens per language (data manifest): " + ", ".join(f"{lang} {int(sizes.get(lang, 0)):,}" for lang in languages) + ".",
              "", correlation_md(dropped, sizes), ""]
    parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + ["", "## Definitions", "", DEFINITIONS]
    return "\n".join(parts)


def write_tables(out: Path, rows: Sequence[Row], dropped: list[dict], costs: list[dict]) -> None:
    write_results_csv(rows, out / "results.csv")
    write_csv(out / "drops.csv", DROP_FIELDS, dict_rows(dropped, DROP_FIELDS))
    write_csv(out / "variants.csv", VARIANT_FIELDS, dict_rows(costs, VARIANT_FIELDS))
