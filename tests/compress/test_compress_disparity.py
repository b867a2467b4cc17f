"""Disparity math on hand-made result rows, and the plot."""
from __future__ import annotations

import math

import pytest

from mergedistill.compress.disparity import (
    drops,
    findings,
    pearson,
    ranks,
    relation_words,
    relative_drop,
    size_correlation,
    spearman,
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
    assert "smaller languages lose more" in text
    assert "Mild sparsity (<= 50%) helped: sw at 30% (sparse-0.3, 5.0% better)" in text
    none = "\n".join(findings(drops(ROWS), SIZES, "mlm_acc", sparsity={"sparse-0.3": 0.3}, tolerance=0.1))
    assert "helped no language by more than 10.0%" in none
    assert findings([], SIZES, "mlm_acc") == ["mlm_acc: no variant has results to compare with the uncompressed student."]
    short = "\n".join(findings(drops(ROWS), SIZES, "mlm_acc", sparsity={"sparse-0.3": 0.3}, variant_lines=False))
    assert "sw pays most" in short and "smaller languages lose more" in short and "sparse-0.9: sw loses most" not in short


def test_a_weak_size_correlation_is_not_called_a_relation():
    assert relation_words(-0.09) == "no clear relation" and relation_words(0.2) == "no clear relation"
    assert relation_words(-0.37) == "weakly: smaller languages lose more"
    assert relation_words(0.8) == "larger languages lose more" and relation_words(-1.0) == "smaller languages lose more"


def test_plot_quality_writes_a_png(tmp_path):
    out = plot_quality(ROWS, "mlm_acc", {"student": 0.0, "sparse-0.3": 0.3, "sparse-0.9": 0.9}, tmp_path / "plots" / "acc.png",
                       xlabel="sparsity")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no agreement rows"):
        plot_quality(ROWS, "agreement", {"student": 0.0}, tmp_path / "x.png", xlabel="sparsity")
