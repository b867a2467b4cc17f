"""`mergedistill sweep --config C --vary train.temperature=1,2 --vary data.top_k=8,32`: recipe variants end
to end, one table and plot.

Each --vary names a config field (`section.key`, as a `--section.key=value` override does) and the values to
try (YAML, comma-separated; commas inside [...] or {...} or quotes stay in their value). The variants are
every combination, each trained once per training seed in `sweep.seeds` (default: train.seed). A variant is
the run's config with those overrides, read by the config loader and checked against the teachers' configs
before any work: every problem of every value and combination is reported together (exit 2).

A variant whose settings are the run's own is the run itself; every other one runs in runs/<run>-<name>/
(experiments/variants.py): on the run's vocabulary unless it varies something the vocabulary is built from
(vocab.*, teachers, languages, routing), and with every shard the data stage's store holds for its inputs,
so a variant of train.* keys labels nothing. Then train (continued when trained with these settings) and
evaluate, each skipping complete outputs: a rerun after a kill goes quickly through the finished variants.
Variants other than the run itself are evaluated without the MLM-only baseline (the table compares students).

Output: runs/<run>/sweep/<name>/{report.md, results.csv, sweep.png} (sweep.name, default the varied keys), written as one folder when every variant is
done: per variant, seed and language, every student figure of the variant's eval/results.csv, read by
metric name, with the interval evaluate gives for it (`<metric>_lo` / `<metric>_hi` rows), and with
several seeds the mean and standard deviation over them. The main table and the plot show `sweep.metric`.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergedistill.config import RunConfig, load_config
from mergedistill.configlib import to_dict
from mergedistill.corpus import split_problems
from mergedistill.errors import UserError
from mergedistill.experiments.variants import as_variant, train_variant
from mergedistill.fsutil import atomic_dir
from mergedistill.lock import exclusive
from mergedistill.tables import markdown_table, write_csv

log = logging.getLogger(__name__)

VOCAB_INPUTS = ("vocab", "teachers", "languages", "default_teacher", "routing")
"""Top-level keys the vocabulary is built from: a variant that changes one of them gets a vocabulary of its own."""
NOT_VARIED = {
    "run": "names the run and its variants' folders (runs/<run>-<variant>)",
    "vocab_run": "decides which vocabulary each variant reads",
    "sweep": "is the sweep's own section (training seeds: sweep.seeds)",
    "ablate": "is not read by vocab, data, train or evaluate: every variant would be the same",
    "extend": "is not read by vocab, data, train or evaluate: every variant would be the same",
    "compress": "is not read by vocab, data, train or evaluate: every variant would be the same",
}
"""Top-level keys a sweep refuses to vary, and why."""


@dataclass(frozen=True)
class Axis:
    """One --vary: a dotted config key and its values as typed."""

    key: str
    values: tuple[str, ...]


@dataclass
class Variant:
    """One student of the sweep: a combination of values (and a training seed)."""

    recipe: str
    """The combination's name, e.g. `temperature2-top_k32` (the same for every seed)."""
    name: str
    """The recipe, with `-seed<s>` when sweeping seeds: names runs/<run>-<name>/."""
    values: dict[str, str]
    """Varied key -> its value as typed."""
    seed: int | None
    """The training seed from sweep.seeds (None: no seed sweep)."""
    cfg: RunConfig
    own_vocab: bool = False
    """Varies what the vocabulary is built from: builds vocab/<run>-<name>/."""
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)
    """The student's figures from its eval/results.csv (student_results)."""


