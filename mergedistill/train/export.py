"""The exported student: a standard Hugging Face folder (`AutoModelForMaskedLM.from_pretrained`), its
per-teacher tokenizers, languages.json (language -> tokenizer folder) and a README model card: what it
was distilled from, on what, how, and how well."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mergedistill import __version__
from mergedistill.config import RunConfig
from mergedistill.fsutil import atomic_dir, write_json_atomic
from mergedistill.tables import markdown_table
from mergedistill.train.mini_head import save_mini_head


def export_student(cfg: RunConfig, student, vrec: dict, manifest: dict, languages: list[str], metrics: dict,
                   init_info: dict, best: str | None, out: Path, mini_head=None) -> Path:
    """<out> (runs/<run>/train/export/): the student as a standard HF folder, the per-teacher
    tokenizers, languages.json (language -> tokenizer folder) and a README model card; with
    train.mini_head_layer, the secondary head in mini_head/ (`mergedistill extend` reads it)."""
    routing = {lang: cfg.teacher_of(lang) for lang in languages}
    with atomic_dir(out) as tmp:
        student.save_pretrained(str(tmp), safe_serialization=True)
        for name in sorted(set(routing.values())):
            shutil.copytree(cfg.vocab_dir / "tokenizers" / name, tmp / "tokenizers" / name)
        if mini_head is not None:
            save_mini_head(mini_head, tmp / "mini_head")
        (tmp / "languages.json").write_text(json.dumps({lang: f"tokenizers/{t}" for lang, t in routing.items()}, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, vrec, manifest, languages, metrics, init_info), encoding="utf-8")
        write_json_atomic(tmp / "mergedistill.json", {"vocab": vrec["vocab"], "languages": routing, "mergedistill": __version__,
                                                      "best_checkpoint": best or None})
    return out


def model_card(cfg: RunConfig, vrec: dict, manifest: dict, languages: list[str], metrics: dict, init_info: dict,
               results_md: str | None = None) -> str:
    t, s = cfg.train, cfg.student
    first = languages[0]
    tok_dir = f"tokenizers/{cfg.teacher_of(first)}"
    rows = []
    for lang in languages:
        tr = manifest["languages"][lang]["splits"].get("train", {})
        rows.append([lang, cfg.teacher_of(lang), f"`tokenizers/{cfg.teacher_of(lang)}`", tr.get("lines", 0), tr.get("corpus_tokens", 0),
                     _m(metrics, f"val/{lang}/acc"), _m(metrics, f"val/{lang}/agree")])
    teachers = [[n, f"`{cfg.teachers[n].path}`", ", ".join(cfg.languages_of(n)) or "-"] for n in cfg.teachers]
    lines = [
        f"# {cfg.run}: a multilingual student distilled with mergedistill",
        "",
        f"A BERT masked LM ({s.layers} layers, hidden {s.hidden}, {s.heads} heads, vocabulary {vrec['size']:,}) distilled "
        f"from {len(cfg.teachers)} teachers by task-agnostic knowledge distillation (MergeDistill, Khanuja et al., "
        "Findings of ACL 2021): each language learns from the teacher routed to it, through one joint vocabulary.",
        "",
        "## Use it",
        "",
        "Text must be tokenized with the tokenizer of the teacher that served its language (`languages.json` says which); "
        "those tokenizers emit the student's ids.",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
        "",
        "model = AutoModelForMaskedLM.from_pretrained(\"PATH_TO_THIS_FOLDER\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"PATH_TO_THIS_FOLDER/{tok_dir}\")  # language '{first}'",
        "fill = pipeline(\"fill-mask\", model=model, tokenizer=tokenizer)",
        "print(fill(f\"... {tokenizer.mask_token} ...\"))",
        "```",
        "",
        "## Teachers and routing",
        "",
        markdown_table(["teacher", "source", "languages"], teachers),
        "",
        markdown_table(["language", "teacher", "tokenizer", "train lines", "train tokens", "valid accuracy",
                        "valid agreement with teacher"], rows),
        "",
        "## Training",
        "",
        f"- loss: {t.alpha} x KD (top-{manifest['k']} teacher predictions, temperature {t.temperature}) + {1 - t.alpha:g} x MLM, at masked positions",
        f"- {t.max_steps} steps of {t.batch_size} sequences per device (x{t.grad_accum} accumulation), lr {t.lr}, "
        f"warmup {t.warmup_steps}, weight decay {t.weight_decay}, clipping {t.grad_clip}",
        f"- language sampling exponent {t.sampling_alpha}; masking {manifest['masking']}",
        f"- initialisation: {init_info}",
        f"- vocabulary fingerprint `{vrec['vocab']}`",
        "",
    ]
    if results_md:
        lines += ["## Evaluation", "", results_md, ""]
    return "\n".join(lines)


def _m(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.3f}" if key in metrics else "-"
