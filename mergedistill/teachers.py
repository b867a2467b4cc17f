"""Loading teacher tokenizers and models from local folders or hub ids, with errors that say which
teacher, which folder, and what to do.

A teacher's tokenization is, by definition, what `AutoTokenizer.from_pretrained(teacher)` returns:
transformers rebuilds parts of many tokenizers from tokenizer_config.json when it loads them (ALBERT's
lowercasing and accent stripping, CamemBERT's extra special tokens, BERT's `do_lower_case`), so the raw
tokenizer.json is not the reference. Fast tokenizers are read from the backend transformers built; slow
ones of the vocab-file WordPiece family (slow_tokenizers.py) are used as they are; other slow-only
tokenizers are refused with what to do instead.

Hub ids: one attempt to reach the hub per id (HF_HUB_OFFLINE honoured: the local cache only), then a
message, instead of the hub client's retries on every file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
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
    """A teacher's tokenizer as the vocabulary and data stages need it."""

    name: str
    source: str
    """The folder or hub id it came from."""
    tj: dict
    """The tokenizer as a parsed tokenizer.json: the backend transformers built (fast tokenizers), or
    the vocabulary and added tokens of a slow vocab-file WordPiece tokenizer."""
    specials: dict[str, str]
    """transformers special-token attributes (cls_token, mask_token, ...) -> token string."""
    fingerprint: str
    """Hash of the tokenizer (its backend serialization, or a slow tokenizer's settings and vocabulary)."""
    model_max_length: int = 512
    extra_specials: list[str] = field(default_factory=list)
    reference: object = field(default=None, repr=False)
    """What AutoTokenizer.from_pretrained returned: the definition of this teacher's tokenization."""

    @property
    def slow(self) -> bool:
        """A slow (Python) tokenizer: no `tokenizers` backend, encoded through slow_tokenizers.SlowBackend."""
        return self.reference is not None and not getattr(self.reference, "is_fast", True)

    @cached_property
    def family(self) -> Family:
        return detect_family(self.tj, f"teachers.{self.name}")

    @cached_property
    def backend(self):
        """What encodes text into teacher ids: the `tokenizers.Tokenizer` transformers built, or a
        SlowBackend with the same interface for slow tokenizers."""
        from tokenizers import Tokenizer

        if self.slow:
            from mergedistill.slow_tokenizers import SlowBackend

            return SlowBackend(self.reference)
        # the teacher's tokenization, never padded or truncated (a tokenizer.json may be saved with either on)
        if self.reference is not None:
            return plain_backend(self.reference)
        return plain_backend(Tokenizer.from_str(json.dumps(self.tj, ensure_ascii=False)))

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
        """Canonical key of every teacher id (see tokens.py); index = teacher id. Added tokens and the
        tokens the tokenizer names as special (CamemBERT's <unk>NOTUSED is also a piece) are keyed by
        role or content, so that they stay whole, unpruned, in the joint vocabulary."""
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
        named = set(self.extra_specials)
        for added in self.tj.get("added_tokens", []):
            content = added["content"]
            if content in roles:
                keys[added["id"]] = "S" + roles[content]
            else:
                keys[added["id"]] = ("S" if added.get("special") or content in named else "A") + content
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


def plain_backend(tokenizer) -> "Tokenizer":
    """The tokenizer's Rust backend with no truncation or padding. transformers leaves the backend
    truncating after a call with `truncation=True`, and a tokenizer.json may be saved with padding or
    truncation on (a tokenizer saved after such a call): encoding with either would count pads or cut long
    texts. A copy keeps the caller's tokenizer as it was."""
    from tokenizers import Tokenizer

    if not isinstance(tokenizer, Tokenizer) and not getattr(tokenizer, "is_fast", True):
        from mergedistill.slow_tokenizers import slow_backend

        return slow_backend(tokenizer)  # a slow (Python) tokenizer, behind the same interface
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


