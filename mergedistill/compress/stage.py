"""`mergedistill compress`: a compression audit of the exported student, language by language.

From runs/<run>/train/export it builds the variants `compress:` asks for (variants.py), each a folder
under runs/<run>/compress/<variant>/ (export.py), evaluates every variant per language exactly as
`evaluate` does (evaluate.py), measures what each costs side by side with the uncompressed student
(weights, non-zeros, bytes on disk, CPU throughput, held-out loss), and writes the disparity report
(report.py): report.md, results.csv, drops.csv, variants.csv, plots/.

Idempotent and resumable: a variant folder whose recorded inputs match is kept (a killed run loses at
most the variant it was building), scores are cached per variant (compress/eval/), and a rerun with the
same inputs skips the whole stage. `--force` rebuilds and rescores everything.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from mergedistill import __version__
from mergedistill.compress.variants import REFERENCE, Variant, plan_variants, variant_inputs
from mergedistill.config import RunConfig
from mergedistill.configlib import to_dict
from mergedistill.corpus import split_problems
from mergedistill.errors import UserError
from mergedistill.eval.models import Export, eval_device
from mergedistill.fsutil import read_json_or_none, write_json_atomic, write_text_atomic
from mergedistill.lock import exclusive

log = logging.getLogger(__name__)

COMPRESS_FORMAT = 1
HELDOUT_SEQUENCES = 64
"""Valid-shard sequences per language for the held-out loss."""


def compress_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "compress"


@dataclass
class Setup:
    student: Export
    vocab: object
    vrec: dict
    manifest: dict
    languages: list[str]
    variants: list[Variant]


def preflight(cfg: RunConfig) -> Setup:
    """Check every input (the student export, vocabulary, shards, test corpora, what the student's shape
    allows); raise all problems at once."""
    from transformers import AutoConfig

    from mergedistill.data.stage import load_manifest
    from mergedistill.eval.stage import student_export_dir
    from mergedistill.vocab.stage import load_vocab

    problems: list[str] = []
    student = Export.open("student", student_export_dir(cfg), problems, cfg.command("train"))
    vocab = vrec = manifest = None
    try:
        vocab, vrec = load_vocab(cfg)
        manifest = load_manifest(cfg, vrec["vocab"])
    except UserError as e:
        problems += e.problems
    if manifest is not None:
        missing = [lang for lang in cfg.languages if lang not in manifest["languages"]]
        if missing:
            problems.append(f"{cfg.run_dir / 'data'}: no shards for {', '.join(missing)}; rerun `{cfg.command('data')}`")
    problems += split_problems(cfg.languages, "test", "compress evaluates every variant on the held-out test split; add `test: <file>`")
    variants = plan_variants(cfg)
    if student is not None:
        problems += student.mismatch_problems(cfg, vrec)
        try:
            config = AutoConfig.from_pretrained(str(student.folder))
        except Exception as e:  # config.json truncated or edited (transformers raises OSError or ValueError)
            problems.append(f"{student.folder / 'config.json'}: cannot read the exported student's config "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); export it again (`{cfg.command('train')} --force`)")
        else:
            shape = _shape_problems(config, cfg)
            problems += shape or _load_problems(student.folder, cfg)
    if problems:
        raise UserError(problems, header=f"compress: {len(problems)} problem(s); nothing was run:")
    return Setup(student, vocab, vrec, manifest, list(cfg.languages), variants)  # type: ignore[arg-type]


def _load_problems(folder: Path, cfg: RunConfig) -> list[str]:
    """Why the exported student cannot be loaded as every variant is built from it (`load_variant`), if it cannot:
    found before any variant is built, not by the first one."""
    from mergedistill.compress.export import load_variant

    try:
        load_variant(folder)
    except Exception as e:  # truncated weights (SafetensorError), weights of another shape, ...
        return [f"{folder}: cannot load the exported student ({type(e).__name__}: {str(e).splitlines()[0][:200]}); export it "
                f"again (`{cfg.command('train')} --force`)"]
    return []


def _shape_problems(config, cfg: RunConfig) -> list[str]:
    """What the exported student's architecture cannot take, named by config field."""
    c = cfg.compress
    kind = getattr(config, "model_type", "")
    if kind not in ("bert", "roberta", "xlm-roberta"):
        return [f"compress: the student is a {kind!r} model; compression supports BERT-style masked LMs (bert, roberta, xlm-roberta)"]
    problems = []
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    total = heads * layers
    if c.heads and kind != "bert":
        problems.append(f"compress.heads: head pruning needs a BERT student (this one is {kind}); set compress.heads: []")
    for i, f in enumerate(c.heads):
        if round(f * total) > total - layers:
            problems.append(f"compress.heads[{i}]: {f} of the student's {total} heads is {round(f * total)}, but every layer keeps "
                            f"one head: at most {total - layers} can go ({(total - layers) / total:.2f}); drop whole layers with "
                            "compress.layers instead")
    for i, n in enumerate(c.layers):
        if n >= layers:
            problems.append(f"compress.layers[{i}]: cannot drop {n} of the student's {layers} layers; choose 1..{layers - 1}"
                            + (" or set compress.layers: []" if layers == 1 else ""))
    if c.small and c.small_layers and c.small_layers >= layers and not (c.small_hidden or c.small_intermediate):
        log.warning("compress: the smaller student (%d layers) is not smaller than the student (%d layers)", c.small_layers, layers)
    return problems


