"""Who pays for compression: per-language drops against the uncompressed student, their spread, their
correlation with each language's training data size, and the findings in words. Pure functions on
result rows (dicts with at least variant, language, metric, value), no models.

Drop convention: relative quality lost, positive = worse, whatever the metric's direction:
    higher-is-better metrics (mlm_acc, agreement, pll_per_word):  drop = (ref - value) / |ref|
    lower-is-better metrics (bits_per_char, pppl):                 drop = (value - ref) / |ref|
so 0.10 means "10% worse than the uncompressed student" and a negative drop is an improvement.
"""
from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from typing import Iterable, Sequence

HIGHER_IS_BETTER = {"mlm_acc": True, "agreement": True, "pll_per_word": True, "bits_per_char": False, "pppl": False}
"""Direction of each evaluate metric (pll_per_word is a log-likelihood per word: nearer 0 is better)."""


def relative_drop(reference: float, value: float, higher_is_better: bool) -> float:
    """(ref - value) / |ref| for higher-is-better metrics, (value - ref) / |ref| otherwise; nan when ref is 0."""
    if reference == 0 or math.isnan(reference) or math.isnan(value):
        return float("nan")
    d = (reference - value) / abs(reference)
    return d if higher_is_better else -d


def drops(rows: Iterable[dict], reference: str = "student", metrics: Sequence[str] | None = None) -> list[dict]:
    """One row per (variant, language, metric) that the reference variant also has: {variant, language,
    metric, reference, value, drop}. Metrics without a known direction are skipped unless listed."""
    rows = list(rows)
    ref = {(r["language"], r["metric"]): float(r["value"]) for r in rows if r["variant"] == reference}
    out = []
    for r in rows:
        m = r["metric"]
        if r["variant"] == reference or (metrics is not None and m not in metrics) or m not in HIGHER_IS_BETTER:
            continue
        key = (r["language"], m)
        if key not in ref:
            continue
        v = float(r["value"])
        out.append({"variant": r["variant"], "language": r["language"], "metric": m, "reference": ref[key], "value": v,
                    "drop": relative_drop(ref[key], v, HIGHER_IS_BETTER[m])})
    return out


