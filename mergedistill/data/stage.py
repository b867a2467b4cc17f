"""`mergedistill data`: route each language to its teacher, tokenize, pack, mask, run the teacher once
and keep its top-k at masked positions as student ids, in Arrow shards with a manifest.

Work is cut into shards of `data.shard_lines` corpus lines. A shard depends only on its lines, the
teacher, the vocabulary and the data settings (its masking stream is seeded by language, split, shard
and copy), so shards can be built in any order, by any process, and a shard that exists is final:
  - resumable: a shard is written atomically, its record last; a rerun skips complete shards;
  - parallel: shard i goes to process i mod world, where world = launcher ranks x local workers
    (torchrun's RANK/WORLD_SIZE, or SLURM_PROCID/SLURM_NTASKS); no process needs another's memory;
  - the manifest is written by whichever process finds every shard complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergedistill import __version__
from mergedistill.config import RunConfig
from mergedistill.configlib import to_dict
from mergedistill.corpus import check_corpus, corpus_fingerprint, iter_lines
from mergedistill.data.packing import SpecialLayout, pack_documents
from mergedistill.data.shards import COLUMNS, SHARD_FORMAT, corrupt_message, id_dtype, is_intact, read_record, shard_record, write_shard
from mergedistill.errors import UserError
from mergedistill.fsutil import read_json_record, remove_leftovers, temp_tag, write_json_atomic, writing
from mergedistill.lock import exclusive
from mergedistill.precision import torch_dtype
from mergedistill.progress import Progress
from mergedistill.teachers import (
    TeacherTokenizer,
    load_all_tokenizers,
    model_fingerprint,
)
from mergedistill.tokens import UNK_ID
from mergedistill.vocab.joint import JointVocab
from mergedistill.vocab.stage import load_vocab

log = logging.getLogger(__name__)
DATA_FORMAT = 3
"""2: sequences packed in the teacher's own pair layout (RoBERTa-style teachers: `</s></s>` between lines);
3: shard format 3 (the teacher's log-normalisers, unmasked positions labelled)."""


@dataclass(frozen=True)
class Shard:
    lang: str
    split: str
    index: int
    path: Path
    inputs: str  # hash of everything the shard's content depends on

    @property
    def label(self) -> str:
        return f"{self.lang}/{self.split}/{self.index:05d}"


def rank_and_world() -> tuple[int, int]:
    """This process's rank among the launcher's processes (torchrun, SLURM), or (0, 1)."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(r) is not None and os.environ.get(w) is not None:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def data_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "data"


# ---- planning ----------------------------------------------------------------------------------
def _language_inputs(cfg: RunConfig, lang: str, vrec: dict, tok_fp: str, model_fp: str) -> str:
    d = cfg.data
    lc = cfg.languages[lang]
    inputs = {
        "format": DATA_FORMAT, "vocab": vrec["vocab"], "teacher": cfg.teacher_of(lang), "tokenizer": tok_fp, "model": model_fp,
        "seq_len": d.seq_len, "mask_prob": d.mask_prob, "top_k": d.top_k, "whole_word_mask": d.whole_word_mask,
        "lse_temperatures": list(d.lse_temperatures), "unmasked_kd_prob": d.unmasked_kd_prob,
        "dupe_factor": d.dupe_factor, "seed": d.seed, "shard_lines": d.shard_lines, "teacher_dtype": d.teacher_dtype,
        "max_lines": cfg.max_lines_of(lang),
        "corpora": {s: corpus_fingerprint(getattr(lc, s)) for s in d.splits if getattr(lc, s)},
    }
    if d.valid_max_sequences is not None:  # only when set: shards built before the setting existed stay valid
        inputs["valid_max_sequences"] = d.valid_max_sequences
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _count_lines(spec: str, where: str, max_lines: int | None) -> int:
    return sum(1 for _ in iter_lines(spec, where, max_lines))


def plan(cfg: RunConfig, vrec: dict, teachers: dict[str, TeacherTokenizer]) -> tuple[list[Shard], dict]:
    """Every shard of this run, in a fixed order, and per-(language, split) line counts."""
    out_dir = data_dir(cfg)
    model_fps = {name: model_fingerprint(name, cfg.teachers[name]) for name in {cfg.teacher_of(lang) for lang in cfg.languages}}
    shards: list[Shard] = []
    lines: dict[str, dict[str, int]] = {}
    for lang, lc in cfg.languages.items():
        teacher = cfg.teacher_of(lang)
        inputs = _language_inputs(cfg, lang, vrec, teachers[teacher].fingerprint, model_fps[teacher])
        for split in cfg.data.splits:
            spec = getattr(lc, split)
            if not spec:
                continue
            n = _count_lines(spec, f"languages.{lang}.{split}", cfg.max_lines_of(lang))
            lines.setdefault(lang, {})[split] = n
            for i in range(math.ceil(n / cfg.data.shard_lines)):
                shards.append(Shard(lang, split, i, out_dir / lang / split / f"shard-{i:05d}.arrow", inputs))
    return shards, {"lines": lines, "models": model_fps}


def _complete(shard: Shard) -> dict | None:
    """The record of a shard that is complete and intact for these inputs, or None (then it is built)."""
    rec = read_record(shard.path)
    if rec is None or rec.get("inputs") != shard.inputs:
        return None
    if not is_intact(shard.path, rec):
        if shard.path not in _REPORTED:
            _REPORTED.add(shard.path)
            log.warning("data: %s; rebuilding it", corrupt_message(shard.path).split("; rerun")[0])
        return None
    return rec


_REPORTED: set[Path] = set()


STORE = Path("runs") / ".shards"
"""Content-addressed shard store shared by the runs of one working folder: a shard is filed under the
hash of everything it depends on, so another run (e.g. an ablation variant) whose language keeps
its teacher, vocabulary and data settings reuses it instead of running the teacher again."""


def _stored(shard: Shard) -> Path:
    return STORE / shard.inputs / shard.lang / shard.split / shard.path.name


def _link(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a shard and its record; the record last, as when writing."""
    import shutil

    for a, b in ((src, dst), (src.with_suffix(".json"), dst.with_suffix(".json"))):
        tmp = b.with_name(f".{b.name}.{temp_tag()}.link")
        with writing(b, tmp):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            try:
                os.link(a, tmp)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
                    raise
                shutil.copy2(a, tmp)
            os.replace(tmp, b)


def reuse_from_store(shards: list[Shard]) -> int:
    """Complete missing shards from the store; returns how many."""
    n = 0
    for s in shards:
        if _complete(s) is None:
            src = _stored(s)
            rec = shard_record(src)
            if rec is not None and rec.get("inputs") == s.inputs:
                _link(src, s.path)
                n += 1
    return n


def file_in_store(shards: list[Shard]) -> None:
    for s in shards:
        if _complete(s) is not None and shard_record(_stored(s)) is None:
            _link(s.path, _stored(s))


# ---- one shard ----
def teacher_layout(t: TeacherTokenizer) -> SpecialLayout:
    """How the teacher's own tokenizer lays out a pair of texts (its post-processor), which is how its
    sequences are packed; `[CLS] a [SEP] b [SEP]` for a tokenizer that adds no special tokens itself."""
    layout = SpecialLayout.of(t.backend)
    if not layout.prefix and not layout.suffix:
        sp = t.special_ids()
        layout = SpecialLayout([sp["cls"]], [sp["sep"]], [sp["sep"]])
    return layout


# ---- one shard -----------------------------------------------------------------------------------
def unmasked_kd_positions(excluded, prob: float, seed: int):
    """(S, L) bool: each position not `excluded` (specials, padding, masked positions) drawn with probability
    `prob`, from its own seeded stream (so the masking stream is the same whatever `prob` is)."""
    import torch

    if prob <= 0.0:
        return torch.zeros_like(excluded)
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(excluded.shape, generator=gen) < prob) & ~excluded