# ---- where a teacher's files come from -----------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    flag = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=None)
def _hub_access(path: str, revision: str | None) -> tuple[bool, str | None]:
    """(use the local cache only, problem) for a hub id, after at most one request to the hub."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cached = isinstance(try_to_load_from_cache(path, "config.json", revision=revision), str)
    also = (f"(it is not a folder here either: no {path!r} under {os.getcwd()}); point `path` at a local folder holding "
            "the model, or")
    if _offline():
        if cached:
            return True, None
        return False, (f"HF_HUB_OFFLINE is set and {path!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                       f"{also} download it where the hub is reachable (`hf download {path}`) and copy the cache here")
    try:
        get_hf_file_metadata(hf_hub_url(path, "config.json", revision=revision), timeout=10, retry_on_errors=False)
        return False, None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        gated = isinstance(e, GatedRepoError)
        return False, (f"the hub has no model {path!r}" + (" that you may read (gated: log in with `hf auth login`)" if gated else "")
                       + f" {also} fix the id")
    except RevisionNotFoundError:
        return False, f"the hub model {path!r} has no revision {revision!r}; fix `revision`"
    except Exception as e:  # no network: httpx errors, OSError, timeouts
        if cached:
            log.warning("%s: the hub cannot be reached (%s); using the copy in the local cache", path, type(e).__name__)
            return True, None
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return False, (f"the Hugging Face hub cannot be reached ({type(e).__name__}: {first}) and {path!r} is not in the "
                       f"local cache {also} fetch it where the hub is reachable, or set HF_HUB_OFFLINE=1 to use the cache only")


def source_kwargs(name: str, tc: TeacherConfig) -> dict:
    """Keyword arguments for transformers' from_pretrained of teacher `name`: its revision, remote-code
    setting, and `local_files_only` when its files must come from the cache. Raises UserError for a
    missing folder or an unreachable hub id (one attempt per id and process)."""
    where = f"teachers.{name}"
    kwargs = {"revision": tc.revision, "trust_remote_code": tc.trust_remote_code}
    if Path(tc.path).is_dir():
        return kwargs
    if not looks_like_hub_id(tc.path):
        raise UserError(f"{where}.path: no folder {tc.path!r} (resolved against {os.getcwd()}); build or copy it there "
                        "(the demo's teachers: `make teachers`), or give a hub model id such as `xlm-roberta-base`")
    local_only, problem = _hub_access(tc.path, tc.revision)
    if problem:
        raise UserError(f"{where}.path: {problem}")
    return {**kwargs, "local_files_only": True} if local_only else kwargs


# ---- tokenizers ---------------------------------------------------------------------------------------
def _extra_specials(hf) -> list[str]:
    vals = getattr(hf, "extra_special_tokens", None) or getattr(hf, "additional_special_tokens", None) or []
    if isinstance(vals, dict):
        vals = list(vals.values())
    out: list[str] = []
    for v in vals:
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if str(t) not in out:
                out.append(str(t))
    return out


def _refuse_slow(where: str, tc: TeacherConfig, hf) -> UserError:
    from mergedistill.slow_tokenizers import describe

    return UserError(
        f"{where}: the tokenizer at {tc.path!r} is {describe(hf)}, a slow (Python-only) tokenizer that transformers "
        "cannot convert to a fast one, and not of the vocab-file WordPiece family mergedistill supports as it is "
        "(BertJapaneseTokenizer with `subword_tokenizer_type` wordpiece or character, any word splitter). mergedistill "
        "cannot map its tokens to student ids; route this teacher's languages to a teacher with a fast tokenizer "
        "(a tokenizer.json) or one of that family, and drop it from `teachers`"
    )


def load_teacher_tokenizer(name: str, tc: TeacherConfig) -> TeacherTokenizer:
    """Load teacher `name`'s tokenizer with AutoTokenizer (the reference), raising UserError with the
    teacher's name and the fix."""
    from transformers import AutoTokenizer

    from mergedistill import slow_tokenizers

    where = f"teachers.{name}"
    folder = Path(tc.path)
    local = folder.is_dir()
    if local and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{where}: folder {tc.path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "save one into it with tokenizer.save_pretrained(folder)")
    kwargs = source_kwargs(name, tc)
    try:
        hf = AutoTokenizer.from_pretrained(tc.path, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError, ... depending on what is wrong
        for fname in ("tokenizer.json", "tokenizer_config.json"):  # name the broken file rather than transformers' error
            f = Path(tc.path) / fname
            if local and f.is_file():
                try:
                    json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError) as bad:
                    raise UserError(f"{where}: {f} is not valid JSON ({type(bad).__name__}: {str(bad).splitlines()[0][:120]}); "
                                    "restore it, e.g. with tokenizer.save_pretrained(folder)") from None
        hint = "its tokenizer files could not be read" if local else "the hub copy could not be loaded"
        raise UserError(f"{where}: cannot load the tokenizer from {tc.path!r}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:400]} ({hint})") from None
    if getattr(hf, "is_fast", False) and hasattr(hf, "backend_tokenizer"):
        raw = hf.backend_tokenizer.to_str()
        tj, fp = json.loads(raw), hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]
    elif slow_tokenizers.is_vocab_file_wordpiece(hf):
        tj, fp = slow_tokenizers.tokenizer_json(hf), slow_tokenizers.fingerprint(hf)
    else:
        raise _refuse_slow(where, tc, hf)
    specials = {a: str(getattr(hf, a)) for a in SPECIAL_ATTRS if getattr(hf, a, None) is not None}
    max_len = hf.model_max_length if hf.model_max_length < 10**9 else 512
    t = TeacherTokenizer(name=name, source=tc.path, tj=tj, specials=specials, extra_specials=_extra_specials(hf),
                         fingerprint=fp, model_max_length=max_len, reference=hf)
    if not t.specials.get("mask_token"):
        raise UserError(f"{where}: the tokenizer at {tc.path!r} has no mask token, so it cannot belong to a masked LM; "
                        "set `mask_token` in its tokenizer_config.json (e.g. \"[MASK]\" or \"<mask>\")")
    t.family  # noqa: B018 -- classify now, so an unsupported tokenizer fails before any work
    log.debug("%s: %s tokenizer (%s), %d tokens, from %s", name, t.family.name, type(hf).__name__, t.size, tc.path)
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
    kwargs = source_kwargs(name, tc)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            tc.path, output_loading_info=True, **kwargs, **({"dtype": dtype} if dtype is not None else {}),
        )
    except Exception as e:
        raise UserError(f"{where}: cannot load a masked LM from {tc.path!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise UserError(f"{where}: the weights at {tc.path!r} lack {len(missing)} tensors of the masked-LM model "
                        f"(e.g. {missing[0]}): is it a model without its MLM head? Use a checkpoint saved with its head")
    return model.eval()


def load_teacher_config(name: str, tc: TeacherConfig):
    """The teacher's model config (AutoConfig: sizes, positions, model type), without its weights."""
    from transformers import AutoConfig

    where = f"teachers.{name}"
    folder = Path(tc.path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"{where}: folder {tc.path!r} has no config.json; save the model there with model.save_pretrained(folder)")
    kwargs = source_kwargs(name, tc)
    try:
        return AutoConfig.from_pretrained(tc.path, **kwargs)
    except Exception as e:
        raise UserError(f"{where}: cannot read the model config at {tc.path!r}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None