# ---- the command line ----------------------------------------------------------------------------
def split_values(text: str) -> list[str]:
    """`1,2` -> ['1', '2']; commas inside [...], {...} or quotes belong to their value:
    `[train],[train,valid]` -> ['[train]', '[train,valid]']."""
    out, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def parse_axes(specs: list[str], cfg: RunConfig, problems: list[str]) -> list[Axis]:
    """The --vary options as axes; malformed ones, repeated keys or values, and keys a sweep cannot vary
    become problems (the values themselves are checked by `check_values`)."""
    axes: list[Axis] = []
    for spec in specs:
        key, eq, raw = spec.partition("=")
        key = key.strip()
        if not eq or not key or not re.fullmatch(r"[\w.-]+", key):
            problems.append(f"--vary {spec!r}: needs the form section.key=V1,V2,... (e.g. --vary train.temperature=1,2)")
            continue
        values = split_values(raw)
        top = key.split(".")[0]
        if any(a.key == key for a in axes):
            problems.append(f"--vary {key}: given twice; list all its values in one --vary {key}=V1,V2,...")
        elif top in NOT_VARIED:
            problems.append(f"--vary {key}: `{top}` {NOT_VARIED[top]}; it cannot vary")
        elif key == "train.seed" and cfg.sweep.seeds:
            problems.append("--vary train.seed: sweep.seeds sets the training seeds already; use one or the other")
        elif "" in values:
            problems.append(f"--vary {spec}: an empty value; give each value (an empty string is '')")
        elif len(set(values)) < len(values):
            twice = sorted({v for v in values if values.count(v) > 1})
            problems.append(f"--vary {key}: {', '.join(twice)} given twice; give each value once")
        else:
            axes.append(Axis(key, tuple(values)))
    return axes


