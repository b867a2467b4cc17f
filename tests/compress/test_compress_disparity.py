"""Disparity math on hand-made result rows, and the plot."""
from __future__ import annotations

import math

import pytest

from mergedistill.compress.disparity import (
    drops,
    findings,
    pearson,
    ranks,
    least_p,
    relation_words,
    relative_drop,
    size_correlation,
    spearman,
    spearman_p,
    spread,
)
from mergedistill.compress.plots import plot_quality


def row(variant, lang, metric, value):
    return {"variant": variant, "language": lang, "metric": metric, "value": value}


ROWS = [
    row("student", "de", "mlm_acc", 0.50), row("student", "fr", "mlm_acc", 0.40), row("student", "sw", "mlm_acc", 0.20),
    row("sparse-0.3", "de", "mlm_acc", 0.49), row("sparse-0.3", "fr", "mlm_acc", 0.40), row("sparse-0.3", "sw", "mlm_acc", 0.21),
    row("sparse-0.9", "de", "mlm_acc", 0.40), row("sparse-0.9", "fr", "mlm_acc", 0.30), row("sparse-0.9", "sw", "mlm_acc", 0.10),
    row("student", "de", "bits_per_char", 2.0), row("sparse-0.9", "de", "bits_per_char", 2.5),
    row("student", "de", "pll_per_word", -5.0), row("sparse-0.9", "de", "pll_per_word", -6.0),
    row("sparse-0.9", "xx", "mlm_acc", 0.9),  # no reference row: left out
    row("student", "de", "tokens_scored", 100), row("sparse-0.9", "de", "tokens_scored", 100),  # not a quality metric
]
SIZES = {"de": 1_000_000, "fr": 100_000, "sw": 10_000}


def test_relative_drop_direction():
    assert relative_drop(0.5, 0.4, True) == pytest.approx(0.2)  # accuracy 0.5 -> 0.4: 20% worse
    assert relative_drop(2.0, 2.5, False) == pytest.approx(0.25)  # bits/char 2.0 -> 2.5: 25% worse
    assert relative_drop(-5.0, -6.0, True) == pytest.approx(0.2)  # PLL/word -5 -> -6: 20% worse
    assert relative_drop(0.2, 0.21, True) == pytest.approx(-0.05)  # better: negative
    assert math.isnan(relative_drop(0.0, 0.1, True))


def test_drops_per_variant_and_language():
    d = {(r["variant"], r["language"], r["metric"]): r["drop"] for r in drops(ROWS)}
    assert d[("sparse-0.9", "sw", "mlm_acc")] == pytest.approx(0.5)
    assert d[("sparse-0.9", "de", "mlm_acc")] == pytest.approx(0.2)
    assert d[("sparse-0.3", "fr", "mlm_acc")] == pytest.approx(0.0)
    assert d[("sparse-0.9", "de", "bits_per_char")] == pytest.approx(0.25)
    assert d[("sparse-0.9", "de", "pll_per_word")] == pytest.approx(0.2)
    assert ("sparse-0.9", "xx", "mlm_acc") not in d and ("sparse-0.9", "de", "tokens_scored") not in d
    assert not any(v == "student" for v, _, _ in d)


def test_spread_of_drops():
    s = {r["variant"]: r for r in spread(drops(ROWS), "mlm_acc")}
    heavy = s["sparse-0.9"]  # drops 0.2, 0.25, 0.5: mean 0.3167, population std 0.1312
    assert heavy["mean_drop"] == pytest.approx(0.95 / 3)
    assert heavy["std"] == pytest.approx(math.sqrt(((0.2 - 0.95 / 3) ** 2 + (0.25 - 0.95 / 3) ** 2 + (0.5 - 0.95 / 3) ** 2) / 3))
    assert heavy["range"] == pytest.approx(0.3) and heavy["worst"] == "sw" and heavy["best"] == "de"
    assert s["sparse-0.3"]["best"] == "sw" and s["sparse-0.3"]["best_drop"] == pytest.approx(-0.05)


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # hand-computed: 4 / 5
    assert math.isnan(pearson([1, 2], [1, 2])) and math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert ranks([10, 30, 20, 20]) == [1, 4, 2.5, 2.5]
    assert spearman([1, 10, 100, 1000], [1, 2, 3, 5]) == pytest.approx(1.0)  # monotone, not linear
    c = {r["variant"]: r for r in size_correlation(drops(ROWS), SIZES, "mlm_acc")}
    assert c["sparse-0.9"]["spearman_size"] == pytest.approx(-1.0)  # the smaller the language, the larger the drop
    # log10 sizes 6, 5, 4 against drops 0.2, 0.25, 0.5
    assert c["sparse-0.9"]["pearson_log_size"] == pytest.approx(pearson([6, 5, 4], [0.2, 0.25, 0.5]))


