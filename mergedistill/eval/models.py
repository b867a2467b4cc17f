"""The models an evaluation compares, loaded once and kept: exported students (`Export`: a HF masked LM
with per-language tokenizers) and teachers; also used by `select` and `ablate`. Models run on
`eval.device` (auto: a GPU when there is one), in `eval.dtype`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergedistill.config import RunConfig, TeacherConfig
from mergedistill.errors import UserError
from mergedistill.fsutil import read_json, sha256_file
from mergedistill.models.mlm import usable_positions
from mergedistill.precision import autocast as precision_autocast
from mergedistill.teachers import load_teacher_model, source_kwargs


def eval_device(cfg: RunConfig) -> torch.device:
    """`eval.device`: `auto` is the first GPU when there is one, else the CPU."""
    dev = cfg.eval.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(dev)


def autocast(cfg: RunConfig):
    """Forward passes in bfloat16 when `eval.dtype` resolves to it (`auto`: where bfloat16 is fast, see
    `mergedistill.precision`; on CPUs with AVX512-BF16 measured 2.4x faster for a 256 x 4 model, with
    metrics that move in the third digit), on the evaluation device; float32 otherwise."""
    return precision_autocast(cfg.eval.dtype, eval_device(cfg).type)


def load_teacher(name: str, tc: TeacherConfig, device: torch.device | str = "cpu"):
    """(masked LM in eval mode on `device`, its tokenizer) of a configured teacher: safe weights,
    no remote code unless the teacher's config allows it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tc.path, **source_kwargs(name, tc))  # hub ids: one attempt, then a message
    return load_teacher_model(name, tc).to(device), tok


@dataclass
class Export:
    """A student exported by the train stage: a HF masked LM with per-language tokenizers."""

    key: str
    folder: Path
    languages: dict[str, str]
    """Language -> its tokenizer folder, relative to `folder`."""
    meta: dict
    device: torch.device | str = "cpu"
    _model: object = None
    _toks: dict = field(default_factory=dict)

    def mismatch_problems(self, cfg, vrec: dict | None) -> list[str]:
        """What makes this export unusable with `cfg`: trained on another vocabulary than vocab/<run>'s
        (`vrec`, its record), or without a tokenizer for one of cfg's languages."""
        problems = []
        fp = self.meta.get("vocab")
        if vrec is not None and fp is not None and fp != vrec["vocab"]:
            problems.append(f"{self.folder}: trained on vocabulary {fp}, but {cfg.vocab_dir} is {vrec['vocab']}; "
                            f"retrain it (`{cfg.command('train')} --force`)")
        missing = [lang for lang in cfg.languages if lang not in self.languages]
        if missing:
            problems.append(f"{self.folder}: no tokenizer for {', '.join(missing)} in languages.json; retrain with this config")
        return problems

    @classmethod
    def open(cls, key: str, folder: Path, problems: list[str], command: str, device: torch.device | str = "cpu") -> "Export | None":
        if not (folder / "config.json").is_file():
            problems.append(f"{folder}: no exported {key} (config.json); run `{command}` first")
            return None
        try:
            langs = read_json(folder / "languages.json")
            meta = read_json(folder / "mergedistill.json") if (folder / "mergedistill.json").is_file() else {}
        except (OSError, ValueError) as e:
            problems.append(f"{folder}: cannot read languages.json ({e}); rerun `{command}`")
            return None
        if not isinstance(langs, dict) or not all(isinstance(v, str) for v in langs.values()) or not isinstance(meta, dict):
            problems.append(f"{folder}: languages.json or mergedistill.json is not what the train stage writes; rerun `{command}`")
            return None
        return cls(key, folder, langs, meta, device)

    def model(self):
        if self._model is None:
            from transformers import AutoModelForMaskedLM

            try:
                self._model = AutoModelForMaskedLM.from_pretrained(str(self.folder)).eval().to(self.device)
            except Exception as e:  # truncated weights (SafetensorError), broken config.json, ...
                raise UserError(f"{self.folder}: cannot load the exported {self.key} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); export it again (`mergedistill train --force`)") from None
        return self._model

    def tokenizer(self, lang: str):
        sub = self.languages[lang]
        if sub not in self._toks:
            from transformers import AutoTokenizer

            self._toks[sub] = AutoTokenizer.from_pretrained(str(self.folder / sub))
        return self._toks[sub]

    def weights_text(self) -> str:
        """Which weights the train stage exported (train.export), for the report's header."""
        ex = self.meta.get("exported")
        if not isinstance(ex, dict):
            return "weights: the last step's (exported before train.export existed)"
        if ex.get("weights") == "best":
            text = f"weights: the best checkpoint, step {ex.get('step')} of {ex.get('last', {}).get('step')}"
            if ex.get("metric") and isinstance(ex.get("score"), (int, float)):
                text += f" ({ex['metric']} {ex['score']:.4f})"
        else:
            text = f"weights: the last step's ({ex.get('step')})"
        d = ex.get("divergence")
        if isinstance(d, dict):
            text += f"; **training diverged** at step {d.get('step')} (smoothed loss {d.get('best', 0):.3f} -> {d.get('loss', 0):.3f})"
        return text

    def fingerprint(self) -> str:
        """Hash of what the evaluation reads (weights, config, tokenizers), not of the README it edits."""
        h = hashlib.sha256()
        files = [p for p in sorted(self.folder.rglob("*")) if p.is_file() and p.name != "README.md"]
        for p in files:
            h.update(f"{p.relative_to(self.folder)}:{sha256_file(p)}".encode())
        return h.hexdigest()[:16]


class Models:
    """Every model the evaluation compares, loaded on first use and kept: `student`, `baseline` and
    `teacher:<name>`."""

    def __init__(self, cfg: RunConfig, student: Export | None, baseline: Export | None):
        self.cfg, self.student, self.baseline = cfg, student, baseline
        self.device = eval_device(cfg)
        self._teachers: dict[str, tuple] = {}

    def teacher(self, name: str):
        """(model, tokenizer) of teacher `name`, loaded on first use."""
        if name not in self._teachers:
            self._teachers[name] = load_teacher(name, self.cfg.teachers[name], self.device)
        return self._teachers[name]

    def model(self, key: str):
        if key.startswith("teacher:"):
            return self.teacher(key[len("teacher:"):])[0]
        return self._export(key).model()

    def tokenizer(self, key: str, lang: str):
        if key.startswith("teacher:"):
            return self.teacher(key[len("teacher:"):])[1]
        return self._export(key).tokenizer(lang)

    def _export(self, key: str) -> Export:
        exp = self.student if key == "student" else self.baseline
        if exp is None:
            raise ValueError(f"no {key} to evaluate")
        return exp

    def teachers_of(self, lang: str) -> list[str]:
        return self.cfg.teachers_of(lang)

    def for_language(self, lang: str) -> list[str]:
        out = ["student"] + (["baseline"] if self.baseline is not None else [])
        return out + [f"teacher:{t}" for t in self.teachers_of(lang)]

    def knows(self, key: str, lang: str) -> bool:
        if key.startswith("teacher:"):
            return key[len("teacher:"):] in self.teachers_of(lang)
        return lang in self._export(key).languages

    def role(self, key: str, lang: str) -> str:
        if not key.startswith("teacher:"):
            return key
        return "routed teacher" if key[len("teacher:"):] == self.cfg.teacher_of(lang) else "candidate teacher"

    def max_len(self, key: str) -> int:
        return min(self.cfg.data.seq_len, usable_positions(self.model(key)))