# ---- the stage ----------------------------------------------------------------------------------------
@exclusive("compress", lambda cfg, **_: compress_dir(cfg))
def run_compress(cfg: RunConfig, *, force: bool = False) -> Path:
    """Build, evaluate and measure the variants `cfg.compress` asks for; write the report. Returns
    runs/<run>/compress. A rerun with the same inputs skips; `force` redoes everything."""
    from mergedistill.compress.evaluate import eval_inputs

    start = time.monotonic()
    s = preflight(cfg)
    out = compress_dir(cfg)
    student_fp = s.student.fingerprint()
    data_fp = {lang: s.manifest["languages"][lang]["inputs"] for lang in s.languages}
    inputs = {v.name: variant_inputs(cfg, v, student_fp, data_fp) for v in s.variants}
    c = cfg.compress
    state_inputs = {"format": COMPRESS_FORMAT, "variants": inputs, "eval": eval_inputs(cfg, s.languages), "student": student_fp,
                    "measure": {k: v for k, v in to_dict(c).items() if k.startswith("throughput_") or k == "mild_sparsity"}}
    state = read_json_or_none(out / "state.json", log)
    if not force and state and state.get("inputs") == state_inputs and (out / "report.md").is_file():
        log.info("compress: %s is complete for these inputs; skipping (--force redoes it)", out)
        return out
    if force and (out / "eval").exists():
        shutil.rmtree(out / "eval")
    log.info("compress: %d variants of %s: %s", len(s.variants), s.student.folder, ", ".join(v.name for v in s.variants))
    others = sorted(p.parent.name for p in out.glob("*/mergedistill.json") if p.parent.name not in inputs)
    if others:
        log.info("compress: %s not in this config's variants: left as they are, not in the report", ", ".join(others))
    build_variants(cfg, s, inputs, out, force)
    rows = evaluate(cfg, s, out)
    costs, how = measure(cfg, s, out)
    write_report(cfg, s, rows, costs, how, out, time.monotonic() - start)
    write_json_atomic(out / "state.json", {"inputs": state_inputs, "seconds": round(time.monotonic() - start, 1),
                                           "mergedistill": __version__})
    log.info("compress: done in %.0f s; report %s", time.monotonic() - start, out / "report.md")
    return out