class ShardBuilder:
    """Builds the shards of one teacher in one process (the teacher model loaded once)."""

    def __init__(self, cfg: RunConfig, vocab: JointVocab, vrec: dict, t: TeacherTokenizer, model, device):
        import torch

        self.cfg, self.vocab, self.vrec, self.t, self.model, self.device = cfg, vocab, vrec, t, model, device
        self.idmap = vocab.idmaps[t.name].astype(np.int64)
        self.ids_dtype = id_dtype(vocab.size)
        sp = t.special_ids()
        self.cls, self.sep, self.mask, self.pad = sp["cls"], sp["sep"], sp["mask"], sp["pad"]
        self.layout = teacher_layout(t)
        specials = {self.cls, self.sep, self.mask, self.pad}
        self.special_ids = torch.tensor(sorted(specials))
        n_model = model.get_output_embeddings().weight.shape[0]
        allowed = np.zeros(max(n_model, len(self.idmap)), dtype=bool)
        allowed[: len(self.idmap)] = self.idmap >= 0
        allowed[list(specials)] = False
        self.allowed = torch.from_numpy(allowed[:n_model])
        self.candidates = torch.from_numpy(np.flatnonzero(allowed[: len(self.idmap)]))  # random replacements

    def build(self, shard: Shard, lines: list[str], prog: Progress) -> dict:
        import torch

        from mergedistill.data.masking import mask_tokens
        from mergedistill.data.topk import topk_at_masked

        d = self.cfg.data
        enc = self.t.backend.encode_batch(lines, add_special_tokens=False)
        words = [[-1 if w is None else w for w in e.word_ids] for e in enc] if d.whole_word_mask else None
        packed = pack_documents([e.ids for e in enc], d.seq_len, self.layout, self.pad, words)
        corpus_tokens = int(sum(len(e.ids) for e in enc))
        if shard.split == "valid" and d.valid_max_sequences is not None and len(packed) > d.valid_max_sequences:
            packed = packed.head(d.valid_max_sequences)  # what validation reads; the rest would be labelled unread
            corpus_tokens = int((packed.attention_mask & ~torch.isin(packed.input_ids.long(), self.special_ids)).sum())
        copies = d.dupe_factor if shard.split == "train" else 1
        rows: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
        temps = tuple(float(t) for t in d.lse_temperatures)
        n_tok = int(packed.attention_mask.sum())
        if len(packed):
            lengths = packed.attention_mask.sum(1).numpy()  # (S,)
            ids = packed.input_ids.long()  # (S, seq_len), padded with the teacher's pad id
            special = torch.isin(ids, self.special_ids) | ~packed.attention_mask
            order = np.argsort(-lengths, kind="stable")  # batch by length: little padding
            for copy in range(copies):
                gen = torch.Generator().manual_seed(_seed(d.seed, shard.lang, shard.split, shard.index, copy))
                mb = mask_tokens(ids, special, self.mask, self.candidates, d.mask_prob, gen,
                                 word_ids=packed.word_ids.long() if d.whole_word_mask else None)
                labelled = mb.selected | unmasked_kd_positions(special | mb.selected, d.unmasked_kd_prob,
                                                               _seed(d.seed, shard.lang, shard.split, shard.index, copy, "kd"))
                top_ids = [None] * len(packed)
                top_val = [None] * len(packed)
                top_lse = [None] * len(packed)
                for b in range(0, len(packed), d.batch_size):
                    idx = order[b: b + d.batch_size]
                    w = int(lengths[idx].max())
                    x = mb.input_ids[idx, :w]  # (B, w)
                    sel = labelled[idx, :w]
                    att = (torch.arange(w)[None, :] < torch.from_numpy(lengths[idx])[:, None]).long()
                    t_ids, t_val, *t_lse = topk_at_masked(self.model, x.to(self.device), att.to(self.device), sel.to(self.device),
                                                          d.top_k, self.allowed, lse_temperatures=temps)
                    counts = sel.sum(1).tolist()
                    t_lse = t_lse[0].cpu().numpy() if t_lse else np.zeros((len(t_ids), 0), dtype=np.float32)  # none stored
                    t_ids, t_val = t_ids.cpu().numpy(), t_val.cpu().numpy()
                    start = 0
                    for j, c in zip(idx.tolist(), counts):
                        top_ids[j], top_val[j], top_lse[j] = t_ids[start: start + c], t_val[start: start + c], t_lse[start: start + c]
                        start += c
                for i in range(len(packed)):
                    n = lengths[i]
                    pos = mb.selected[i, :n].nonzero().squeeze(1).numpy()
                    rows["kd_positions"].append((labelled[i, :n] & ~mb.selected[i, :n]).nonzero().squeeze(1).numpy().astype(np.int16))
                    student_in = self.idmap[mb.input_ids[i, :n].numpy()]
                    rows["input_ids"].append(np.where(student_in < 0, UNK_ID, student_in))
                    rows["positions"].append(pos.astype(np.int16))
                    gold = self.idmap[ids[i, pos].numpy()]
                    rows["labels"].append(np.where(gold < 0, UNK_ID, gold))
                    tk = self.idmap[top_ids[i]]  # allowed ids are kept ids: all >= 0, except -inf padding
                    tv = top_val[i]
                    rows["topk_ids"].append(np.where(tk < 0, UNK_ID, tk).reshape(-1))
                    rows["topk_logits"].append(tv.reshape(-1))
                    rows["topk_lse"].append(top_lse[i].reshape(-1))
                prog.update(0, int(n_tok))
        masked = int(sum(len(p) for p in rows["positions"]))
        kd_only = int(sum(len(p) for p in rows["kd_positions"]))
        record = {
            "inputs": shard.inputs, "vocab": self.vrec["vocab"], "language": shard.lang, "split": shard.split,
            "teacher": self.t.name, "lines": len(lines), "sequences": len(rows["input_ids"]), "corpus_tokens": corpus_tokens,
            "tokens": int(sum(len(r) for r in rows["input_ids"])), "masked": masked, "kd_only": kd_only, "k": d.top_k,
            "lse_temperatures": list(temps),
            "id_dtype": self.ids_dtype.name,
        }
        record["bytes"] = write_shard(shard.path, rows, self.ids_dtype, record)
        prog.update(1)
        return record


