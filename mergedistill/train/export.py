"""The exported student: a standard Hugging Face folder (`AutoModelForMaskedLM.from_pretrained`), its
per-teacher tokenizers, languages.json (language -> tokenizer folder), token_ids/<lang>.npy (the student
ids that language's tokenizer can write: predictions for the language are restricted to them) and a
README model card: what it was distilled from, on what, how, how well, and how to use it per language,
with a real sentence of each language. The card names no local path and links nothing outside the folder."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from mergedistill import __version__
from mergedistill.config import RunConfig
from mergedistill.corpus import iter_lines
from mergedistill.fsutil import atomic_dir, write_json_atomic
from mergedistill.models.xmod import is_xmod, model_card_usage, parameter_counts, save_xmod_student, use_language
from mergedistill.tables import markdown_table
from mergedistill.train.mini_head import save_mini_head

EXAMPLE_LINES = 2000
"""Corpus lines searched per language for the card's example sentence."""


def export_student(cfg: RunConfig, student, vocab, vrec: dict, manifest: dict, languages: list[str], metrics: dict,
                   init_info: dict, best: dict | None, out: Path, mini_head=None, exported: dict | None = None,
                   passes: dict[str, float] | None = None) -> Path:
    """<out> (runs/<run>/train/export/): the student as a standard HF folder, the per-teacher
    tokenizers, languages.json, token_ids/<lang>.npy and a README model card; with
    train.mini_head_layer, the secondary head in mini_head/ (`mergedistill extend` reads it)."""
    routing = {lang: cfg.teacher_of(lang) for lang in languages}
    if is_xmod(student):
        use_language(student, languages[0])  # the default module: the first language's
    with atomic_dir(out) as tmp:
        if is_xmod(student):
            save_xmod_student(student, tmp, default_language=languages[0])
        else:
            student.save_pretrained(str(tmp), safe_serialization=True)
        for name in sorted(set(routing.values())):
            shutil.copytree(cfg.vocab_dir / "tokenizers" / name, tmp / "tokenizers" / name)
        if mini_head is not None:
            save_mini_head(mini_head, tmp / "mini_head")
        (tmp / "languages.json").write_text(json.dumps({lang: f"tokenizers/{t}" for lang, t in routing.items()}, indent=2) + "\n")
        (tmp / "token_ids").mkdir()
        allowed = {}
        for lang, name in routing.items():
            allowed[lang] = vocab.producible_ids(name)
            np.save(tmp / "token_ids" / f"{lang}.npy", allowed[lang])
        examples = card_examples(cfg, tmp, routing, allowed)
        card = model_card(cfg, vrec, manifest, languages, metrics, init_info, examples, best, exported=exported, passes=passes)
        if is_xmod(student):
            card = insert_section(card, xmod_card_section(cfg, student, languages), before="## Teachers and routing")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_json_atomic(tmp / "mergedistill.json", {"vocab": vrec["vocab"], "languages": routing, "mergedistill": __version__,
                                                      "best_checkpoint": best, "exported": exported})
    return out


# ---- the card's examples -------------------------------------------------------------------------------
def _masked_variants(line: str, start: int, end: int, mask: str) -> list[str]:
    """`line` with [start, end) replaced by the mask token: as is, and glued to what precedes it (for
    tokenizers whose mask token does not absorb the space before it)."""
    out = [line[:start] + mask + line[end:]]
    if start > 0 and line[start - 1] == " ":
        out.append(line[:start - 1] + mask + line[end:])
    return out