def _by_variant(drop_rows: Iterable[dict], metric: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in drop_rows:
        if r["metric"] == metric and not math.isnan(r["drop"]):
            out[r["variant"]][r["language"]] = r["drop"]
    return dict(out)


def spread(drop_rows: Iterable[dict], metric: str) -> list[dict]:
    """Per variant, over languages: mean drop, std (population, over the languages present), range
    (max - min), and the languages with the largest and smallest drop."""
    out = []
    for variant, per_lang in _by_variant(drop_rows, metric).items():
        vals = list(per_lang.values())
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        worst = max(per_lang, key=per_lang.get)
        best = min(per_lang, key=per_lang.get)
        out.append({"variant": variant, "metric": metric, "languages": len(vals), "mean_drop": mean, "std": std,
                    "range": per_lang[worst] - per_lang[best], "worst": worst, "worst_drop": per_lang[worst],
                    "best": best, "best_drop": per_lang[best]})
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan for fewer than 3 points or a constant series."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} x values, {len(y)} y values")
    if n < 3:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def ranks(x: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(ranks(x), ranks(y))


SIGNIFICANCE = 0.05
"""Two-sided level below which a size-drop rank correlation is called a relation."""
EXACT_UP_TO = 8
"""`spearman_p` enumerates every ordering up to this many languages (8! = 40,320), samples above it."""


def spearman_p(x: Sequence[float], y: Sequence[float], draws: int = 20_000, seed: int = 0) -> float:
    """Two-sided p-value of Spearman's rho against independence: the share of the orderings of y whose
    |rho| is at least the observed one. Exact (every permutation) up to `EXACT_UP_TO` points, else a seeded
    sample of `draws` permutations ((hits + 1) / (draws + 1)). nan where rho is (fewer than 3 points, a
    constant series). With distinct values the least attainable p is 2 / n!: 0.33 for 3 points, 0.083 for 4."""
    rx, ry = ranks(x), ranks(y)
    rho = pearson(rx, ry)
    if math.isnan(rho):
        return float("nan")
    at_least = abs(rho) - 1e-12  # rounding: the observed ordering itself must count
    if len(ry) <= EXACT_UP_TO:
        perms = list(itertools.permutations(ry))
        hits = sum(abs(pearson(rx, list(p))) >= at_least for p in perms)
        return hits / len(perms)
    rng, shuffled, hits = random.Random(seed), list(ry), 0
    for _ in range(draws):
        rng.shuffle(shuffled)
        hits += abs(pearson(rx, shuffled)) >= at_least
    return (hits + 1) / (draws + 1)


def least_p(n: int) -> float:
    """The smallest two-sided `spearman_p` n distinct points can reach (a perfect ordering): 2 / n!."""
    return 2 / math.factorial(n) if n >= 2 else 1.0


def size_correlation(drop_rows: Iterable[dict], sizes: dict[str, float], metric: str) -> list[dict]:
    """Per variant: correlation of the languages' drops with their training data size (tokens).
    Pearson is on log10(size) (sizes span orders of magnitude), Spearman on the sizes' ranks, with its
    permutation p-value at that many languages (`spearman_p`). A negative value means smaller languages
    lose more."""
    out = []
    for variant, per_lang in _by_variant(drop_rows, metric).items():
        langs = [lang for lang in per_lang if sizes.get(lang, 0) > 0]
        d = [per_lang[lang] for lang in langs]
        s = [float(sizes[lang]) for lang in langs]
        out.append({"variant": variant, "metric": metric, "languages": len(langs),
                    "pearson_log_size": pearson([math.log10(v) for v in s], d), "spearman_size": spearman(s, d),
                    "spearman_p": spearman_p(s, d)})
    return out


def relation_words(rho: float, n: int, p: float, level: float = SIGNIFICANCE) -> str:
    """A rank correlation between training size and drop over n languages, in words: a relation only where
    its permutation p-value is below `level`; otherwise "no significant relation", saying so when n
    languages cannot reach the level at all."""
    if math.isnan(rho) or math.isnan(p):
        return "no relation can be computed"
    if p < level:
        who = "smaller languages lose more" if rho < 0 else "larger languages lose more"
        return f"{who}; p = {p:.3f} at n = {n}, significant at {level:g}"
    out = f"no significant relation: p = {p:.2f} at n = {n}"
    if least_p(n) >= level:
        out += f"; with {n} languages even a perfect ordering has p = {least_p(n):.2f}"
    return out


def findings(drop_rows: Sequence[dict], sizes: dict[str, float], metric: str, sparsity: dict[str, float] | None = None,
             mild: float = 0.5, tolerance: float = 0.005, variant_lines: bool = True) -> list[str]:
    """Plain-language findings for one metric.

    sparsity: variant -> sparsity for the unstructured-pruning variants (those at or below `mild` count as
    mild). Drops within +-tolerance (relative) are called unchanged. variant_lines=False leaves out the
    line per variant (who loses most and least in it: the spread table says the same)."""
    per_variant = _by_variant(drop_rows, metric)
    if not per_variant:
        return [f"{metric}: no variant has results to compare with the uncompressed student."]
    lines = []
    # who pays most: mean drop of each language over all variants
    totals: dict[str, list[float]] = defaultdict(list)
    for per_lang in per_variant.values():
        for lang, d in per_lang.items():
            totals[lang].append(d)
    mean = {lang: sum(v) / len(v) for lang, v in totals.items()}
    order = sorted(mean, key=mean.get, reverse=True)
    lines.append(f"{metric}: averaged over {len(per_variant)} variants, {order[0]} pays most (mean drop {mean[order[0]]:+.1%}) "
                 f"and {order[-1]} least ({mean[order[-1]]:+.1%}); order: " + ", ".join(f"{lang} {mean[lang]:+.1%}" for lang in order) + ".")
    for row in spread(drop_rows, metric) if variant_lines else []:
        lines.append(f"{row['variant']}: {row['worst']} loses most ({row['worst_drop']:+.1%}), {row['best']} least "
                     f"({row['best_drop']:+.1%}); spread over languages: std {row['std']:.1%}, range {row['range']:.1%}.")
    known = {lang for lang in mean if sizes.get(lang, 0) > 0}
    if len(known) >= 3:
        corr = {c["variant"]: c for c in size_correlation(drop_rows, sizes, metric)}
        agg = [lang for lang in order if lang in known]
        xs, ys = [float(sizes[lang]) for lang in agg], [mean[lang] for lang in agg]
        rho = spearman(xs, ys)
        if math.isnan(rho):
            lines.append("Training data size: the drops do not vary, so they cannot follow it.")
        else:
            who = relation_words(rho, len(agg), spearman_p(xs, ys))
            lines.append(f"Training data size vs mean drop: Spearman {rho:+.2f} over n = {len(agg)} languages ({who}; "
                         "exact permutation test); per variant: "
                         + ", ".join(f"{v} {c['spearman_size']:+.2f} (p {c['spearman_p']:.2f})" for v, c in corr.items()) + ".")
    else:
        lines.append("Training data size: fewer than 3 languages with a known size; no correlation computed.")
    if sparsity:
        mild_variants = [v for v, s in sparsity.items() if s <= mild and v in per_variant]
        helped = [(v, lang, d) for v in mild_variants for lang, d in per_variant[v].items() if d < -tolerance]
        if not mild_variants:
            lines.append(f"Mild sparsity (<= {mild:.0%}): no such variant was evaluated.")
        elif helped:
            lines.append(f"Mild sparsity (<= {mild:.0%}) helped: " + ", ".join(
                f"{lang} at {sparsity[v]:.0%} ({v}, {-d:.1%} better)" for v, lang, d in sorted(helped, key=lambda t: t[2])) + ".")
        else:
            lines.append(f"Mild sparsity (<= {mild:.0%}) helped no language by more than {tolerance:.1%} "
                         f"({', '.join(mild_variants)}).")
    return lines