# ---- a process's share ---------------------------------------------------------------------------
def _device(cfg: RunConfig) -> str:
    import torch

    dev = cfg.data.device
    if dev == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
        return "cpu"
    return dev


def _dtype(cfg: RunConfig, device: str):
    import torch

    return torch_dtype(cfg.data.teacher_dtype, torch.device(device).type)


def process_shards(cfg: RunConfig, mine: list[Shard], threads: int | None = None) -> list[dict]:
    """Build `mine` (shards of any languages) in this process, teacher by teacher."""
    import torch

    from mergedistill.teachers import load_teacher_model

    if threads:
        torch.set_num_threads(threads)
    vocab, vrec = load_vocab(cfg)
    teachers = load_all_tokenizers(cfg)
    device = _device(cfg)
    records = []
    by_teacher: dict[str, list[Shard]] = {}
    for s in mine:
        by_teacher.setdefault(cfg.teacher_of(s.lang), []).append(s)
    for name, shards in by_teacher.items():
        model = load_teacher_model(name, cfg.teachers[name], dtype=_dtype(cfg, device)).to(device)
        builder = ShardBuilder(cfg, vocab, vrec, teachers[name], model, device)
        wanted: dict[tuple[str, str], dict[int, Shard]] = {}
        for s in shards:
            wanted.setdefault((s.lang, s.split), {})[s.index] = s
        for (lang, split), todo in wanted.items():
            prog = Progress(f"data {lang}/{split} ({name}, {device})", log, total=len(todo), unit="shards")
            n = cfg.data.shard_lines
            spec = getattr(cfg.languages[lang], split)
            block: list[str] = []
            current = 0  # the shard (line block) being read
            for i, line in enumerate(iter_lines(spec, f"languages.{lang}.{split}", cfg.max_lines_of(lang))):
                if i // n != current:
                    if current in todo:
                        records.append(builder.build(todo[current], block, prog))
                    block, current = [], i // n
                    if current > max(todo):
                        break
                if current in todo:
                    block.append(line)
            if current in todo and block:
                records.append(builder.build(todo[current], block, prog))
            log.info("%s", prog.line())
        del model
    return records


