"""Loading teacher tokenizers from local folders or hub ids, with errors that say which teacher, which
folder, and what to do.

Fast path: a local folder with `tokenizer.json` whose config names its special tokens is read
directly (no transformers import, which costs seconds). Anything else (hub ids, folders with only a
SentencePiece model or vocab.txt, special tokens left to a class's defaults) goes through
`AutoTokenizer`, which converts slow tokenizers and knows every model class's defaults.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mergedistill.config import RunConfig, TeacherConfig, looks_like_hub_id
from mergedistill.errors import UserError
from mergedistill.tokens import Family, detect_family, piece_key

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
    "sentencepiece.model", "vocab.json",
)
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class TeacherTokenizer:
    """A teacher's tokenizer as the vocabulary stage needs it."""

    name: str
    source: str
    """The folder or hub id it came from."""
    tj: dict
    """Its parsed tokenizer.json."""
    specials: dict[str, str]
    """transformers special-token attributes (cls_token, mask_token, ...) -> token string."""
    fingerprint: str
    """Hash of its tokenizer.json."""
    model_max_length: int = 512
    extra_specials: list[str] = field(default_factory=list)
    tokenizer_file: Path | None = None
    """Its tokenizer.json on disk, when read from a local folder."""

    @cached_property
    def family(self) -> Family:
        return detect_family(self.tj, f"teachers.{self.name}")

    @cached_property
    def backend(self):
        """The `tokenizers.Tokenizer` (built on first use: encoding is only needed for corpora)."""
        from tokenizers import Tokenizer

        if self.tokenizer_file is not None:
            return Tokenizer.from_file(str(self.tokenizer_file))
        return Tokenizer.from_str(json.dumps(self.tj, ensure_ascii=False))

    @cached_property
    def size(self) -> int:
        """Ids run from 0 to size - 1 (model vocabulary and added tokens)."""
        vocab = self.tj["model"]["vocab"]
        top = max(vocab.values()) if isinstance(vocab, dict) else len(vocab) - 1
        return max([top] + [a["id"] for a in self.tj.get("added_tokens", [])]) + 1

    def roles(self) -> dict[str, str]:
        """Teacher special-token string -> student role ([CLS], ...)."""
        s = self.specials
        pairs = [
            ("[PAD]", s.get("pad_token")), ("[UNK]", s.get("unk_token")), ("[CLS]", s.get("cls_token") or s.get("bos_token")),
            ("[SEP]", s.get("sep_token") or s.get("eos_token")), ("[MASK]", s.get("mask_token")),
        ]
        out: dict[str, str] = {}
        for role, tok in pairs:
            if tok is not None and tok not in out:
                out[tok] = role
        return out

    def keys(self) -> list[str]:
        """Canonical key of every teacher id (see tokens.py); index = teacher id."""
        keys: list[str | None] = [None] * self.size
        vocab = self.tj["model"]["vocab"]
        fam = self.family
        if isinstance(vocab, dict):
            for tok, i in vocab.items():
                keys[i] = piece_key(tok, fam)
        else:  # Unigram: a list of [piece, score]
            for i, (tok, _) in enumerate(vocab):
                keys[i] = piece_key(tok, fam)
        roles = self.roles()
        for added in self.tj.get("added_tokens", []):
            content = added["content"]
            if content in roles:
                keys[added["id"]] = "S" + roles[content]
            else:
                keys[added["id"]] = ("S" if added.get("special") else "A") + content
        missing = [i for i, k in enumerate(keys) if k is None]
        if missing:
            raise UserError(f"teachers.{self.name}: tokenizer ids {missing[:5]} have no token (holes in its "
                            "vocabulary); re-save the tokenizer with consecutive ids")
        if len(set(keys)) != len(keys):
            seen: dict[str, int] = {}
            for i, k in enumerate(keys):
                if k in seen:
                    raise UserError(f"teachers.{self.name}: tokens {seen[k]} and {i} mean the same thing "
                                    f"({k[1:]!r}); mergedistill needs a tokenizer whose tokens are distinct")
                seen[k] = i
        return keys  # type: ignore[return-value]

    def special_ids(self) -> dict[str, int]:
        """The teacher's ids for the student roles: pad, unk, cls, sep, mask (pad falls back to sep)."""
        tok = {role: t for t, role in self.roles().items()}
        pad = tok.get("[PAD]", tok["[SEP]"])
        return {"pad": self.token_id(pad), "unk": self.token_id(tok["[UNK]"]), "cls": self.token_id(tok["[CLS]"]),
                "sep": self.token_id(tok["[SEP]"]), "mask": self.token_id(tok["[MASK]"])}

    def token_id(self, token: str) -> int:
        """Teacher id of a token string (added/special tokens first, then the model vocabulary)."""
        for added in self.tj.get("added_tokens", []):
            if added["content"] == token:
                return added["id"]
        vocab = self.tj["model"]["vocab"]
        if isinstance(vocab, dict):
            return vocab[token]
        return next(i for i, (piece, _) in enumerate(vocab) if piece == token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Teacher ids of each text, without special tokens."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_specials(folder: Path) -> tuple[dict[str, str], list[str], int | None]:
    """Special tokens named in tokenizer_config.json / special_tokens_map.json."""
    specials: dict[str, str] = {}
    extra: list[str] = []
    max_len = None
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        p = folder / fname
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not valid JSON ({e}); fix or delete it") from None
        for attr in SPECIAL_ATTRS:
            tok = _token_str(data.get(attr))
            if tok:
                specials[attr] = tok
        for key in ("additional_special_tokens", "extra_special_tokens"):
            vals = data.get(key)
            if isinstance(vals, list):
                extra += [t for t in (_token_str(v) for v in vals) if t and t not in extra]
        if isinstance(data.get("model_max_length"), int) and data["model_max_length"] < 10**9:
            max_len = data["model_max_length"]
    return specials, extra, max_len


def _fast_path(name: str, folder: Path) -> TeacherTokenizer | None:
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        return None
    specials, extra, max_len = _read_specials(folder)
    if "mask_token" not in specials or "unk_token" not in specials:
        return None  # left to the class's defaults: ask transformers
    raw = tj_path.read_bytes()
    try:
        tj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"teachers.{name}: {tj_path} is not valid JSON ({e}); re-save the tokenizer") from None
    if not isinstance(tj, dict) or "model" not in tj:
        raise UserError(f"teachers.{name}: {tj_path} is not a tokenizers file (no `model`); re-save the tokenizer")
    return TeacherTokenizer(
        name=name, source=str(folder), tj=tj, specials=specials, extra_specials=extra,
        fingerprint=hashlib.sha256(raw).hexdigest()[:16], model_max_length=max_len or 512, tokenizer_file=tj_path,
    )


