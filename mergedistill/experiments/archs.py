"""`mergedistill ablate --archs`: the curse-of-multilinguality comparison, a dense student against an X-Mod
student of the same shared body.

Both students are the run's config with `student.arch` set (`bert`, `xmod`; X-Mod settings from the
config when it is an X-Mod run, else the defaults): the same shards (the data stage's store hands the
second run the first one's), the same body (layers, hidden, heads, intermediate), initialisation, steps,
batches and seed. The student of the run's own arch is the run itself (runs/<run>/train, reused when
complete); the other trains in runs/<run>-<arch>/. Both are scored on each language's test split with
evaluate's intrinsic metrics (masked-token accuracy, agreement with the routed teacher, PLL per word or
bits per char), each language through its own module; parameters total and active per language; and the
training step time, measured side by side: the two exported students train on the same real batches
from the shards, interleaved, in this process (medians), so that load from other processes hits both
alike. Output: runs/<run>/archs/{report.md, results.csv, archs.png, state.json}; a rerun with the same
students and evaluation settings skips.
"""
from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from mergedistill.config import XMOD_FIELDS, RunConfig
from mergedistill.configlib import to_dict
from mergedistill.corpus import corpus_fingerprint
from mergedistill.errors import UserError
from mergedistill.eval.models import Export, Models, eval_device
from mergedistill.experiments.variants import as_variant, train_variant
from mergedistill.fsutil import atomic_dir, read_json, write_json_atomic
from mergedistill.tables import dict_rows, markdown_table, write_csv

log = logging.getLogger(__name__)

ARCHS = {"dense": "bert", "xmod": "xmod"}
"""Column name -> student.arch."""
TIMED_STEPS = 30
"""Training steps timed per student (after 3 warm-up steps), in rounds of 5, alternating students."""


def arch_config(cfg: RunConfig, arch: str) -> RunConfig:
    """The run's config with `student.arch = arch`: the run itself when that is its arch, else
    runs/<run>-<arch>/ on the run's vocabulary (and shards). A dense copy drops the X-Mod settings."""
    v = copy.deepcopy(cfg)
    v.student = replace(v.student, arch=arch, **({} if arch == "xmod" else copy.deepcopy(XMOD_FIELDS)))
    return as_variant(v, cfg, arch) if arch != cfg.student.arch else v


class ArchModels(Models):
    """evaluate's model pool with the compared students (`dense`, `xmod`) in place of student/baseline."""

    def __init__(self, cfg: RunConfig, exports: dict[str, Export]):
        super().__init__(cfg, None, None)
        self.exports = exports

    def _export(self, key: str) -> Export:
        return self.exports[key]

    def for_language(self, lang: str) -> list[str]:
        return list(self.exports) + [f"teacher:{t}" for t in self.teachers_of(lang)]


def run_archs(cfg: RunConfig) -> Path:
    """Train (or reuse) the dense and the X-Mod student, score both, write runs/<run>/archs/."""
    from mergedistill.eval.stage import Plan, intrinsic
    from mergedistill.vocab.stage import load_vocab, run_vocab

    start = time.monotonic()
    missing = [f"languages.{lang}: the comparison scores students on the test split; add `test: <file>`"
               for lang, lc in cfg.languages.items() if not lc.test]
    if missing:
        raise UserError(missing, header=f"ablate --archs: {len(missing)} problem(s); nothing was run:")
    run_vocab(cfg)
    configs = {name: arch_config(cfg, arch) for name, arch in ARCHS.items()}
    exports: dict[str, Path] = {}
    train_s: dict[str, float | None] = {}
    for name, v in configs.items():
        log.info("ablate --archs: the %s student (%s) in runs/%s", name, v.student.arch, v.run)
        exports[name] = train_variant(v)
        state = v.run_dir / "train" / "state.json"
        train_s[name] = read_json(state).get("seconds") if state.is_file() else None
    vocab, vrec = load_vocab(cfg)
    languages = list(cfg.languages)

    # scores: evaluate's intrinsic metrics, the routed teacher as reference (candidates left out)
    scfg = copy.deepcopy(cfg)
    for lc in scfg.languages.values():
        lc.candidates = []
    problems: list[str] = []
    opened = {n: Export.open(n, p, problems, v.command("train"), eval_device(cfg)) for (n, p), v in
              zip(exports.items(), configs.values())}
    if problems:
        raise UserError(problems)
    out = cfg.run_dir / "archs"
    inputs = {"students": {n: e.fingerprint() for n, e in opened.items()}, "eval": to_dict(cfg.eval),  # type: ignore[union-attr]
              "test": {lang: corpus_fingerprint(lc.test) for lang, lc in cfg.languages.items()}, "timed_steps": TIMED_STEPS}
    if (out / "report.md").is_file() and (out / "state.json").is_file() and read_json(out / "state.json").get("inputs") == inputs:
        log.info("ablate --archs: %s is complete for these students; skipping", out / "report.md")
        return out
    models = ArchModels(scfg, opened)  # type: ignore[arg-type]
    plan = Plan(opened["dense"], None, vocab, vrec, languages)  # type: ignore[arg-type]
    from mergedistill.eval.models import autocast

    rows = []
    with autocast(cfg):
        for lang in languages:
            rows += intrinsic(scfg, models, plan, lang)
    step = step_times(cfg, {n: models.model(n) for n in ARCHS}, configs, languages, TIMED_STEPS)
    with atomic_dir(out) as tmp:
        summary = write_outputs(tmp, configs["xmod"], rows, step, train_s, languages)
        write_json_atomic(tmp / "state.json", {"inputs": inputs, **summary, "seconds": round(time.monotonic() - start, 1)})
    log.info("ablate --archs: done in %.0f s; table at %s", time.monotonic() - start, out / "report.md")
    return out