def test_findings_in_words():
    text = "\n".join(findings(drops(ROWS), SIZES, "mlm_acc", sparsity={"sparse-0.3": 0.3, "sparse-0.9": 0.9}))
    assert "sw pays most" in text and "de least" in text
    assert "sparse-0.9: sw loses most (+50.0%)" in text
    # three languages in perfect order: rho -1, yet p = 2 / 3! = 0.33, so no relation is claimed
    assert "Spearman -1.00 over n = 3 languages (no significant relation: p = 0.33 at n = 3; with 3 languages even a " \
           "perfect ordering has p = 0.33" in text and "smaller languages lose more" not in text
    assert "sparse-0.9 -1.00 (p 0.33)" in text
    assert "Mild sparsity (<= 50%) helped: sw at 30% (sparse-0.3, 5.0% better)" in text
    none = "\n".join(findings(drops(ROWS), SIZES, "mlm_acc", sparsity={"sparse-0.3": 0.3}, tolerance=0.1))
    assert "helped no language by more than 10.0%" in none
    assert findings([], SIZES, "mlm_acc") == ["mlm_acc: no variant has results to compare with the uncompressed student."]
    short = "\n".join(findings(drops(ROWS), SIZES, "mlm_acc", sparsity={"sparse-0.3": 0.3}, variant_lines=False))
    assert "sw pays most" in short and "no significant relation" in short and "sparse-0.9: sw loses most" not in short


def test_spearman_p_is_the_exact_permutation_p_value():
    assert spearman_p([1, 2, 3], [10, 20, 30]) == pytest.approx(2 / 6)  # 2 of the 3! orderings reach |rho| = 1
    assert spearman_p([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(2 / 120)
    # rho = 0.8; |rho| >= 0.8 <=> sum d^2 <= 2 or >= 18: identity, 3 adjacent swaps, and their 4 reverses: 8 of 24
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman_p([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(8 / 24)
    assert spearman_p([1, 2, 3, 4, 5, 6], [3, 1, 2, 6, 4, 5]) > 0.05  # rho 0.66: called a relation before, not significant
    assert spearman([1, 2, 3, 4, 5, 6], [3, 1, 2, 6, 4, 5]) >= 0.6
    assert spearman_p(range(10), range(10)) < 0.001  # sampled above 8 points: (0 + 1) / (draws + 1)
    assert math.isnan(spearman_p([1, 2, 3], [1, 1, 1])) and math.isnan(spearman_p([1, 2], [1, 2]))
    assert least_p(3) == pytest.approx(1 / 3) and least_p(4) == pytest.approx(1 / 12) and least_p(5) < 0.05


def test_a_size_correlation_is_called_a_relation_only_when_significant():
    assert relation_words(-1.0, 3, 1 / 3) == ("no significant relation: p = 0.33 at n = 3; with 3 languages even a perfect "
                                              "ordering has p = 0.33")
    assert relation_words(0.66, 6, 0.18) == "no significant relation: p = 0.18 at n = 6"
    assert relation_words(-0.94, 6, 0.017) == "smaller languages lose more; p = 0.017 at n = 6, significant at 0.05"
    assert relation_words(0.9, 5, 0.03).startswith("larger languages lose more")
    assert relation_words(float("nan"), 3, float("nan")) == "no relation can be computed"
    # six languages in perfect order are significant (p = 2 / 720)
    sizes = {f"l{i}": 10 ** i for i in range(1, 7)}
    rows = [row("student", lang, "mlm_acc", 0.5) for lang in sizes] + \
           [row("sparse-0.9", lang, "mlm_acc", 0.5 - 0.3 / i) for i, lang in enumerate(sizes, 1)]
    text = "\n".join(findings(drops(rows), sizes, "mlm_acc"))
    assert "over n = 6 languages (smaller languages lose more; p = 0.003 at n = 6, significant at 0.05" in text


def test_plot_quality_writes_a_png(tmp_path):
    out = plot_quality(ROWS, "mlm_acc", {"student": 0.0, "sparse-0.3": 0.3, "sparse-0.9": 0.9}, tmp_path / "plots" / "acc.png",
                       xlabel="sparsity")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no agreement rows"):
        plot_quality(ROWS, "agreement", {"student": 0.0}, tmp_path / "x.png", xlabel="sparsity")
