"""The extend report: per method, training compute (measured wall time, estimated FLOPs; the mini-model's
one-off alignment apart), the new language's test figures, the change on the old languages, and the
goal line (does a mini-model method reach `full`'s accuracy within a point, at what share of its
compute); results.csv (one row per method and metric) and plots/curve.png (learning curves)."""
from __future__ import annotations

import math
from pathlib import Path

from mergedistill.eval.report import _plt
from mergedistill.tables import markdown_table, write_csv

TOLERANCE = 0.01
"""The goal's margin: within 1 point of `full`'s masked accuracy."""


def goal_rows(results: dict[str, dict]) -> list[list]:
    """For each mini-model method against `full`: the target (full's final curve accuracy - 1 point), the
    first curve point that reaches it, its training FLOPs and seconds, and full's total over them."""
    full = results.get("full")
    rows = []
    if not full or not full["curve"]["values"]:
        return rows
    target = full["curve"]["values"][-1] - TOLERANCE
    for m, r in results.items():
        if m == "full" or r.get("mlm_only") or not r["curve"]["values"]:  # a method without its teacher is no mini-model
            continue
        c = r["curve"]
        i = next((j for j, v in enumerate(c["values"]) if v >= target), None)
        if i is None:
            rows.append([m, target, "not reached", c["values"][-1], "-", "-", "-", "-"])
            continue
        setup = r.get("setup_flops", 0.0)
        rows.append([m, target, c["steps"][i], c["values"][i], f"{c['flops'][i]:.3g}", f"{full['flops'] / c['flops'][i]:.2f}x",
                     f"{full['flops'] / (c['flops'][i] + setup):.2f}x", f"{full['seconds'] / max(c['seconds'][i], 1e-9):.2f}x"])
    return rows


def report_md(header: str, results: dict[str, dict], old: dict[str, dict[str, dict]], exported: str, definitions: str) -> str:
    methods = list(results)
    unit_key = next((k for k in ("pll_per_word", "bits_per_char") if k in results[methods[0]]["test"]), "pll_per_word")
    main = []
    for m in methods:
        r, t = results[m], results[m]["test"]
        o = old.get(m, {})
        main.append([m + (" (exported)" if m == exported else ""), r["trainable"], r["steps"], round(r["seconds"], 1),
                     f"{r['flops']:.3g}", f"{r.get('setup_flops', 0.0):.3g}" if r.get("setup_flops") else "-",
                     t["acc_own"], t["acc_all"], t[unit_key], t.get("agreement", "-"),
                     _max(o, "max_abs_logit_diff"), _max(o, "top1_changed_own"), _max(o, "top1_changed_all"),
                     _max(o, "ce_increase_all")])
    header_main = ["method", "trained parameters", "steps", "train s", "train FLOPs", "setup FLOPs", "test acc (own tokens)",
                   "test acc (all ids)", unit_key.replace("_", " "), "agreement", "old: max |logit diff|",
                   "old: top-1 changed (own)", "old: top-1 changed (all)", "old: CE increase (all, nats)"]
    goal = goal_rows(results)
    per_lang = [[m, lang, c["max_abs_logit_diff"], c["top1_changed_own"], c["top1_changed_all"], c["ce_increase_all"],
                 c["acc_own_before"], c["acc_own_after"], c["acc_all_before"], c["acc_all_after"], c["masked"]]
                for m, langs in old.items() for lang, c in langs.items()]
    parts = [header, "## Methods side by side", markdown_table(header_main, main),
             "## Goal: a mini-model reaches full's accuracy within 1 point, at what share of full's compute",
             markdown_table(["method", "target (full - 1 pt)", "reached at step", "its curve accuracy", "its train FLOPs",
                             "full's FLOPs / these", "incl. setup", "full's seconds / these"], goal)
             if goal else "_no learning curve of `full` and a mini-model method to compare (a valid split is needed)_",
             "## Old languages (extended student vs the original, test split)",
             markdown_table(["method", "language", "max |logit diff|", "top-1 changed (own)", "top-1 changed (all)",
                             "CE increase (all)", "acc own before", "acc own after", "acc all before", "acc all after", "masked"], per_lang),
             "## Learning curves", "![curves](plots/curve.png)", "## What the numbers mean", definitions]
    return "\n\n".join(parts) + "\n"


def _max(changes: dict[str, dict], key: str):
    vals = [c[key] for c in changes.values()]
    return max(vals) if vals else "-"


def write_results(path: Path, results: dict[str, dict], old: dict[str, dict[str, dict]]) -> None:
    rows = []
    for m, r in results.items():
        for k in ("trainable", "steps", "seconds", "flops", "setup_seconds", "setup_flops", "first_loss", "last_loss"):
            if k in r:
                rows.append([m, "train", k, r[k]])
        for k, v in r["test"].items():
            rows.append([m, "test", k, v])
        for step, flops, secs, v in zip(*(r["curve"][c] for c in ("steps", "flops", "seconds", "values"))):
            rows.append([m, f"curve@{step}", "valid_acc_own", v])
            rows.append([m, f"curve@{step}", "flops", flops])
            rows.append([m, f"curve@{step}", "seconds", secs])
    for m, langs in old.items():
        for lang, c in langs.items():
            for k, v in c.items():
                rows.append([m, f"old:{lang}", k, v])
    write_csv(path, ["method", "where", "metric", "value"], rows)


def curve_plot(path: Path, results: dict[str, dict], title: str) -> bool:
    """Valid accuracy against training FLOPs and against seconds, one line per method."""
    if not any(r["curve"]["values"] for r in results.values()):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, r in results.items():
        c = r["curve"]
        if not c["values"]:
            continue
        setup = r.get("setup_flops", 0.0)
        axes[0].plot(c["flops"], c["values"], marker="o", ms=3, label=m)
        if setup:
            axes[0].plot([f + setup for f in c["flops"]], c["values"], ls=":", label=f"{m} + mini-model setup")
        axes[1].plot(c["seconds"], c["values"], marker="o", ms=3, label=m)
    axes[0].set_xlabel("training FLOPs (estimated)")
    axes[1].set_xlabel("training seconds (measured)")
    for ax in axes:
        ax.set_ylabel("valid masked accuracy (own tokens)")
        ax.grid(alpha=0.3)
        if all(math.isfinite(v) for v in ax.get_ylim()):
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