# ---- step time ----------------------------------------------------------------------------------------
def step_times(cfg: RunConfig, students: dict, configs: dict[str, RunConfig], languages: list[str],
               steps: int = TIMED_STEPS) -> dict[str, float]:
    """Median seconds of one training step (masked-position forward, KD + MLM loss, backward, AdamW
    step) of each student, on copies of the exported weights, with the same batches from the run's
    training shards (train.batch_size sequences, the training precision), students alternating every 5
    steps after 3 warm-up steps each."""
    from mergedistill.data.stage import load_manifest
    from mergedistill.precision import lightning_precision
    from mergedistill.train.batches import SampledBatches, sampling_probs
    from mergedistill.train.module import DistillModule
    from mergedistill.train.optim import adamw
    from mergedistill.train.stage import ShardDataModule
    from mergedistill.models.xmod import grouped_routing, is_xmod
    from mergedistill.vocab.stage import load_vocab

    vocab, vrec = load_vocab(cfg)
    manifest = load_manifest(cfg, vrec["vocab"])
    dm = ShardDataModule(cfg, manifest, vrec["vocab"], languages)
    sources = dm._sources("train")
    t = cfg.train
    batches = SampledBatches(sources, sampling_probs(dm.sizes(), t.sampling_alpha), t.batch_size, 0, 1, t.seed, manifest["k"])
    data = [batches.batch(b) for b in range(steps + 3)]
    device = eval_device(cfg)
    bf16 = lightning_precision(cfg.train.precision, cfg.train.accelerator).startswith("bf16")
    runs = {}
    for name, model in students.items():
        student = copy.deepcopy(model).float().to(device).train()
        if is_xmod(student):
            grouped_routing(student)
        module = DistillModule(configs[name], student, languages, vocab=vocab).to(device)
        runs[name] = (module, adamw(student.named_parameters(), t.lr, t.weight_decay))

    def one(name: str, batch) -> float:
        module, opt = runs[name]
        batch = batch.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            _, parts = module.losses(batch)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in runs}
    for name in runs:
        for b in data[:3]:
            one(name, b)
    for r in range(0, steps, 5):
        for name in runs:
            times[name] += [one(name, b) for b in data[3 + r: 3 + min(r + 5, steps)]]
    out = {n: statistics.median(ts) for n, ts in times.items()}
    log.info("ablate --archs: step time %s", ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in out.items()))
    return out