# ---- the stage -----------------------------------------------------------------------------------
def _preflight(cfg: RunConfig) -> None:
    problems = []
    for lang, lc in cfg.languages.items():
        for split in cfg.data.splits:
            spec = getattr(lc, split)
            if spec:
                p = check_corpus(spec, f"languages.{lang}.{split}")
                if p:
                    problems.append(p)
    if problems:
        raise UserError(problems, header=f"data: {len(problems)} problem(s); nothing was written:")


def write_manifest(cfg: RunConfig, shards: list[Shard], vrec: dict, info: dict) -> dict | None:
    """If every shard is complete, write manifest.json (deterministic content) and return it."""
    records = {}
    for s in shards:
        rec = _complete(s)
        if rec is None:
            return None
        records[s] = rec
    langs: dict[str, dict] = {}
    for s, rec in records.items():
        entry = langs.setdefault(s.lang, {"teacher": cfg.teacher_of(s.lang), "inputs": s.inputs, "splits": {}})
        sp = entry["splits"].setdefault(s.split, {"shards": [], "lines": 0, "sequences": 0, "tokens": 0, "corpus_tokens": 0, "masked": 0,
                                                   "kd_only": 0, "bytes": 0})
        sp["shards"].append(str(s.path.relative_to(data_dir(cfg))))
        for key in ("lines", "sequences", "tokens", "corpus_tokens", "masked", "kd_only", "bytes"):
            sp[key] += rec[key]
    total_bytes = sum(r["bytes"] for r in records.values())
    total_corpus = sum(r["corpus_tokens"] for r in records.values())
    manifest = {
        "format": DATA_FORMAT, "shard_format": SHARD_FORMAT, "vocab": vrec["vocab"], "vocab_size": vrec["size"],
        "id_dtype": id_dtype(vrec["size"]).name, "k": cfg.data.top_k, "seed": cfg.data.seed,
        "lse_temperatures": list(cfg.data.lse_temperatures), "unmasked_kd_prob": cfg.data.unmasked_kd_prob,
        "masking": {"mask_prob": cfg.data.mask_prob, "whole_word_mask": cfg.data.whole_word_mask,
                    "dupe_factor": cfg.data.dupe_factor, "seq_len": cfg.data.seq_len},
        "teachers": {t: {"tokenizer": vrec["teachers"][t]["tokenizer"], "model": info["models"][t]} for t in sorted(info["models"])},
        "data": to_dict(cfg.data),
        "languages": langs,
        "totals": {"shards": len(records), "bytes": total_bytes, "corpus_tokens": total_corpus,
                   "bytes_per_corpus_token": total_bytes / max(total_corpus, 1)},
        "mergedistill": __version__,
    }
    write_json_atomic(data_dir(cfg) / "manifest.json", manifest)
    return manifest


