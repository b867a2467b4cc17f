"""Evaluation outputs from result rows: results.csv, report.md, plots/*.png and the model card's
'## Evaluation' section. Pure functions of the rows (no models), so they are cheap to test."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

from mergedistill.tables import markdown_table, write_csv

ROLE_ORDER = ("student", "baseline", "routed teacher", "candidate teacher", "teacher", "unigram")
CE_MARGIN = 0.2
"""Nats of masked cross-entropy above the routed teacher's that the summary line still counts as close."""


@dataclass
class Row:
    section: str
    """intrinsic | retrieval | downstream"""
    language: str
    """A language; `a->b` for retrieval (source -> target)."""
    model: str
    """student, baseline, unigram or teacher:<name>."""
    role: str
    """student, baseline, routed teacher, candidate teacher or unigram (for this language)."""
    metric: str
    value: float
    n: int
    """What the value is computed over: masked positions, tokens, words, pairs, test examples."""


CSV_FIELDS = [f.name for f in fields(Row)]


def write_results_csv(rows: Iterable[Row], path: Path) -> None:
    def value(r: Row, f: str):
        return ("" if _nan(r.value) else f"{r.value:.6g}") if f == "value" else getattr(r, f)

    write_csv(path, CSV_FIELDS, [[value(r, f) for f in CSV_FIELDS] for r in rows])