def find_example(tok, allowed: set[int], lines: list[str], by_char: bool) -> tuple[str, str] | None:
    """(a line with one word, or character, replaced by the tokenizer's mask token, what it replaced).
    Preferably the first line of a sensible length where masking a word replaces exactly one token, which
    the language can write; else (small vocabularies) the first where it replaces a few tokens and leaves
    the rest of the line's tokens as they were. Words of three letters or more, not the first, nearest
    the middle first."""
    mask, mask_id = tok.mask_token, tok.mask_token_id
    candidates = []
    for line in lines:
        if by_char:
            if not 8 <= len(line) <= 60:
                continue
            spans = [(i, i + 1) for i, ch in enumerate(line) if ch.isalpha() and 2 <= i < len(line) - 1]
        else:
            if not 5 <= len(line.split()) <= 25:
                continue
            words = list(re.finditer(r"[^\W\d_]+", line))  # runs of letters
            spans = [m.span() for m in words[1:] if len(m.group()) >= 3]
        if spans:
            candidates.append((line, spans))
        if len(candidates) >= 200:
            break
    for single in (True, False):
        for line, spans in candidates:
            ids = tok(line)["input_ids"]
            middle = len(line) / 2
            for start, end in sorted(spans, key=lambda s: abs((s[0] + s[1]) / 2 - middle)):
                for masked in _masked_variants(line, start, end, mask):
                    replaced = _replaced_tokens(tok, ids, tok(masked)["input_ids"], mask_id)
                    if replaced and (len(replaced) == 1) == single and (not single or replaced[0] in allowed):
                        return masked, line[start:end]
    return None


def _replaced_tokens(tok, ids: list[int], m_ids: list[int], mask_id: int) -> list[int] | None:
    """The tokens of `ids` that the one mask token of `m_ids` stands for (the rest equal), or None.
    Word-boundary pieces that some tokenizers put beside an added token (a lone `▁`, decoding to
    nothing) are ignored."""
    if m_ids.count(mask_id) != 1:
        return None
    at = m_ids.index(mask_id)
    empty = lambda i: tok.decode([i]).strip() == ""  # noqa: E731
    before, after = m_ids[:at], m_ids[at + 1:]
    pre = 0
    while pre < min(len(before), len(ids)) and before[pre] == ids[pre]:
        pre += 1
    if pre < len(before) and not all(empty(i) for i in before[pre:]):
        return None
    post = 0
    while post < min(len(after), len(ids) - pre) and after[len(after) - 1 - post] == ids[len(ids) - 1 - post]:
        post += 1
    if post < len(after) and not all(empty(i) for i in after[:len(after) - post]):
        return None
    middle = ids[pre:len(ids) - post]
    return middle or None