def verify_shards(cfg: RunConfig, shards: list[Shard], vrec: dict) -> Path:
    """`data --verify`: every shard of the plan complete, built for these inputs and intact (its content
    hashed against its record), and the manifest readable; raises UserError listing what is not."""
    start = time.monotonic()
    problems = []
    for s in shards:
        rec = read_record(s.path)
        if rec is None:
            problems.append(f"{s.path}: missing or incomplete")
        elif rec.get("inputs") != s.inputs:
            problems.append(f"{s.path}: built for other inputs (corpus, teacher, vocabulary or data settings changed)")
        elif not is_intact(s.path, rec):
            problems.append(corrupt_message(s.path).split("; rerun")[0])
    try:
        load_manifest(cfg, vrec["vocab"])
    except UserError as e:
        problems += e.problems
    if problems:
        raise UserError(problems, header=f"data --verify: {len(problems)} problem(s); `{cfg.command('data')}` rebuilds what "
                                         "is missing or corrupt:")
    size = sum(s.path.stat().st_size for s in shards)
    log.info("data --verify: all %d shards in %s are complete and intact (%.1f MB hashed in %.1f s)", len(shards),
             data_dir(cfg), size / 1e6, time.monotonic() - start)
    return data_dir(cfg)


@exclusive("data", lambda cfg, **_: data_dir(cfg))
def run_data(cfg: RunConfig, *, force: bool = False, verify: bool = False) -> Path | None:
    """Build the shards this config needs that are not complete yet, then the manifest. `force` rebuilds
    every shard; `verify` builds nothing: it checks every shard's content against its record."""
    start = time.monotonic()
    vocab, vrec = load_vocab(cfg)
    teachers = load_all_tokenizers(cfg)
    changed = [n for n, t in teachers.items() if vrec["teachers"].get(n, {}).get("tokenizer") != t.fingerprint]
    if changed:
        raise UserError(f"data: the tokenizer of teacher(s) {', '.join(changed)} changed since {cfg.vocab_dir} was built; "
                        "rerun `mergedistill vocab` first")
    _preflight(cfg)
    shards, info = plan(cfg, vrec, teachers)
    out = data_dir(cfg)
    if verify:
        return verify_shards(cfg, shards, vrec)
    remove_leftovers(STORE, log, exclusive=False)  # shared by the runs: only the debris of dead processes
    if force:
        (out / "manifest.json").unlink(missing_ok=True)  # it describes the shards about to be rebuilt
        for s in shards:
            s.path.with_suffix(".json").unlink(missing_ok=True)
    else:
        reused = reuse_from_store(shards)
        if reused:
            log.info("data: %d shards reused from %s (same teacher, vocabulary, corpus and settings)", reused, STORE)
    pending = [s for s in shards if _complete(s) is None]
    if not pending:
        file_in_store(shards)
        manifest = write_manifest(cfg, shards, vrec, info)
        log.info("data: all %d shards in %s are complete for these inputs; skipping (--force rebuilds)", len(shards), out)
        return out if manifest else None
    rank, world = rank_and_world()
    workers = max(1, cfg.data.workers)
    log.info("data: %d shards, %d to build; process %d of %d%s", len(shards), len(pending), rank, world,
             f", {workers} local workers" if workers > 1 else "")
    # shard i of the full plan goes to global process i mod (world x workers): stable across reruns
    slots = world * workers
    pending_set = set(pending)
    share = [[s for i, s in enumerate(shards) if i % slots == rank * workers + w and s in pending_set] for w in range(workers)]
    if workers == 1:
        process_shards(cfg, share[0])
    else:
        from mergedistill.parallel import run_tasks

        threads = max(1, (os.cpu_count() or 1) // workers)
        run_tasks([(lambda part=part: len(process_shards(cfg, part, threads))) for part in share], workers=workers)
    file_in_store(pending)
    manifest = write_manifest(cfg, shards, vrec, info)
    if manifest is None:
        log.info("data: this process's shards are done; other processes are still building theirs (the last one writes the manifest)")
        return None
    t = manifest["totals"]
    log.info("data: %d shards, %s corpus tokens, %.1f MB on disk: %.2f bytes per corpus token (k=%d, %.0f%% masked); %.1f s",
             t["shards"], f"{t['corpus_tokens']:,}", t["bytes"] / 1e6, t["bytes_per_corpus_token"], cfg.data.top_k,
             100 * cfg.data.mask_prob, time.monotonic() - start)
    return out


def load_manifest(cfg: RunConfig, vocab_fp: str) -> dict:
    """The data stage's manifest, refused if it was built for another vocabulary."""
    path = data_dir(cfg) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path}: no manifest; run `{cfg.command('data')}` first")
    m = read_json_record(path, cfg.command("data"))
    if not isinstance(m.get("languages"), dict) or not isinstance(m.get("k"), int):
        raise UserError(f"{path}: incomplete manifest (no languages or k: edited or truncated?); rerun `{cfg.command('data')}`")
    if m.get("format") != DATA_FORMAT:
        raise UserError(f"{path}: shards in data format {m.get('format')}, written by an older mergedistill; this version reads "
                        f"format {DATA_FORMAT}: rerun `mergedistill data` to rebuild them")
    if m.get("vocab") != vocab_fp:
        raise UserError(f"{path}: shards were built for vocabulary {m.get('vocab')}, but {vocab_fp} is this run's; "
                        "rerun `mergedistill data` to rebuild them")
    return m