def _nan(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def fmt(v: float | None, kind: str = "acc") -> str:
    if _nan(v):
        return "-"
    if kind == "acc":
        return f"{v:.3f}"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "fix" and math.isfinite(v) and abs(v) < 1e5:
        return f"{v:.3f}"
    return f"{v:.4g}"


def verdict(lo: float | None, hi: float | None, higher_is_better: bool) -> str:
    """`ahead`, `level` or `behind` from an interval on (model - reference): ahead when the whole interval
    is on the better side of 0, level when it holds 0; `-` without an interval."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "-"
    if lo <= 0 <= hi:
        return "level"
    return "ahead" if (lo > 0) == higher_is_better else "behind"


class Table:
    """Rows indexed by (section, language, model, metric)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.index = {(r.section, r.language, r.model, r.metric): r for r in rows}

    def get(self, section: str, language: str, model: str, metric: str) -> Row | None:
        return self.index.get((section, language, model, metric))

    def value(self, section: str, language: str, model: str, metric: str) -> float | None:
        r = self.get(section, language, model, metric)
        return r.value if r else None

    def models(self, section: str, language: str | None = None) -> list[str]:
        seen = dict.fromkeys(r.model for r in self.rows if r.section == section and (language is None or r.language == language))
        return sorted(seen, key=lambda m: (_role_rank(self.role_of(m, section, language)), list(seen).index(m)))

    def role_of(self, model: str, section: str, language: str | None) -> str:
        for r in self.rows:
            if r.model == model and r.section == section and (language is None or r.language == language):
                return r.role
        return ""

    def languages(self, section: str) -> list[str]:
        return list(dict.fromkeys(r.language for r in self.rows if r.section == section))


def _role_rank(role: str) -> int:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


# ---- markdown --------------------------------------------------------------------------------------
def unit_of(t: Table, lang: str) -> str:
    return "char" if any(r.metric == "bits_per_char" for r in t.rows if r.language == lang) else "word"


def intrinsic_md(t: Table) -> str:
    parts = []
    for lang in t.languages("intrinsic"):
        unit = unit_of(t, lang)
        pll_metric = "bits_per_char" if unit == "char" else "pll_per_word"
        body = []
        for m in t.models("intrinsic", lang):
            acc = t.get("intrinsic", lang, m, "mlm_acc")
            toks = t.value("intrinsic", lang, m, "tokens_scored")
            units = t.value("intrinsic", lang, m, f"{unit}s_scored")
            body.append([m, t.role_of(m, "intrinsic", lang), fmt(acc.value if acc else None),
                         fmt(acc.n if acc else None, "int"), fmt(t.value("intrinsic", lang, m, "masked_ce"), "fix"),
                         fmt(t.value("intrinsic", lang, m, "agreement")),
                         fmt(t.value("intrinsic", lang, m, pll_metric), "fix"), fmt(t.value("intrinsic", lang, m, "pppl"), "num"),
                         fmt(toks, "int"), fmt(units, "int"),
                         fmt(toks / units if toks is not None and units else None, "num")])
        header = ["model", "role", "masked acc", "masked", "masked CE (nats)", "agreement",
                  "bits/char" if unit == "char" else "PLL/word (nats)",
                  f"pseudo-ppl/{unit}", "tokens", f"{unit}s", f"tokens/{unit}"]
        parts.append(f"### {lang}\n\n" + markdown_table(header, body))
    return "\n\n".join(parts)


def routed_teacher(t: Table, lang: str) -> str | None:
    """The model key of `lang`'s routed teacher (None if it was not scored)."""
    return next((m for m in t.models("intrinsic", lang) if t.role_of(m, "intrinsic", lang) == "routed teacher"), None)


def vs_teacher(t: Table, lang: str, model: str, metric: str) -> tuple[float, float, float] | None:
    """(diff, lo, hi) of `model` - routed teacher in `metric` (mlm_acc, masked_ce) for `lang`, or None."""
    got = [t.value("intrinsic", lang, model, f"{metric}_diff{suffix}") for suffix in ("", "_lo", "_hi")]
    return None if None in got else (got[0], got[1], got[2])  # type: ignore[return-value]


def interval_cell(d: tuple[float, float, float] | None) -> str:
    """`+0.012 [-0.004, +0.027]` (`-` when absent)."""
    if d is None or _nan(d[0]):
        return "-"
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def like_for_like_counts(t: Table, model: str = "student") -> tuple[int, int, int]:
    """(languages where `model`'s masked accuracy is not below the routed teacher's: verdict ahead or level;
    languages where its masked CE is at most CE_MARGIN nats above the teacher's; languages compared)."""
    acc_ok = ce_ok = total = 0
    for lang in t.languages("intrinsic"):
        acc, ce = vs_teacher(t, lang, model, "mlm_acc"), vs_teacher(t, lang, model, "masked_ce")
        if acc is None or ce is None:
            continue
        total += 1
        acc_ok += verdict(acc[1], acc[2], higher_is_better=True) in ("ahead", "level")
        ce_ok += _finite(ce[0]) and ce[0] <= CE_MARGIN
    return acc_ok, ce_ok, total


def like_for_like_summary(t: Table, model: str = "student") -> str:
    """One line: on how many languages `model` is at or above the routed teacher's accuracy and within
    CE_MARGIN nats of its masked CE (empty when nothing was compared)."""
    acc_ok, ce_ok, total = like_for_like_counts(t, model)
    if not total:
        return ""
    return (f"The {model}, like for like with the routed teacher: at or above the teacher's masked accuracy on {acc_ok} of "
            f"{total} languages (95% interval not below 0); masked CE within {CE_MARGIN:g} nats of the teacher's "
            f"(point estimate) on {ce_ok} of {total}.")


LIKE_FOR_LIKE_NOTE = (
    "Every model on the routed teacher's tokenization of the same test lines with the same masked positions, each predicting "
    "among the same pieces (those the student vocabulary keeps for the language, specials excluded). Differences are "
    "model - routed teacher with a paired bootstrap 95% interval over the test lines; verdict: ahead (the interval is on the "
    "better side of 0: above for accuracy, below for CE), level (it holds 0) or behind. Positions whose gold piece the "
    "student vocabulary pruned count as misses in accuracy for every model and are left out of CE (`pruned gold`); "
    "`lines`: the test lines the bootstrap resamples (those holding a masked position).")


def like_for_like_md(t: Table) -> str:
    """Per language: masked accuracy and masked CE of student / routed teacher / baseline on the same masked
    positions and the same pieces, the student's difference from the teacher with its 95% interval, and a
    verdict; then the summary line."""
    body = []
    for lang in t.languages("intrinsic"):
        teacher = routed_teacher(t, lang)
        acc, ce = vs_teacher(t, lang, "student", "mlm_acc"), vs_teacher(t, lang, "student", "masked_ce")
        if teacher is None or (acc is None and ce is None):
            continue
        v = lambda m, metric, kind="acc": fmt(t.value("intrinsic", lang, m, metric), kind)  # noqa: E731
        lines = t.get("intrinsic", lang, "student", "mlm_acc_diff")
        body.append([lang, teacher.removeprefix("teacher:"),
                     v("student", "mlm_acc"), v(teacher, "mlm_acc"), v("baseline", "mlm_acc"), interval_cell(acc),
                     verdict(acc[1], acc[2], True) if acc else "-",
                     v("student", "masked_ce", "fix"), v(teacher, "masked_ce", "fix"), v("baseline", "masked_ce", "fix"),
                     interval_cell(ce), verdict(ce[1], ce[2], False) if ce else "-",
                     fmt(t.value("intrinsic", lang, teacher, "gold_pruned"), "int"), fmt(lines.n if lines else None, "int")])
    if not body:
        return "_no student compared with its routed teacher_"
    header = ["language", "teacher", "acc: student", "teacher", "baseline", "student - teacher [95% CI]", "verdict",
              "CE (nats): student", "teacher", "baseline", "student - teacher [95% CI]", "verdict", "pruned gold", "lines"]
    summary = " ".join(x for x in (like_for_like_summary(t), like_for_like_summary(t, "baseline")) if x)
    return markdown_table(header, body) + "\n\n" + summary


def retrieval_md(t: Table) -> str:
    body = []
    for m in t.models("retrieval"):
        pairs = [r for r in t.rows if r.section == "retrieval" and r.model == m]
        seen = set()
        for r in pairs:
            a, b = r.language.split("->")
            if (b, a) in seen:
                continue
            seen.add((a, b))
            back = t.value("retrieval", f"{b}->{a}", m, r.metric)
            body.append([m, f"{a} - {b}", fmt(r.value), fmt(back), fmt(r.n, "int")])
        if pairs:
            body.append([f"**{m}**", "**mean**", f"**{fmt(sum(r.value for r in pairs) / len(pairs))}**", "", ""])
    if not body:
        return "_no language pairs with aligned paragraphs_"
    return markdown_table(["model", "pair (a - b)", "a -> b", "b -> a", "paragraphs"], body)


def downstream_md(t: Table) -> str:
    parts = []
    tasks = list(dict.fromkeys(r.metric.split("/")[0] for r in t.rows if r.section == "downstream"))
    for task in tasks:
        rows = [r for r in t.rows if r.section == "downstream" and r.metric.split("/")[0] == task]
        cols = list(dict.fromkeys(r.metric.split("/", 1)[1] for r in rows))  # acc, acc_from_de, ...
        body = []
        for lang in dict.fromkeys(r.language for r in rows):
            for m in t.models("downstream", lang):
                vals = [t.get("downstream", lang, m, f"{task}/{c}") for c in cols]
                if all(v is None for v in vals):
                    continue
                n = next(v.n for v in vals if v is not None)
                body.append([lang, m] + [fmt(v.value if v else None) for v in vals] + [fmt(n, "int")])
        header = (["language", "model"] + [("in-language" if c == "acc" else f"zero-shot from {c[len('acc_from_'):]}") for c in cols]
                  + ["test size"])
        parts.append(f"### {task}\n\n" + markdown_table(header, body))
    return "\n\n".join(parts) if parts else "_no downstream tasks configured (eval.downstream)_"


def card_md(t: Table, report_path: str) -> str:
    """The compact table for the model card: student vs baseline vs the routed teacher per language."""
    body = []
    for lang in t.languages("intrinsic"):
        teacher = next((m for m in t.models("intrinsic", lang) if t.role_of(m, "intrinsic", lang) == "routed teacher"), None)
        pll = "bits_per_char" if unit_of(t, lang) == "char" else "pll_per_word"

        def cells(metric: str, kind: str, models: tuple) -> str:
            return " / ".join(fmt(t.value("intrinsic", lang, m, metric), kind) for m in models)

        body.append([lang, (teacher or "-").removeprefix("teacher:"),
                     cells("mlm_acc", "acc", ("student", "baseline", teacher)),
                     cells("agreement", "acc", ("student", "baseline")),
                     cells(pll, "fix", ("student", "baseline", teacher)) + (" bits/char" if pll == "bits_per_char" else "")])
    summary = like_for_like_summary(t)
    out = [f"Held-out test splits; cells are student / MLM-only baseline / routed teacher (`-`: not available). "
           f"Full report: `{report_path}`.",
           *(["", summary] if summary else []),
           "",
           markdown_table(["language", "teacher", "masked-token accuracy", "agreement with the teacher (student / baseline)",
                      "PLL per word (nats) or bits per char"], body)]
    retr = [r for r in t.rows if r.section == "retrieval"]
    if retr:
        means = []
        for m in ("student", "baseline"):
            v = [r.value for r in retr if r.model == m]
            if v:
                means.append(f"{m} {sum(v) / len(v):.3f}")
        n_dir = len({r.language for r in retr if r.model == "student"})
        out += ["", f"Cross-lingual retrieval (accuracy@1, mean over {n_dir} directions): " + ", ".join(means) + "."]
    down = [r for r in t.rows if r.section == "downstream" and r.model in ("student", "baseline")]
    if down:
        langs = list(dict.fromkeys(r.language for r in down))
        lines: dict[tuple[str, str, str], dict[str, float]] = {}
        for r in down:
            task, col = r.metric.split("/", 1)
            setting = "fine-tuned on it" if col == "acc" else f"zero-shot from {col[len('acc_from_'):]}"
            lines.setdefault((task, r.model, setting), {})[r.language] = r.value
        out += ["", "Downstream accuracy per test language:", "",
                markdown_table(["task", "model", "training"] + langs,
                          [[task, m, setting] + [fmt(v.get(lang)) for lang in langs] for (task, m, setting), v in lines.items()])]
    return "\n".join(out)


def report_md(t: Table, header: str, definitions: str, plots: list[str]) -> str:
    parts = [header, "## Student vs routed teacher, like for like", LIKE_FOR_LIKE_NOTE, like_for_like_md(t),
             "## Intrinsic (held-out test split)", intrinsic_md(t) or "_none_",
             "## Cross-lingual retrieval (accuracy@1)", retrieval_md(t),
             "## Downstream tasks", downstream_md(t), "## Plots", "\n".join(f"![{Path(p).stem}]({p})" for p in plots) or "_none_",
             "## What the numbers mean", definitions]
    return "\n\n".join(parts) + "\n"


def set_card_section(card: str, body: str, title: str = "## Evaluation") -> str:
    """The card with its `title` section (up to the next `## ` heading) replaced by `body`, or appended."""
    section = f"{title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(card):
        return pattern.sub(lambda _: section + "\n", card, count=1).rstrip() + "\n"
    return card.rstrip() + "\n\n" + section


# ---- plots -----------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, title: str, groups: list[str], series: dict[str, dict[str, float]], ylabel: str,
              log_y: bool = False) -> None:
    """Grouped bars: one group per x label, one bar per series (missing values left out)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(groups) * max(1, len(series)) * 0.35), 4.0))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = [g for g, x in enumerate(groups) if _finite(vals.get(x))]
        ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], [vals[groups[x]] for x in xs], width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    below = -0.2 if any("\n" in g for g in groups) else -0.12  # under the tick labels
    ax.legend(fontsize=8, ncol=min(4, max(1, len(series))), loc="upper center", bbox_to_anchor=(0.5, below))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def interval_chart(path: Path, title: str, groups: list[str], series: dict[str, dict[str, tuple[float, float, float]]],
                   ylabel: str) -> None:
    """Points with interval bars around a line at 0: one group per x label, one point per series
    (value, lo, hi; missing or non-finite values left out)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.8 * len(groups)), 4.0))
    ax.axhline(0.0, color="grey", lw=0.8)
    step = 0.5 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = [g for g, x in enumerate(groups) if x in vals and all(_finite(v) for v in vals[x])]
        ys = [vals[groups[x]] for x in xs]
        ax.errorbar([x - 0.25 + step * (i + 0.5) for x in xs], [y[0] for y in ys],
                    yerr=[[y[0] - y[1] for y in ys], [y[2] - y[0] for y in ys]], fmt="o", capsize=4, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def heatmap(path: Path, title: str, langs: list[str], values: dict[tuple[str, str], float]) -> None:
    """Source language (rows) x target language (columns), NaN where no pair."""
    import numpy as np

    plt = _plt()
    m = np.full((len(langs), len(langs)), np.nan)
    for (a, b), v in values.items():
        m[langs.index(a), langs.index(b)] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(langs), 1.0 + 0.55 * len(langs)))
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(langs)), langs)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    for i in range(len(langs)):
        for j in range(len(langs)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if m[i, j] < 0.6 else "k")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slot(t: Table, section: str, lang: str, model: str) -> str:
    role = t.role_of(model, section, lang)
    return "routed teacher" if role == "routed teacher" else model