def _load(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """The run's config with `overrides` (`--a.b=value`), read by the loader the command line uses: the
    same conversions, ranges, did-you-means and cross-field checks. Raises ConfigError."""
    v = load_config(None, overrides, data=to_dict(cfg))
    v.config_path = cfg.config_path
    return v


def check_values(cfg: RunConfig, axes: list[Axis], problems: list[str]) -> set[tuple[str, str]]:
    """Each value of each axis on its own; returns the (key, value) pairs that load. A problem that several
    values share (an unknown key) is said once, naming them."""
    ok: set[tuple[str, str]] = set()
    for axis in axes:
        found: dict[str, list[str]] = {}
        for value in axis.values:
            try:
                _load(cfg, [f"--{axis.key}={value}"])
                ok.add((axis.key, value))
            except UserError as e:
                for p in e.problems:
                    found.setdefault(p, []).append(value)
        problems += [f"--vary {axis.key}={','.join(values)}: {p}" for p, values in found.items()]
    return ok


# ---- variants --------------------------------------------------------------------------------------
def _labels(axes: list[Axis]) -> dict[str, str]:
    """Key -> its part of variant names: the last component (`temperature`), or the whole key when two
    varied keys end alike (data.seed and train.seed)."""
    last = [a.key.split(".")[-1] for a in axes]
    return {a.key: (s if last.count(s) == 1 else a.key) for a, s in zip(axes, last)}


def recipe_name(values: dict[str, str], labels: dict[str, str]) -> str:
    """`{train.temperature: 2, data.top_k: 32}` -> `temperature2-top_k32` (a plain folder name)."""
    return "-".join(labels[k] + (re.sub(r"[^\w.-]+", "_", v).strip("_") or "_") for k, v in values.items())


def plan_variants(cfg: RunConfig, axes: list[Axis], ok: set[tuple[str, str]], problems: list[str]) -> list[Variant]:
    """Every combination of the axes' values (times sweep.seeds) whose values each load, as configs; the
    problems of combinations (cross-field checks, two variants with the same settings) are collected."""
    labels = _labels(axes)
    seeds: list[int | None] = list(cfg.sweep.seeds) or [None]
    if len(set(seeds)) < len(seeds):
        problems.append(f"sweep.seeds: {cfg.sweep.seeds} repeats a seed; give each seed once")
    base_dict = to_dict(cfg)
    base = json.dumps(base_dict, sort_keys=True)
    seen: dict[str, str] = {}
    out = []
    for combo in itertools.product(*[[(a.key, v) for v in a.values] for a in axes]):
        if not all(kv in ok for kv in combo):
            continue  # its value's problem is said already
        values = dict(combo)
        recipe = recipe_name(values, labels)
        for seed in seeds:
            name = recipe if seed is None else f"{recipe}-seed{seed}"
            overrides = [f"--{k}={v}" for k, v in values.items()] + ([] if seed is None else [f"--train.seed={seed}"])
            try:
                v = _load(cfg, overrides)
            except UserError as e:
                problems += [f"variant {name} ({', '.join(f'{k}={x}' for k, x in values.items())}): {p}" for p in e.problems]
                continue
            mine = to_dict(v)
            settings = json.dumps(mine, sort_keys=True)
            if settings in seen:
                problems.append(f"--vary: variants {seen[settings]} and {name} have the same settings (values that read "
                                "the same, e.g. 1 and 1.0); give each value once")
                continue
            if name in seen.values():  # values that differ only in characters a folder name leaves out
                problems.append(f"--vary: two variants would both be runs/{cfg.run}-{name}; give values that differ "
                                "in letters, digits, '.' or '-'")
                continue
            seen[settings] = name
            variant = Variant(recipe, name, values, seed, v)
            if settings != base:  # else: the run itself, as it is configured
                variant.own_vocab = any(mine[k] != base_dict[k] for k in VOCAB_INPUTS)
                as_variant(v, cfg, name, share_vocab=not variant.own_vocab)
                if "eval.baseline" not in values:
                    v.eval = replace(v.eval, baseline=False)
            out.append(variant)
    return out


def check_variants(variants: list[Variant], problems: list[str]) -> None:
    """What evaluate and the teachers' configs say about each variant (test splits, data.seq_len against
    the teachers' positions, student.init), checked once per distinct setting; a problem every variant
    shares is said once."""
    from mergedistill.preflight import preflight

    found: dict[str, list[str]] = {}
    checked: dict[str, list[str]] = {}
    for var in variants:
        d = to_dict(var.cfg)
        key = json.dumps({k: d[k] for k in ("teachers", "languages", "default_teacher", "data", "student")}, sort_keys=True)
        if key not in checked:
            need = "sweep evaluates every variant on the test split; add `test: <file>`"
            mine = split_problems(var.cfg.languages, "test", need)
            try:
                preflight(var.cfg, "run")
            except UserError as e:
                mine += e.problems
            checked[key] = mine
        for p in checked[key]:
            found.setdefault(p, []).append(var.name)
    for p, names in found.items():
        problems.append(p if len(names) == len(variants) else f"variant{'s' if len(names) > 1 else ''} {', '.join(names)}: {p}")


def plan_sweep(cfg: RunConfig, vary: list[str]) -> tuple[list[Axis], list[Variant]]:
    """The axes and variants of `--vary` options on `cfg`; raises UserError with every problem, before any work."""
    problems: list[str] = []
    axes = parse_axes(vary, cfg, problems)
    ok = check_values(cfg, axes, problems)
    variants = plan_variants(cfg, axes, ok, problems)
    if variants and not problems:
        check_variants(variants, problems)
    if not axes and not problems:
        problems.append("--vary: give at least one field and its values, e.g. --vary train.temperature=1,2")
    if problems:
        raise UserError(problems, header=f"sweep: {len(problems)} problem(s); nothing was run:")
    return axes, variants


# ---- evaluate's results ----------------------------------------------------------------------------
def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def student_results(path: Path) -> list[dict]:
    """The student's figures in an evaluate results.csv: section, language, metric, value, n, read by metric
    name; a metric with `<metric>_lo` and `<metric>_hi` rows (same section and language) gets them as its
    interval (lo, hi) instead of as figures of their own."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("model") == "student"]
    by_key = {(r["section"], r["language"], r["metric"]): r for r in rows}

    def bound(section: str, lang: str, metric: str, end: str) -> dict | None:
        return by_key.get((section, lang, f"{metric}_{end}"))

    out = []
    for (section, lang, metric), r in by_key.items():
        if metric[-3:] in ("_lo", "_hi") and (section, lang, metric[:-3]) in by_key:
            continue
        lo, hi = bound(section, lang, metric, "lo"), bound(section, lang, metric, "hi")
        ci = lo is not None and hi is not None
        out.append({"section": section, "language": lang, "metric": metric, "value": _number(r["value"]),
                    "lo": _number(lo["value"]) if ci else math.nan, "hi": _number(hi["value"]) if ci else math.nan,
                    "interval": "evaluate" if ci else "", "n": r.get("n", "")})
    return out


def over_seeds(variants: list[Variant]) -> list[dict]:
    """Per recipe, section, language and metric: the mean over the recipe's seeds (those with a figure),
    lo/hi = mean -/+ their standard deviation (seed `mean`, interval `sd over N seeds`; none under 2)."""
    groups: dict[tuple, list[float]] = {}
    for var in variants:
        for r in var.rows:
            groups.setdefault((var.recipe, r["section"], r["language"], r["metric"]), []).append(r["value"])
    out = []
    for (recipe, section, lang, metric), values in groups.items():
        finite = [x for x in values if math.isfinite(x)]
        mean = statistics.fmean(finite) if finite else math.nan
        sd = statistics.stdev(finite) if len(finite) > 1 else math.nan
        out.append({"recipe": recipe, "seed": "mean", "section": section, "language": lang, "metric": metric, "value": mean,
                    "lo": mean - sd, "hi": mean + sd, "interval": f"sd over {len(finite)} seeds" if len(finite) > 1 else "",
                    "n": len(finite)})
    return out


# ---- the stage ---------------------------------------------------------------------------------------
@exclusive("sweep", lambda cfg, **_: cfg.run_dir / "sweep")
def run_sweep(cfg: RunConfig, *, vary: list[str]) -> Path:
    """Every variant end to end (vocabulary, data, train, evaluate: each skipping complete outputs), then
    runs/<run>/sweep/; `cfg` is not changed. vary: `section.key=V1,V2,...` per varied field."""
    from mergedistill.eval.stage import eval_dir, run_evaluate
    from mergedistill.vocab.stage import run_vocab

    start = time.monotonic()
    axes, variants = plan_sweep(cfg, vary)
    out = sweep_dir(cfg, axes)  # a bad sweep.name is refused before any work
    log.info("sweep: %d variants (%s%s)", len(variants), "; ".join(f"{a.key}: {', '.join(a.values)}" for a in axes),
             f"; seeds {', '.join(map(str, cfg.sweep.seeds))}" if cfg.sweep.seeds else "")
    if not all(var.own_vocab for var in variants):
        run_vocab(cfg)
    for i, var in enumerate(variants, 1):
        t0 = time.monotonic()
        log.info("sweep: variant %d/%d %s (%s) in runs/%s", i, len(variants), var.name,
                 ", ".join(f"{k}={v}" for k, v in var.values.items()), var.cfg.run)
        if var.own_vocab:
            run_vocab(var.cfg)
        train_variant(var.cfg)
        var.rows = student_results(run_evaluate(var.cfg) / "results.csv")
        var.seconds = time.monotonic() - t0
        shown = [f"{r['language']} {r['value']:.4g}" for r in var.rows if r["metric"] == cfg.sweep.metric]
        log.info("sweep: variant %d/%d %s done in %.0f s; %s: %s (report %s)", i, len(variants), var.name, var.seconds,
                 cfg.sweep.metric, ", ".join(shown) or "-", eval_dir(var.cfg) / "report.md")
    metrics = list(dict.fromkeys(r["metric"] for var in variants for r in var.rows))
    if cfg.sweep.metric not in metrics:
        raise UserError(f"sweep.metric: {cfg.sweep.metric!r} is not among the student's figures in evaluate's results "
                        f"({', '.join(metrics)}); rerun with --sweep.metric=<one of them> (finished variants are skipped)")
    with atomic_dir(out) as tmp:
        write_outputs(tmp, cfg, axes, variants)
    log.info("sweep: %d variants in %.0f s; table at %s", len(variants), time.monotonic() - start, out / "report.md")
    return out


def sweep_dir(cfg: RunConfig, axes: list[Axis]) -> Path:
    """runs/<run>/sweep/<sweep.name, or the varied keys joined by `+`>/."""
    name = cfg.sweep.name or "+".join(a.key for a in axes)
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"sweep.name: {name!r} must be a plain folder name (no `/`, not starting with `.`)")
    return cfg.run_dir / "sweep" / name


# ---- outputs -----------------------------------------------------------------------------------------
def _g(x: float) -> str:
    """A figure for the CSV: 6 significant digits, empty when missing."""
    return "" if not math.isfinite(x) else f"{x:.6g}"


def _cell(r: dict | None) -> str:
    """A figure for the report: `0.4123`, `0.4123 [0.40, 0.43]` (evaluate's interval) or `0.4123 ± 0.0100` (seeds)."""
    if r is None or not math.isfinite(r["value"]):
        return "-"
    v = r["value"]
    text = f"{int(v):,}" if v.is_integer() and 1000 <= abs(v) < 1e9 else f"{v:.4g}"  # counts; not 2.1e+10
    if not (math.isfinite(r["lo"]) and math.isfinite(r["hi"])):
        return text
    if r["seed"] == "mean":
        return f"{text} ± {r['hi'] - v:.2g}"
    return f"{text} [{r['lo']:.4g}, {r['hi']:.4g}]"


def table_rows(variants: list[Variant]) -> list[dict]:
    """What the report and plot show per recipe: the student's own rows, or with several seeds the means."""
    if len({var.seed for var in variants}) > 1:
        return over_seeds(variants)
    return [{"recipe": var.recipe, "seed": var.seed, **r} for var in variants for r in var.rows]


def write_outputs(folder: Path, cfg: RunConfig, axes: list[Axis], variants: list[Variant]) -> None:
    """results.csv, report.md and sweep.png in `folder`."""
    shown = table_rows(variants)
    header, body = results_table(axes, variants, shown)
    write_csv(folder / "results.csv", header, body)
    (folder / "report.md").write_text(report_md(cfg, axes, variants, shown), encoding="utf-8")
    plot(folder / "sweep.png", cfg.sweep.metric, list(dict.fromkeys(var.recipe for var in variants)), shown, variants)


def results_table(axes: list[Axis], variants: list[Variant], shown: list[dict]) -> tuple[list[str], list[list]]:
    """results.csv: one row per variant, seed and language, with the varied values, the run folder, and a
    column per figure (`<metric>_lo` / `<metric>_hi` beside a figure with an interval); with several seeds,
    a row per variant and language with seed `mean`: the means, lo/hi = mean -/+ the sd over the seeds."""
    seeds = len({var.seed for var in variants}) > 1
    metrics = list(dict.fromkeys(r["metric"] for var in variants for r in var.rows))
    bounded = {r["metric"] for var in variants for r in var.rows if r["interval"]} | (set(metrics) if seeds else set())
    values = {var.recipe: var.values for var in variants}
    header = ["variant", *[a.key for a in axes], "seed", "run", "language"]
    header += [c for m in metrics for c in ((m, f"{m}_lo", f"{m}_hi") if m in bounded else (m,))] + ["interval"]

    def line(recipe: str, seed, run: str, lang: str, rows: list[dict], interval: str) -> list:
        by = {r["metric"]: r for r in rows}
        cells = []
        for m in metrics:
            r = by.get(m)
            cells += [_g(r[f]) if r else "" for f in (("value", "lo", "hi") if m in bounded else ("value",))]
        return [recipe, *values[recipe].values(), seed, run, lang, *cells, interval]

    body = []
    for var in variants:
        for lang in dict.fromkeys(r["language"] for r in var.rows):
            rows = [r for r in var.rows if r["language"] == lang]
            body.append(line(var.recipe, "" if var.seed is None else var.seed, var.cfg.run, lang, rows,
                             "evaluate" if any(r["interval"] for r in rows) else ""))
    if seeds:
        n = len({var.seed for var in variants})
        for recipe in values:
            for lang in dict.fromkeys(r["language"] for r in shown if r["recipe"] == recipe):
                rows = [r for r in shown if (r["recipe"], r["language"]) == (recipe, lang)]
                body.append(line(recipe, "mean", "", lang, rows, f"mean -/+ sd over {n} seeds"))
    return header, body


def report_md(cfg: RunConfig, axes: list[Axis], variants: list[Variant], shown: list[dict]) -> str:
    """The sweep's report: the main metric per recipe and language, then every figure per language."""
    metric = cfg.sweep.metric
    recipes = list(dict.fromkeys(var.recipe for var in variants))
    values = {var.recipe: var.values for var in variants}
    runs: dict[str, list[str]] = {}
    for var in variants:
        runs.setdefault(var.recipe, []).append(f"runs/{var.cfg.run}")
    cell = {(r["recipe"], r["section"], r["language"], r["metric"]): r for r in shown}
    seeds = f"; training seeds {', '.join(map(str, cfg.sweep.seeds))}, one student each" if cfg.sweep.seeds else ""
    md = ["# Recipe sweep", "",
          f"Run `{cfg.run}`{f' ({cfg.config_path})' if cfg.config_path else ''}, varied: "
          + "; ".join(f"`{a.key}` ({', '.join(a.values)})" for a in axes) + seeds + ". "
          "Each variant's student is scored as `mergedistill evaluate` scores it (its own report: runs/<variant run>/eval/"
          "report.md). In brackets: the interval evaluate gives; `±`: the standard deviation over the seeds.", ""]
    langs = list(dict.fromkeys(r["language"] for r in shown if r["metric"] == metric))
    section = {r["language"]: r["section"] for r in shown if r["metric"] == metric}
    md += [f"## {metric} per language", "",
           markdown_table(["variant", *[a.key for a in axes], *langs, "runs"],
                          [[n, *values[n].values(), *[_cell(cell.get((n, section[lang], lang, metric))) for lang in langs],
                            ", ".join(runs[n])] for n in recipes]), ""]
    md += ["## Every student figure", ""]
    for sec, lang in dict.fromkeys((r["section"], r["language"]) for r in shown):
        metrics = list(dict.fromkeys(r["metric"] for r in shown if (r["section"], r["language"]) == (sec, lang)))
        body = [[n, *[_cell(cell.get((n, sec, lang, m))) for m in metrics]] for n in recipes]
        md += [f"### {lang}" if sec == "intrinsic" else f"### {sec}: {lang}", "", markdown_table(["variant", *metrics], body), ""]
    md += ["Wall time per student (vocabulary, data, training, evaluation; what was complete already costs little): "
           + ", ".join(f"{var.name} {var.seconds:.0f} s" for var in variants), "", "![sweep](sweep.png)", ""]
    return "\n".join(md)


def plot(path: Path, metric: str, recipes: list[str], shown: list[dict], variants: list[Variant]) -> None:
    """One panel per language: `metric` per variant, with error bars where there is an interval, and each
    seed's student as a dot when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in shown if r["metric"] == metric]
    langs = list(dict.fromkeys(r["language"] for r in rows))
    ncols = min(3, len(langs))
    nrows = math.ceil(len(langs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * max(3.2, 1.2 + 0.55 * len(recipes)), 3.4 * nrows), squeeze=False)
    seeds = len({var.seed for var in variants}) > 1
    x = {n: i for i, n in enumerate(recipes)}
    for ax, lang in zip(axes.flat, langs):
        mine = [r for r in rows if r["language"] == lang and math.isfinite(r["value"])]
        ys = [r["value"] for r in mine]
        err = [[max(0.0, r["value"] - r["lo"]) if math.isfinite(r["lo"]) else 0.0 for r in mine],
               [max(0.0, r["hi"] - r["value"]) if math.isfinite(r["hi"]) else 0.0 for r in mine]]
        ax.errorbar([x[r["recipe"]] for r in mine], ys, yerr=err, fmt="o", capsize=4, label="mean ± sd" if seeds else None)
        if seeds:
            dots = [(x[var.recipe], r["value"]) for var in variants for r in var.rows
                    if r["metric"] == metric and r["language"] == lang and math.isfinite(r["value"])]
            ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=10, alpha=0.5, color="grey", label="one seed")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(recipes)), recipes, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(recipes) - 0.5)
        ax.set_title(lang)
        ax.set_ylabel(metric)
    for ax in list(axes.flat)[len(langs):]:
        ax.axis("off")
    fig.suptitle(f"student {metric} per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