# ---- outputs --------------------------------------------------------------------------------------------
def write_outputs(out: Path, cfg: RunConfig, rows: list, step: dict[str, float], train_s: dict, languages: list[str]) -> dict:
    """results.csv (one row per arch, language, metric), report.md (one table) and archs.png, from
    evaluate's rows (models `dense`, `xmod`, the routed teachers) and the step times; `cfg`: the X-Mod
    student's config. Returns the summary (wins in masked accuracy, step-time ratio)."""
    from mergedistill.eval.report import Table, fmt

    t = Table(rows)
    names = list(ARCHS)
    csv_rows = [{"arch": r.model.removeprefix("teacher:") if r.model.startswith("teacher:") else r.model,
                 "role": r.role, "language": r.language, "metric": r.metric, "value": r.value, "n": r.n}
                for r in rows if r.model in names or r.role == "routed teacher"]
    csv_rows += [{"arch": n, "role": n, "language": "all", "metric": "step_s", "value": step[n], "n": TIMED_STEPS} for n in names]
    header = ["arch", "role", "language", "metric", "value", "n"]
    write_csv(out / "results.csv", header, dict_rows(csv_rows, header))

    def v(lang: str, model: str, metric: str):
        return t.value("intrinsic", lang, model, metric)

    def teacher(lang: str) -> str:
        return f"teacher:{cfg.teacher_of(lang)}"

    wins = 0
    body = []
    for lang in languages:
        pll = "bits_per_char" if lang in cfg.eval.char_languages else "pll_per_word"
        acc = {n: v(lang, n, "mlm_acc") for n in names}
        ahead = None not in acc.values() and acc["xmod"] > acc["dense"]
        wins += ahead
        body.append([lang, cfg.teacher_of(lang),
                     *[fmt(acc[n]) for n in names], fmt(v(lang, teacher(lang), "mlm_acc")), "yes" if ahead else "no",
                     *[fmt(v(lang, n, "agreement")) for n in names],
                     *[fmt(v(lang, n, pll), "fix") for n in names], fmt(v(lang, teacher(lang), pll), "fix"),
                     "bits/char" if pll == "bits_per_char" else "nats/word",
                     *[fmt(v(lang, n, "params_active"), "int") for n in names]])
    totals = {n: next((r.value for r in rows if r.model == n and r.metric == "params_total"), None) for n in names}
    ratio = step["xmod"] / step["dense"]
    cols = ["language", "teacher", "masked acc: dense", "X-Mod", "teacher", "X-Mod ahead", "agreement: dense", "X-Mod",
            "PLL: dense", "X-Mod", "teacher", "PLL unit", "active params: dense", "X-Mod"]
    s = cfg.student
    md = [
        f"# Dense vs X-Mod student: {cfg.vocab_run or cfg.run}",
        "",
        f"Both students: {s.layers} layers x hidden {s.hidden} ({s.heads} heads, feed-forward {s.intermediate}), "
        f"init `{s.init}`, {cfg.train.max_steps} steps of {cfg.train.batch_size} sequences from the same shards, seed "
        f"{cfg.train.seed}. The X-Mod student adds a module per language in every layer "
        f"(bottleneck hidden / {s.adapter_reduction_factor}). Held-out test splits, evaluate's metrics (each language through its "
        "own module); the routed teacher for reference. PLL: nats per word (nearer 0 is better) or bits per char (lower "
        "is better).",
        "",
        markdown_table(cols, body),
        "",
        f"- X-Mod ahead of the dense student in masked accuracy on **{wins} of {len(languages)}** languages.",
        f"- parameters: dense {fmt(totals['dense'], 'int')} (all active for every language), X-Mod {fmt(totals['xmod'], 'int')} in all.",
        f"- training step time (side by side on the same {TIMED_STEPS} batches, median): dense {step['dense'] * 1e3:.1f} ms, "
        f"X-Mod {step['xmod'] * 1e3:.1f} ms: **{ratio:.2f}x**.",
        "- training wall time (the runs as they trained, validation and checkpoints included; machine load varies): "
        + ", ".join(f"{n} {train_s[n]:.0f} s" if train_s.get(n) else f"{n} -" for n in names) + ".",
        "",
        "![dense vs X-Mod](archs.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    _plot(out / "archs.png", t, cfg, languages)
    return {"wins": wins, "languages": len(languages), "step_ratio": ratio}


def _plot(path: Path, t, cfg: RunConfig, languages: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(ARCHS)
    fig, axes = plt.subplots(1, 3, figsize=(4.2 * 3, 3.6))
    x = np.arange(len(languages))
    for ax, (title, metric) in zip(axes, (("masked-token accuracy", "mlm_acc"), ("agreement with the teacher", "agreement"),
                                          ("pseudo-perplexity per word (per char: *)", "pppl"))):
        seen = []
        for i, n in enumerate(names):
            vals = [t.value("intrinsic", lang, n, metric) for lang in languages]
            vals = [np.nan if val is None or not np.isfinite(val) else val for val in vals]
            seen += [val for val in vals if not np.isnan(val)]
            ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=n)
        ax.set_xticks(x, [f"{lang}*" if metric == "pppl" and lang in cfg.eval.char_languages else lang for lang in languages])
        ax.set_title(title, fontsize=10)
        if metric == "pppl" and seen and min(seen) > 0:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.vocab_run or cfg.run}: dense vs X-Mod student (held-out test)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