def write_plots(t: Table, folder: Path) -> list[str]:
    """plots/*.png; returns their paths relative to the report."""
    folder.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    langs = t.languages("intrinsic")
    routed = {lang: next((m.removeprefix("teacher:") for m in t.models("intrinsic", lang)
                          if t.role_of(m, "intrinsic", lang) == "routed teacher"), "-") for lang in langs}
    if langs:
        for metric, name, ylabel, log_y in (("mlm_acc", "accuracy", "masked-token accuracy", False),
                                            ("pppl", "pll", "pseudo-perplexity per word (per char: *)", True)):
            series: dict[str, dict[str, float]] = {}
            for lang in langs:
                for m in t.models("intrinsic", lang):
                    v = t.value("intrinsic", lang, m, metric)
                    if v is not None:
                        series.setdefault(_slot(t, "intrinsic", lang, m), {})[lang] = v
            series = dict(sorted(series.items(), key=lambda kv: _role_rank(kv[0]) if kv[0] in ROLE_ORDER else 2.5))
            groups = [(f"{lang}*" if metric == "pppl" and unit_of(t, lang) == "char" else lang) + f"\n({routed[lang]})"
                      for lang in langs]
            series = {k: {g: v[lang] for g, lang in zip(groups, langs) if lang in v} for k, v in series.items()}
            bar_chart(folder / f"{name}.png", f"{ylabel} (held-out test; routed teacher in brackets)", groups, series, ylabel, log_y)
            made.append(f"plots/{name}.png")
        for metric, ylabel in (("mlm_acc", "masked accuracy"), ("masked_ce", "masked CE (nats)")):
            diffs = {m: {lang: d for lang in langs if (d := vs_teacher(t, lang, m, metric)) is not None}
                     for m in ("student", "baseline")}
            diffs = {m: v for m, v in diffs.items() if v}
            if diffs:
                groups = [lang for lang in langs if any(lang in v for v in diffs.values())]
                interval_chart(folder / f"vs_teacher_{metric}.png",
                               f"{ylabel}: model - routed teacher, 95% interval (paired bootstrap over test lines)",
                               groups, diffs, f"{ylabel}, difference")
                made.append(f"plots/vs_teacher_{metric}.png")
    for m in t.models("retrieval"):
        vals = {}
        for r in t.rows:
            if r.section == "retrieval" and r.model == m:
                a, b = r.language.split("->")
                vals[(a, b)] = r.value
        order = [lang for lang in dict.fromkeys([a for a, _ in vals] + [b for _, b in vals])]
        name = f"retrieval_{re.sub(r'[^A-Za-z0-9_.-]', '_', m)}.png"
        heatmap(folder / name, f"retrieval accuracy@1: {m}", order, vals)
        made.append(f"plots/{name}")
    for task in dict.fromkeys(r.metric.split("/")[0] for r in t.rows if r.section == "downstream"):
        rows = [r for r in t.rows if r.section == "downstream" and r.metric.split("/")[0] == task]
        groups = list(dict.fromkeys(r.language for r in rows))
        series = {}
        for r in rows:
            col = r.metric.split("/", 1)[1]
            label = _slot(t, "downstream", r.language, r.model)
            if col != "acc":
                label += f" (zero-shot from {col[len('acc_from_'):]})"
            series.setdefault(label, {})[r.language] = r.value
        name = f"downstream_{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.png"
        bar_chart(folder / name, f"downstream: {task}", groups, series, "accuracy")
        made.append(f"plots/{name}")
    return made