def build_variants(cfg: RunConfig, s: Setup, inputs: dict[str, dict], out: Path, force: bool) -> None:
    """Build every variant whose folder is missing or was built from other inputs."""
    from mergedistill.compress.build import build_model
    from mergedistill.compress.export import load_variant, recorded_inputs, write_variant
    from mergedistill.compress.importance import distill_loss_fn, taylor_importance
    from mergedistill.compress.shards import IMPORTANCE_SEED, train_batches

    cache: dict = {}

    def importance():
        if "imp" not in cache:
            t0 = time.monotonic()
            c, t = cfg.compress, cfg.train
            batches = train_batches(cfg, s.manifest, s.vrec["vocab"], s.languages, c.importance_batches, t.batch_size, IMPORTANCE_SEED)
            cache["imp"] = taylor_importance(load_variant(s.student.folder), batches, distill_loss_fn(t.alpha, t.temperature))
            log.info("compress: importance of heads, neurons and layers from %d shard batches, %.1f s", len(batches),
                     time.monotonic() - t0)
        return cache["imp"]

    for v in s.variants:
        folder = out / v.name
        if not force and recorded_inputs(folder) == inputs[v.name]:
            log.info("compress: %s is complete; kept", folder)
            continue
        t0 = time.monotonic()
        logs = out / "training" / v.name
        shutil.rmtree(logs, ignore_errors=True)  # the logs of this build only
        model, info = build_model(v, cfg, lambda: load_variant(s.student.folder), importance, logs)
        write_variant(folder, model, s.student, v, inputs[v.name], quantized=v.kind == "int8", extra={"built": info})
        log.info("compress: %s (%s) written to %s in %.1f s", v.name, v.describe(), folder, time.monotonic() - t0)


def _exports(cfg: RunConfig, s: Setup, out: Path, device) -> dict[str, Export]:
    from mergedistill.compress.export import VariantExport

    problems: list[str] = []
    exports = {REFERENCE: VariantExport.open(REFERENCE, s.student.folder, problems, cfg.command("train"), device)}
    for v in s.variants:
        exports[v.name] = VariantExport.open(v.name, out / v.name, problems, cfg.command("compress"), device)
    if problems:  # every folder was just checked or built: one changed since (another process, a disk fault)
        raise UserError(problems, header="compress: a variant folder changed while the stage ran; rerun `mergedistill compress`:")
    return exports  # type: ignore[return-value]


def evaluate(cfg: RunConfig, s: Setup, out: Path):
    from mergedistill.compress.evaluate import evaluate_variants
    from mergedistill.eval.stage import Plan

    plan = Plan(s.student, None, s.vocab, s.vrec, s.languages)
    return evaluate_variants(cfg, plan, _exports(cfg, s, out, eval_device(cfg)), out / "eval")