def _transformers_path(name: str, tc: TeacherConfig, local: bool) -> TeacherTokenizer:
    from transformers import AutoTokenizer

    where = f"teachers.{name}"
    try:
        hf = AutoTokenizer.from_pretrained(tc.path, revision=tc.revision, trust_remote_code=tc.trust_remote_code, use_fast=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is wrong
        hint = ("it is not a local folder, and the hub could not be reached or has no such model: point the "
                "path at a local folder" if not local else "its tokenizer files could not be read")
        raise UserError(f"{where}: cannot load the tokenizer from {tc.path!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]} ({hint})") from None
    if not getattr(hf, "is_fast", False) or not hasattr(hf, "backend_tokenizer"):
        raise UserError(f"{where}: the tokenizer at {tc.path!r} has no fast (tokenizers) version; convert it with transformers first")
    raw = hf.backend_tokenizer.to_str()
    specials = {a: str(getattr(hf, a)) for a in SPECIAL_ATTRS if getattr(hf, a, None) is not None}
    extra = [str(t) for t in getattr(hf, "additional_special_tokens", None) or []]
    max_len = hf.model_max_length if hf.model_max_length < 10**9 else 512
    return TeacherTokenizer(
        name=name, source=tc.path, tj=json.loads(raw), specials=specials, extra_specials=extra,
        fingerprint=hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16], model_max_length=max_len,
    )


def load_teacher_tokenizer(name: str, tc: TeacherConfig) -> TeacherTokenizer:
    """Load teacher `name`'s tokenizer, raising UserError with the teacher's name and the fix."""
    where = f"teachers.{name}"
    folder = Path(tc.path)
    local = folder.is_dir()
    if not local and not looks_like_hub_id(tc.path):
        raise UserError(f"{where}.path: no folder {tc.path!r}; build it (demo: `make teachers`) or give a hub model id")
    if local and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{where}: folder {tc.path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "save one into it with tokenizer.save_pretrained(folder)")
    t = (_fast_path(name, folder) if local and not tc.trust_remote_code else None) or _transformers_path(name, tc, local)
    if not t.specials.get("mask_token"):
        raise UserError(f"{where}: the tokenizer at {tc.path!r} has no mask token, so it cannot belong to a masked LM; "
                        "set `mask_token` in its tokenizer_config.json (e.g. \"[MASK]\" or \"<mask>\")")
    t.family  # noqa: B018 -- classify now, so an unsupported tokenizer fails before any work
    log.debug("%s: %s tokenizer, %d tokens, from %s", name, t.family.name, t.size, tc.path)
    return t


def load_all_tokenizers(cfg: RunConfig) -> dict[str, TeacherTokenizer]:
    """Every teacher's tokenizer; all problems are collected and raised together."""
    out: dict[str, TeacherTokenizer] = {}
    problems: list[str] = []
    for name, tc in cfg.teachers.items():
        try:
            out[name] = load_teacher_tokenizer(name, tc)
        except UserError as e:
            problems += e.problems
    if problems:
        raise UserError(problems, header=f"{len(problems)} teacher problem(s); nothing was written:")
    return out


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def model_fingerprint(name: str, tc: TeacherConfig) -> str:
    """Identity of a teacher's weights: hashes of its config and weight files (local folders), or the
    hub id and revision."""
    folder = Path(tc.path)
    if not folder.is_dir():
        return hashlib.sha256(f"{tc.path}@{tc.revision}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            from mergedistill.fsutil import sha256_file

            h.update(f"{f.name}:{sha256_file(f)}".encode())
    return h.hexdigest()[:16]


def load_teacher_model(name: str, tc: TeacherConfig, dtype=None):
    """The teacher's masked-LM (AutoModelForMaskedLM), in eval mode. Weights load safely: safetensors
    when present (else torch's weights_only loader), no remote code unless the config allows it.
    A folder whose weights lack the MLM head is refused (its predictions would be random)."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    where = f"teachers.{name}"
    folder = Path(tc.path)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"{where}: folder {tc.path!r} has no config.json; save the model there with model.save_pretrained(folder)")
        if not any((folder / f).is_file() for f in WEIGHT_FILES):
            raise UserError(f"{where}: folder {tc.path!r} has no weights ({', '.join(WEIGHT_FILES)})")
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            tc.path, revision=tc.revision, trust_remote_code=tc.trust_remote_code, output_loading_info=True,
            **({"dtype": dtype} if dtype is not None else {}),
        )
    except Exception as e:
        raise UserError(f"{where}: cannot load a masked LM from {tc.path!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise UserError(f"{where}: the weights at {tc.path!r} lack {len(missing)} tensors of the masked-LM model "
                        f"(e.g. {missing[0]}): is it a model without its MLM head? Use a checkpoint saved with its head")
    return model.eval()
