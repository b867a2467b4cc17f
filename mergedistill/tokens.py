"""What a teacher's token *means*, independent of how its tokenizer family writes it.

Every token gets a canonical key, a short string: a tag and a payload.

  tag  meaning                                       written as (WordPiece / SentencePiece / byte-level BPE)
  S    special token, by role ([PAD] [UNK] [CLS] [SEP] [MASK]) or by content for other specials
  A    added (non-special) token, by content
  W    word-initial piece, payload = its text          `ab`   / `▁ab` / `Ġab`
  C    continuation piece, payload = its text          `##ab` / `ab`   / `ab`
  w c  as W and C, when the bytes are not valid UTF-8 (byte-level pieces that split a character);
       payload = the bytes in hex. SentencePiece byte-fallback pieces `<0xE4>` for bytes >= 0x80 land
       here too, so they meet the byte-level teachers' raw bytes.
  B    SentencePiece byte-fallback piece for an ASCII byte (`<0x41>`), payload = hex; kept apart from
       the piece `A` that the same tokenizer also has.

Tokens with the same key across teachers become one student token. Within one teacher, keys are
unique (checked), which the per-teacher student tokenizers rely on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from mergedistill.errors import UserError

ROLES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""Student special tokens, ids 0..4 in this order."""
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(ROLES))
"""The student's special ids (the joint vocabulary puts ROLES first; the models build on them)."""

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@dataclass(frozen=True)
class Family:
    """How one tokenizer writes word boundaries, read from its tokenizer.json."""

    model: str  # WordPiece | Unigram | BPE
    style: str  # wordpiece | metaspace | bytelevel | plain
    prefix: str = ""  # WordPiece / BPE continuing_subword_prefix ('##')
    space: str = "▁"  # Metaspace replacement character
    byte_fallback: bool = False

    @property
    def name(self) -> str:
        return {"wordpiece": "WordPiece", "bytelevel": "byte-level BPE"}.get(
            self.style, f"SentencePiece {self.model}" if self.style == "metaspace" else f"{self.model} (no word-boundary marks)"
        )


def _walk(node) -> list[dict]:
    """All component dicts of a normalizer/pre-tokenizer/decoder tree."""
    if not isinstance(node, dict):
        return []
    out = [node]
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        for child in node.get(key) or []:
            out += _walk(child)
    return out


def detect_family(tj: dict, where: str) -> Family:
    """Classify a tokenizer from its parsed tokenizer.json."""
    model = tj.get("model") or {}
    mtype = model.get("type")
    comps = _walk(tj.get("pre_tokenizer")) + _walk(tj.get("normalizer")) + _walk(tj.get("decoder"))
    types = {c.get("type") for c in comps}
    if mtype == "WordPiece":
        return Family("WordPiece", "wordpiece", prefix=model.get("continuing_subword_prefix") or "##")
    if mtype not in ("Unigram", "BPE"):
        raise UserError(f"{where}: tokenizer model {mtype!r} is not supported (WordPiece, Unigram and BPE are)")
    if mtype == "BPE" and model.get("end_of_word_suffix"):
        raise UserError(f"{where}: BPE with an end-of-word suffix ({model['end_of_word_suffix']!r}, CLIP-style) is not supported")
    if "ByteLevel" in types and mtype == "BPE":
        return Family("BPE", "bytelevel", prefix=model.get("continuing_subword_prefix") or "")
    space = "▁"
    for c in comps:
        if c.get("type") == "Metaspace":
            space = c.get("replacement", "▁")
            break
    else:
        for c in comps:
            if c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == " ":
                space = c.get("content", "▁")
                break
    style = "metaspace" if any(space in t for t in _sample_tokens(tj, 2000)) else "plain"
    if style == "plain" and mtype == "BPE" and model.get("continuing_subword_prefix"):
        return Family("BPE", "wordpiece", prefix=model["continuing_subword_prefix"])
    return Family(mtype, style, prefix=model.get("continuing_subword_prefix") or "", space=space, byte_fallback=bool(model.get("byte_fallback")))


def _sample_tokens(tj: dict, n: int) -> list[str]:
    vocab = tj["model"]["vocab"]
    if isinstance(vocab, dict):
        return [t for t, _ in zip(vocab, range(n))]
    return [p[0] for p in vocab[:n]]


def _text_key(tag: str, data: bytes) -> str:
    try:
        return tag + data.decode("utf-8")
    except UnicodeDecodeError:
        return tag.lower() + data.hex()


def piece_key(token: str, fam: Family) -> str:
    """Canonical key of a model-vocabulary piece (not an added/special token)."""
    if fam.style == "wordpiece":
        if fam.prefix and token.startswith(fam.prefix) and len(token) > len(fam.prefix):
            return "C" + token[len(fam.prefix):]
        return "W" + token
    if fam.style == "bytelevel":
        dec = byte_level_decoder()
        try:
            data = bytes(dec[ch] for ch in token)
        except KeyError:  # a piece outside the byte alphabet (rare: hand-added): keep it verbatim
            return "W" + token
        if data[:1] == b" ":
            return _text_key("W", data[1:])
        return _text_key("C", data)
    if fam.byte_fallback:
        m = _BYTE_PIECE.match(token)
        if m:
            b = int(m.group(1), 16)
            return ("B" if b < 0x80 else "c") + f"{b:02x}"
    if fam.style == "metaspace" and token.startswith(fam.space):
        return "W" + token[len(fam.space):]
    return "C" + token


def key_payload_len(key: str) -> int:
    """Characters (bytes for hex keys) of a piece key's payload: 1 for single-character pieces."""
    return (len(key) - 1) // 2 if key[0] in "wcB" else len(key) - 1


def display(key: str) -> str:
    """Human-readable student token: `▁ab` word-initial, `##ab` continuation, `<0xE4>` raw bytes."""
    tag, payload = key[0], key[1:]
    if tag in "SA":
        return payload
    if tag == "W":
        return "▁" + payload
    if tag == "C":
        return "##" + payload
    hexed = "".join(f"<0x{payload[i:i + 2].upper()}>" for i in range(0, len(payload), 2))
    return {"w": "▁" + hexed, "c": "##" + hexed, "B": hexed}[tag]
