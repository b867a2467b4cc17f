"""Plots of quality against compression, one line per language (matplotlib, PNG)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable


def plot_quality(rows: Iterable[dict], metric: str, x_of: dict[str, float], out: str | Path, xlabel: str,
                 title: str | None = None, connect: bool = True) -> Path:
    """Line plot of `metric` (y) against x_of[variant] (x: sparsity, size in MB, ...) for each language.
    Rows of variants missing from x_of are left out (e.g. plot the unstructured sweep with the
    uncompressed student at x = 0). connect=False: markers only (variants of different kinds, which a
    line would wrongly present as one series). Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["metric"] == metric and r["variant"] in x_of:
            series[r["language"]].append((float(x_of[r["variant"]]), float(r["value"])))
    if not series:
        raise ValueError(f"plot_quality: no {metric} rows for the variants {sorted(x_of)}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for lang in sorted(series):
        pts = sorted(series[lang])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if connect else "none", label=lang)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per language")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