def measure(cfg: RunConfig, s: Setup, out: Path) -> tuple[list[dict], dict]:
    """Per model (student first): weights, non-zeros, bytes on disk, CPU throughput measured side by side
    (interleaved, same batches), held-out loss on the valid shards; and how the throughput was measured
    (threads, load average before and after, tokens per repeat)."""
    from mergedistill.compress.export import load_variant, loader_of
    from mergedistill.compress.measure import count_nonzero, count_weights, folder_bytes, throughput, weights_bytes
    from mergedistill.compress.shards import THROUGHPUT_SEED, heldout_batches, shard_loss, train_batches

    c, t = cfg.compress, cfg.train
    folders = {REFERENCE: s.student.folder, **{v.name: out / v.name for v in s.variants}}
    models = {name: load_variant(folder) for name, folder in folders.items()}
    batches = train_batches(cfg, s.manifest, s.vrec["vocab"], s.languages, c.throughput_batches, c.throughput_batch_size, THROUGHPUT_SEED)
    threads = torch.get_num_threads()
    if c.throughput_threads:
        torch.set_num_threads(c.throughput_threads)
    try:
        load_before = os.getloadavg()
        t0 = time.monotonic()
        speed = throughput(models, [(b.input_ids, b.attention_mask) for b in batches], repeats=c.throughput_repeats)
        how = {"threads": torch.get_num_threads(), "load_before": load_before, "load_after": os.getloadavg(),
               "seconds": time.monotonic() - t0, "tokens": speed[REFERENCE]["tokens"], "batches": len(batches)}
    finally:
        torch.set_num_threads(threads)
    log.info("compress: throughput measured side by side in %.0f s (%d threads, load average %.1f before, %.1f after)",
             how["seconds"], how["threads"], load_before[0], how["load_after"][0])
    heldout = heldout_batches(cfg, s.manifest, s.vrec["vocab"], s.languages, HELDOUT_SEQUENCES)
    kinds = {v.name: v for v in s.variants}
    ref = speed[REFERENCE]
    ref_bytes = weights_bytes(folders[REFERENCE])
    costs = []
    for name, model in models.items():
        v = kinds.get(name)
        wb = weights_bytes(folders[name])
        costs.append({
            "variant": name, "kind": v.kind if v else "reference", "amount": v.amount if v else 0.0, "recovered": bool(v and v.recovered),
            "description": v.describe() if v else "the uncompressed student", "weights": count_weights(model),
            "nonzero": count_nonzero(model), "weights_bytes": wb, "folder_bytes": folder_bytes(folders[name]),
            "size_ratio": wb / ref_bytes, "tokens_per_s": speed[name]["tokens_per_s"],
            "speed_ratio": speed[name]["tokens_per_s"] / ref["tokens_per_s"], "tokens_per_cpu_s": speed[name]["tokens_per_cpu_s"],
            "cpu_speed_ratio": speed[name]["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"],
            "heldout_loss": shard_loss(model, heldout, t.alpha, t.temperature),
            "loader": loader_of(model, v is not None and v.kind == "int8"),
        })
    return costs, how


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(cfg: RunConfig, s: Setup, rows, costs: list[dict], m: dict, out: Path, seconds: float) -> None:
    from mergedistill.compress.report import drop_rows, report_md, write_plots, write_tables
    from mergedistill.fsutil import atomic_dir

    c = cfg.compress
    dropped = drop_rows(rows)
    sizes = {lang: float(s.manifest["languages"][lang]["splits"]["train"]["tokens"]) for lang in s.languages}
    write_tables(out, rows, dropped, costs)
    with atomic_dir(out / "plots") as tmp:
        plots = write_plots(rows, dropped, s.variants, costs, tmp)
    e = cfg.eval
    header = "\n".join([
        f"# Compression audit: {cfg.run}",
        "",
        f"- student: `{s.student.folder}`; {len(s.variants)} variants in `{out}/<variant>/` (standard HF folders unless "
        "`load with` says otherwise)",
        f"- recovery: {c.recovery_steps} steps" + (f" of KD + MLM on the run's shards (lr {c.recovery_lr if c.recovery_lr is not None else cfg.train.lr / 10:g}, "
                                                   f"gradual pruning over the first {c.prune_until:.0%}, masks every {c.prune_frequency} steps)"
                                                   if c.recovery_steps else " (one-shot only)")
        + f"; embeddings {'pruned too' if c.include_embeddings else 'kept dense'}, MLM head dense layer "
          f"{'pruned too' if c.include_head else 'kept dense'}; importance from {c.importance_batches} shard batches",
        f"- evaluation as `evaluate`: {e.max_lines if e.max_lines is not None else 'all'} test lines per language for masked accuracy "
        f"(mask rate {e.mask_prob}, seed {e.seed}), {e.pll_lines} for PLL; dtype {e.dtype}",
        f"- throughput: {_cpu_name()}, threads: {m['threads']}, fp32 eager; {m['batches']} batches x {c.throughput_batch_size} "
        f"sequences ({m['tokens']:,} tokens) per repeat, median of {c.throughput_repeats} interleaved repeats; load average "
        f"(1 min) {m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after (shared cores make absolute figures noisy; "
        "the ratios are measured side by side)",
        f"- {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {seconds:.0f} s, mergedistill {__version__}",
    ])
    write_text_atomic(out / "report.md", report_md(header, rows, dropped, s.variants, costs, s.languages, sizes, c.mild_sparsity, plots))