def card_examples(cfg: RunConfig, folder: Path, routing: dict[str, str], allowed: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """Language -> (a real sentence of its held-out split, else valid, else train, with a word masked; the word)."""
    from transformers import AutoTokenizer

    out = {}
    toks: dict[str, object] = {}
    for lang, name in routing.items():
        lc = cfg.languages[lang]
        spec = lc.test or lc.valid or lc.train
        if name not in toks:
            toks[name] = AutoTokenizer.from_pretrained(str(folder / "tokenizers" / name))
        lines = list(iter_lines(spec, f"languages.{lang}", EXAMPLE_LINES))
        found = find_example(toks[name], set(allowed[lang].tolist()), lines, lang in cfg.eval.char_languages)
        if found:
            out[lang] = found
    return out


USAGE = '''\
import json

import numpy as np
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

folder = "."  # this folder
model = AutoModelForMaskedLM.from_pretrained(folder).eval()
languages = json.load(open(f"{{folder}}/languages.json"))  # language -> its tokenizer
examples = {examples}
for lang, text in examples.items():
    tokenizer = AutoTokenizer.from_pretrained(f"{{folder}}/{{languages[lang]}}")
    allowed = torch.from_numpy(np.load(f"{{folder}}/token_ids/{{lang}}.npy")).long()  # ids this language writes
    inputs = tokenizer(text, return_tensors="pt"){xmod}
    at = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
    with torch.no_grad():
        logits = model(**inputs).logits[0, at]
    best = allowed[logits[allowed].topk(5).indices].tolist()
    print(lang, "|", text, "->", [tokenizer.decode([i]).strip() or tokenizer.convert_ids_to_tokens(i) for i in best])
'''


XMOD_LINE = "\n    model.set_default_language(model.config.language_modules[lang])  # X-Mod: this language's module"


def usage_code(examples: dict[str, tuple[str, str]], xmod: bool = False) -> str:
    """The card's Python example: fill-mask on each language's sentence, restricted to its ids (an X-Mod
    student switched to each language's module)."""
    lines = "".join(f"    {lang!r}: {text!r},  # {word}\n" for lang, (text, word) in examples.items())
    return USAGE.format(examples="{\n" + lines + "}", xmod=XMOD_LINE if xmod else "")


# ---- the card --------------------------------------------------------------------------------------------
def _source(path: str) -> str:
    """A teacher's source for the card: a hub id as it is, a local folder by its name only."""
    p = Path(path)
    return f"local folder `{p.name}`" if p.is_dir() else f"`{path}` (Hugging Face hub)"


def _init_text(info: dict) -> str:
    parts = ["random" if info.get("init", "random") == "random" else info["init"]]
    for name, layers in (info.get("layers_from") or {}).items():
        parts.append(f"encoder layers {', '.join(map(str, layers))} of {name}")
    rows = info.get("embedding_rows") or {}
    if rows:
        parts.append("embedding rows copied from " + ", ".join(f"{n} ({c:,})" for n, c in rows.items()))
    if info.get("output_bias"):
        parts.append(f"output bias from the {info['output_bias']}")
    return "; ".join(parts)


def _masking_text(m: dict) -> str:
    return (f"{m.get('mask_prob')} of the tokens (80% mask token, 10% random, 10% kept), "
            + ("whole words, " if m.get("whole_word_mask") else "")
            + f"{m.get('dupe_factor', 1)} masked cop{'y' if m.get('dupe_factor', 1) == 1 else 'ies'} per sequence of "
            f"{m.get('seq_len')} tokens")


def model_card(cfg: RunConfig, vrec: dict, manifest: dict, languages: list[str], metrics: dict, init_info: dict,
               examples: dict[str, tuple[str, str]] | None = None, best: dict | None = None, results_md: str | None = None,
               exported: dict | None = None, passes: dict[str, float] | None = None) -> str:
    t, s = cfg.train, cfg.student
    passes = passes or {}
    examples = examples or {}
    rows = []
    for lang in languages:
        tr = manifest["languages"][lang]["splits"].get("train", {})
        rows.append([lang, cfg.teacher_of(lang), f"`tokenizers/{cfg.teacher_of(lang)}`", tr.get("lines", 0), tr.get("corpus_tokens", 0),
                     f"{passes[lang]:.1f}" if lang in passes else "-", _m(metrics, f"val/{lang}/acc"), _m(metrics, f"val/{lang}/agree")])
    teachers = [[n, _source(cfg.teachers[n].path), ", ".join(cfg.languages_of(n)) or "-"] for n in cfg.teachers]
    missing = [lang for lang in languages if lang not in examples]
    lines = [
        f"# {cfg.run}: a multilingual student distilled with mergedistill",
        "",
        f"{'An X-Mod' if s.arch == 'xmod' else 'A BERT'} masked LM ({s.layers} layers, hidden {s.hidden}, {s.heads} heads, vocabulary {vrec['size']:,}) distilled "
        f"from {len(cfg.teachers)} teachers by task-agnostic knowledge distillation (MergeDistill, Khanuja et al., "
        "Findings of ACL 2021): each language learns from the teacher routed to it, through one joint vocabulary.",
        "",
        "## Use it",
        "",
        "Each language is read with the tokenizer of the teacher that served it (`languages.json` says which; those "
        "tokenizers emit the student's ids), and its predictions are restricted to the ids that tokenizer can write "
        "(`token_ids/<language>.npy`): the joint vocabulary holds every teacher's tokens, and an unrestricted "
        "prediction may be another language's token. A fill-mask example on a sentence of each language; run it from "
        "this folder (transformers, torch, numpy):",
        "",
        "```python",
        usage_code(examples, xmod=s.arch == "xmod").rstrip(),
        "```",
        "",
        "With mergedistill installed, `mergedistill.models.exported.load_student(folder, language).fill_mask(text)` does the same.",
        "",
    ]
    if missing:
        lines += [f"(No sentence of {', '.join(missing)} had a word the tokenizer writes as one token: no example for "
                  f"{'it' if len(missing) == 1 else 'them'}.)", ""]
    lines += [
        "## Teachers and routing",
        "",
        markdown_table(["teacher", "source", "languages"], teachers),
        "",
        markdown_table(["language", "teacher", "tokenizer", "train lines", "train tokens", "passes",
                        "valid accuracy", "valid agreement with teacher"], rows),
        "",
        "passes: how many times training read each language's sequences on average (steps x batch x that language's "
        "sampling probability / its sequences); the data stage masks each sequence once, so passes above 1 repeat "
        "the same masked positions.",
        "",
        "## Training",
        "",
        f"- loss: {t.alpha} x KD (top-{manifest['k']} teacher predictions, temperature {t.temperature}) + {1 - t.alpha:g} x MLM, at masked positions",
        f"- {t.max_steps} steps of {t.batch_size} sequences per device (x{t.grad_accum} accumulation), lr {t.lr}, "
        f"warmup {t.warmup_steps}, weight decay {t.weight_decay}, clipping {t.grad_clip}",
        f"- language sampling exponent {t.sampling_alpha}; masking {_masking_text(manifest['masking'])}",
        f"- initialisation: {_init_text(init_info)}",
        f"- vocabulary fingerprint `{vrec['vocab']}`",
    ]
    lines += exported_lines(exported, best)
    lines.append("")
    if results_md:
        lines += ["## Evaluation", "", results_md, ""]
    return "\n".join(lines)


def exported_lines(exported: dict | None, best: dict | None) -> list[str]:
    """The card's lines on which weights these are (best checkpoint or last step, with their scores) and on a
    divergence the run saw (none without `exported`)."""
    out: list[str] = []
    if exported is None:
        return out
    last = exported["last"]
    metric = (best or {}).get("metric")
    last_score = last["val"].get(metric) if metric else None
    if exported["weights"] == "best":
        tail = f"; the last step ({last['step']}) scored {last_score:.4f}" if last_score is not None and exported["step"] != last["step"] else ""
        out.append(f"- these weights: the best checkpoint, step {exported['step']} of {last['step']}, by {metric} "
                   f"({exported['score']:.4f}){tail} (train.export: best)")
    else:
        why = exported.get("note") or "train.export: last"
        best_txt = (f"; the best checkpoint by {metric} was {Path(best['file']).stem} ({best['score']:.4f})"
                    if best and best.get("score") is not None else "")
        out.append(f"- these weights: the last step's ({last['step']}; {why}){best_txt}")
    d = exported.get("divergence")
    if d:
        out.append(f"- **warning: training diverged**: the smoothed training loss rose from {d['best']:.3f} (step {d['best_step']}) "
                   f"to {d['loss']:.3f} at step {d['step']} and stayed up")
    return out


def _m(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.3f}" if key in metrics else "-"


# ---- the X-Mod student's section -------------------------------------------------------------------
def xmod_card_section(cfg: RunConfig, student, languages: list[str]) -> str:
    """The model card's section on an X-Mod student: choosing a language's module (a fill-mask example
    that runs), and its parameters: total, shared, and active per language (shared + its module)."""
    s = cfg.student
    c = parameter_counts(student)
    first = languages[0]
    usage = model_card_usage(student, first, f"tokenizers/{cfg.teacher_of(first)}")
    lm = c["active"]
    rows = [[lang, f"`{m}`", f"{c['modules'][m]:,}", f"{lm[lang]:,}"] for lang, m in
            ((lang, student.config.language_modules[lang]) for lang in languages)]
    return "\n".join([
        usage,
        "",
        "## Parameters",
        "",
        f"{c['total']:,} in all: {c['shared']:,} shared (embeddings, attention, feed-forward, MLM head) and "
        f"{len(c['modules'])} language module(s) (bottleneck hidden / {s.adapter_reduction_factor}, one per layer). "
        "A sequence runs through the shared weights and its language's module only:",
        "",
        markdown_table(["language", "module", "module parameters", "active parameters"], rows),
        "",
        f"Layer-norm settings: ln_before_adapter={s.ln_before_adapter}, adapter_layer_norm={s.adapter_layer_norm}, "
        f"adapter_reuse_layer_norm={s.adapter_reuse_layer_norm}, pre_norm={s.pre_norm}.",
    ])


def insert_section(card: str, section: str, before: str) -> str:
    """`section` inserted before the line `before` of the card, or appended when there is none."""
    at = card.find("\n" + before + "\n")
    if at < 0:
        return card.rstrip() + "\n\n" + section.strip() + "\n"
    return card[:at + 1] + section.strip() + "\n\n" + card[at + 1:]
