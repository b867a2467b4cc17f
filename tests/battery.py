"""A battery of bad inputs and hostile environments against every stage (`make battery`).

Each case starts from a copy of one small finished run (tiny teachers of three tokenizer families,
vocab + data + train + evaluate done), breaks one thing and runs a stage. It is handled when the stage
ends with the expected exit status (2: bad input; 130: Ctrl-C; 0 where the stage repairs the damage
itself), its message says what is wrong (the expected words), no traceback was printed, and the check
after it holds (nothing half-written that looks complete, the last good checkpoint intact, no orphan
workers, ...). Prints one row per case (case, exit code, first line of the message, handled) and the
totals; exits 1 when a case is not handled.

    python tests/battery.py [-k SUBSTRING] [--keep DIR] [--list]

Full disks and read-only folders are real where this machine allows it (a small tmpfs, a read-only
tmpfs: root with mount rights), else a chmod'ed folder (not root), else an injected OSError; the table
says which. Most cases run `mergedistill.cli.main` in a forked child (no import cost per case); kills,
Ctrl-C and concurrent runs use `python -m mergedistill` processes.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from mergedistill.cli import main  # noqa: E402

TEACHERS = {"wp": ("wordpiece", ["en", "de"]), "bbpe": ("byte-bpe", ["en", "fr", "de"]), "uni": ("unigram", ["en", "ru", "fr"])}
ROUTING = {"de": "wp", "fr": "bbpe", "ru": "uni"}
CONFIG = {
    "run": "b",
    "data": {"seq_len": 32, "shard_lines": 10, "splits": ["train", "valid"], "batch_size": 8},
    "student": {"hidden": 32, "heads": 2, "layers": 2, "intermediate": 64, "max_position": 64},
    "train": {"max_steps": 6, "val_every": 3, "batch_size": 4, "lr": 0.003, "warmup_steps": 1, "accelerator": "cpu"},
    "eval": {"baseline": False, "retrieval": False, "max_lines": 10, "pll_lines": 2, "batch_size": 8, "device": "cpu"},
}


# ---- running a stage ---------------------------------------------------------------------------------
RAN: list[str] = []
"""The stages the current case ran, in order: a case without a stage of its own counts under the last one."""


def in_child(fn: Callable[[], int], out: Path, timeout: float = 600) -> int:
    """Run `fn` in a forked child with stdout/stderr going to `out`; its return value is the exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 1
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            signal.alarm(int(timeout))
            rc = fn()
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc if isinstance(rc, int) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def cli(d: Path, *argv: str, inject: Callable[[], None] | None = None) -> tuple[int, str]:
    """`mergedistill <argv>` in case folder `d` (cwd), in a forked child; (exit status, stderr+stdout)."""
    out = d / "stderr.txt"
    RAN.append(argv[0])

    def run() -> int:
        os.chdir(d)
        if inject is not None:
            inject()
        return main(list(argv))

    rc = in_child(run, out)
    return rc, out.read_text(errors="replace")


def wait_for(cond: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(0.02)
    return False


# ---- environments: full disks, read-only folders -------------------------------------------------
def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(tempfile.mkdtemp(prefix="battery-mount-"))
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


CAN_MOUNT = _can_mount()


def mount_tmpfs(path: Path, size: str, ro: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True, capture_output=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def unmount_under(folder: Path) -> None:
    """Unmount whatever an interrupted battery left mounted under `folder`."""
    prefix = os.path.abspath(folder) + os.sep
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            point = line.split()[1]
            if point.startswith(prefix):
                umount(Path(point))


def deny_writes(folder: Path, code: int, after_bytes: int | None = None) -> Callable[[], None]:
    """An injection (run in the child): opening for writing, creating or renaming anything under `folder`
    raises OSError(code), or, with `after_bytes`, writes fail once that many bytes went to a file there."""
    folder = Path(os.path.abspath(folder))

    def under(p) -> bool:
        try:
            p = Path(os.path.abspath(os.fspath(p)))
        except TypeError:
            return False
        return p == folder or folder in p.parents

    def inject() -> None:
        real_open, real_os_open, real_mkdir, real_replace = builtins.open, os.open, os.mkdir, os.replace

        class Full:
            def __init__(self, f):
                self.f, self.n = f, 0

            def write(self, b):
                self.n += len(b)
                if self.n > after_bytes:
                    raise OSError(code, os.strerror(code))
                return self.f.write(b)

            def __getattr__(self, k):
                return getattr(self.f, k)

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return self.f.__exit__(*a)

        def fake_open(file, mode="r", *a, **k):
            if any(m in mode for m in "wax+") and under(file):
                if after_bytes is None:
                    raise OSError(code, os.strerror(code), os.fspath(file))
                return Full(real_open(file, mode, *a, **k))
            return real_open(file, mode, *a, **k)

        def fake_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path) and after_bytes is None:
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_os_open(path, flags, *a, **k)

        def fake_mkdir(path, *a, **k):
            if under(path) and after_bytes is None:
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_mkdir(path, *a, **k)

        def fake_replace(a, b, *x, **k):
            if under(b) and after_bytes is None:
                raise OSError(code, os.strerror(code), os.fspath(b))
            return real_replace(a, b, *x, **k)

        builtins.open, os.open, os.mkdir, os.replace = fake_open, fake_os_open, fake_mkdir, fake_replace
        import io

        io.open = fake_open

    return inject


def _content_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` (created empty if needed, its content kept) read-only for the block; yields (how,
    injection or None)."""
    if CAN_MOUNT:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
        try:
            yield "read-only bind mount", None
        finally:
            umount(folder)
    elif os.geteuid() != 0:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        try:
            yield "chmod 555", None
        finally:
            folder.chmod(0o755)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        yield "injected EROFS", deny_writes(folder, errno.EROFS)


@contextlib.contextmanager
def full_disk(folder: Path, room: int = 96 * 1024):
    """Put `folder`, its content kept, on a small file system (a tmpfs with `room` bytes free beyond the
    content) for the block; else inject ENOSPC."""
    if CAN_MOUNT:
        aside = folder.with_name(folder.name + ".aside")
        if folder.exists():
            os.replace(folder, aside)
        size = _content_bytes(aside) * 2 + (4 << 20) + room  # ample: the filler then takes all but `room`
        mount_tmpfs(folder, str(size))
        try:
            if aside.exists():
                shutil.copytree(aside, folder, dirs_exist_ok=True, symlinks=True)
                shutil.rmtree(aside)
            st = os.statvfs(folder)
            filler = st.f_bavail * st.f_frsize - room
            if filler > 0:
                with open(folder / ".filler", "wb") as f:
                    f.write(b"\0" * filler)
            yield f"tmpfs with {room // 1024} KB free", None
        finally:
            umount(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        yield "injected ENOSPC", deny_writes(folder, errno.ENOSPC, after_bytes=64 * 1024)


# ---- the finished run every case starts from -------------------------------------------------------
def build_base(root: Path) -> Path:
    """Tiny teachers and corpora under `root`, and one finished run in root/base (vocab, data, train,
    evaluate), built in a forked child so that this process stays free of torch threads."""
    base = root / "base"
    if (base / "runs/b/eval/report.md").is_file():
        return base

    def build() -> int:
        import torch

        from conftest import SENTENCES, corpus_lines
        from mergedistill.models.mlm import build_mlm
        from mergedistill.tokenizer_train import train_tokenizer

        torch.set_num_threads(1)
        for i, (name, (kind, langs)) in enumerate(TEACHERS.items()):
            folder = root / "teachers" / name
            if (folder / "config.json").is_file():
                continue
            tok = train_tokenizer(kind, corpus_lines(langs), vocab_size=420 if kind == "byte-bpe" else 400)
            tok.save_pretrained(str(folder))
            torch.manual_seed(i)
            build_mlm(kind, tok, hidden=32, layers=2, heads=2, intermediate=64, max_position=64).save_pretrained(str(folder))
        for lang in ROUTING:
            sents = SENTENCES[lang]
            lines = [f"{s} {' '.join(sents[(i + 1) % len(sents)].split()[: i % 4])}".strip() for i, s in enumerate(sents * 8)]
            c = root / "corpora" / lang
            c.mkdir(parents=True, exist_ok=True)
            (c / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            (c / "valid.txt").write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
            (c / "test.txt").write_text("\n".join(lines[8:20]) + "\n", encoding="utf-8")
        base.mkdir(parents=True, exist_ok=True)
        write_config(base / "c.yaml", root)
        os.chdir(base)
        for stage in ("vocab", "data", "train", "evaluate"):
            rc = main([stage, "--config", "c.yaml"])
            if rc != 0:
                return rc
        return 0

    (root / "setup.txt").parent.mkdir(parents=True, exist_ok=True)
    rc = in_child(build, root / "setup.txt", timeout=1800)
    if rc != 0:
        sys.exit(f"battery: building the base run failed (exit {rc}); see {root / 'setup.txt'}")
    return base


def write_config(path: Path, root: Path, **changes) -> dict:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["teachers"] = {n: {"path": str(root / "teachers" / n)} for n in TEACHERS}
    cfg["languages"] = {lang: {"train": str(root / "corpora" / lang / "train.txt"), "valid": str(root / "corpora" / lang / "valid.txt"),
                               "test": str(root / "corpora" / lang / "test.txt"), "teacher": t} for lang, t in ROUTING.items()}
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return cfg


# ---- cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    run: Callable[["Ctx"], tuple[int, str]]
    rc: int = 2
    words: tuple[str, ...] = ()
    check: Callable[["Ctx"], str | None] | None = None
    how: str = ""
    stage: str = ""
    """The stage the case is about, for the totals; empty: the last stage it ran (RAN)."""


@dataclass
class Ctx:
    d: Path
    root: Path
    notes: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def config(self, **changes) -> None:
        write_config(self.d / "c.yaml", self.root, **changes)


CASES: list[Case] = []


def case(name: str, rc: int = 2, words: tuple[str, ...] = (), check=None, stage: str = ""):
    def deco(fn):
        CASES.append(Case(name, fn, rc, words, check, stage=stage))
        return fn
    return deco


def stage_with(stage: str, *overrides: str, rc: int = 2, words: tuple[str, ...] = (), name: str | None = None):
    """A case: `mergedistill <stage>` with command-line overrides."""
    CASES.append(Case(name or f"{stage} {' '.join(overrides)}", lambda c: cli(c.d, stage, "--config", "c.yaml", *overrides), rc, words,
                      stage=stage))


# config values: each refused at load, naming the field and the allowed range
for key, value, allowed, stage in [
    ("train.batch_size", 0, ">= 1", "train"), ("train.grad_accum", 0, ">= 1", "train"), ("train.val_every", 0, ">= 1", "train"),
    ("train.lr", -0.01, "> 0", "train"), ("student.heads", 0, ">= 1", "train"), ("student.layers", 0, ">= 1", "train"),
    ("eval.batch_size", 0, ">= 1", "evaluate"), ("eval.mask_prob", 2, "in (0, 1)", "evaluate"), ("data.max_lines", 0, ">= 1", "data"),
    ("data.top_k", 0, ">= 1", "data"), ("data.seq_len", 4, ">= 8", "data"), ("train.alpha", 1.5, "in [0, 1]", "train"),
    ("train.temperature", 0, "> 0", "train"), ("train.devices", 0, ">= 1", "train"), ("vocab.max_lines", -1, ">= 1", "vocab"),
    ("data.mask_prob", 0, "in (0, 1)", "data"), ("train.warmup_steps", -1, ">= 0", "train"), ("ablate.train_steps", 0, ">= 1", "ablate"),
    ("data.workers", 0, ">= 1", "data"), ("eval.pll_lines", 0, ">= 1", "evaluate"),
]:
    stage_with(stage, f"--{key}={value}", words=(f"{key}: {value} is out of range; allowed: {allowed}",), name=f"config {key}: {value}")

stage_with("train", "--student.max_position=16", words=("student.max_position: 16 is smaller than data.seq_len (32)",),
           name="config student.max_position < data.seq_len")
stage_with("train", "--student.hidden=33", words=("multiple of student.heads",), name="config student.hidden % heads")
stage_with("vocab", "--data.top_kk=3", words=("data.top_kk: unknown key; did you mean 'top_k'?",), name="config unknown key")
stage_with("vocab", "--data.seq_len=long", words=("data.seq_len: expected an integer",), name="config wrong type")
stage_with("vocab", "--languages.de.teacher=nobody", words=("'nobody' is not defined",), name="config routing to an undefined teacher")
stage_with("vocab", "--bogus", words=("unrecognised arguments --bogus",), name="cli unknown argument")


@case("config duplicate YAML key", words=("duplicate key 'de'", "lines"))
def _(c: Ctx):
    text = (c.d / "c.yaml").read_text()
    de = re.search(r"(?m)^  de:\n(?:    .*\n)+", text).group(0)
    (c.d / "c.yaml").write_text(text.replace(de, de + de.replace("/de/", "/fr/")))
    return cli(c.d, "vocab", "--config", "c.yaml")


@case("config invalid YAML", words=("not valid YAML",))
def _(c: Ctx):
    (c.d / "c.yaml").write_text("run: b\nteachers: [unclosed\n")
    return cli(c.d, "vocab", "--config", "c.yaml")


@case("config file missing", words=("--config: no file",))
def _(c: Ctx):
    return cli(c.d, "vocab", "--config", "nothere.yaml")


@case("config not UTF-8", words=("not UTF-8",))
def _(c: Ctx):
    (c.d / "c.yaml").write_bytes((c.d / "c.yaml").read_bytes() + b"# caf\xe9\n")
    return cli(c.d, "vocab", "--config", "c.yaml")


@case("data.seq_len longer than a teacher's positions", words=("data.seq_len: 128 tokens per sequence, but teacher wp accepts at most 64",),
      check=lambda c: "the data stage wrote shards" if list((c.d / "runs/b/data").rglob("*.arrow")) else None)
def _(c: Ctx):
    shutil.rmtree(c.d / "runs/b/data")
    return cli(c.d, "data", "--config", "c.yaml", "--data.seq_len=128", "--student.max_position=128")


# corpora
def corpus_case(name: str, content: bytes | None, words: tuple[str, ...], stage: str = "vocab"):
    def run(c: Ctx):
        p = c.d / "bad.txt"
        if content is not None:
            p.write_bytes(content)
        return cli(c.d, stage, "--config", "c.yaml", "--force", f"--languages.de.train={p}")
    CASES.append(Case(f"corpus {name} ({stage})", run, 2, words, stage=stage))


corpus_case("missing", None, ("languages.de.train: no file",))
corpus_case("empty", b"\n\n  \n", ("is empty",))
corpus_case("not UTF-8", "Grüße aus Köln\n".encode("latin-1"), ("is not UTF-8", "iconv"))
corpus_case("not UTF-8", "Grüße aus Köln\n".encode("latin-1"), ("is not UTF-8",), stage="data")


@case("corpus JSON lines with a broken line", words=("bad.jsonl line 2 is not JSON",))
def _(c: Ctx):
    (c.d / "bad.jsonl").write_text('{"text": "gut"}\n{"text": broken\n')
    return cli(c.d, "vocab", "--config", "c.yaml", f"--languages.de.train={c.d / 'bad.jsonl'}")


# teachers
def teacher_copy(c: Ctx, name: str = "wp") -> Path:
    dst = c.d / f"teacher-{name}"
    shutil.copytree(c.root / "teachers" / name, dst)
    return dst


def teacher_case(name: str, breaker: Callable[[Path], None], words: tuple[str, ...], stage: str = "vocab"):
    def run(c: Ctx):
        t = teacher_copy(c)
        breaker(t)
        return cli(c.d, stage, "--config", "c.yaml", "--force", f"--teachers.wp.path={t}")
    CASES.append(Case(f"teacher {name} ({stage})", run, 2, words, stage=stage))


teacher_case("folder missing", lambda t: shutil.rmtree(t), ("teachers.wp.path: no folder",))
teacher_case("without tokenizer", lambda t: [p.unlink() for p in t.iterdir() if "token" in p.name or p.name == "vocab.txt"],
             ("has no tokenizer",))
teacher_case("tokenizer.json invalid", lambda t: (t / "tokenizer.json").write_text("{ not json"), ("is not valid JSON",))
teacher_case("without weights", lambda t: (t / "model.safetensors").unlink(), ("has no weights",), stage="data")
teacher_case("config.json invalid", lambda t: (t / "config.json").write_text("{ broken"), ("teachers.wp",), stage="data")
teacher_case("weights truncated", lambda t: (t / "model.safetensors").write_bytes((t / "model.safetensors").read_bytes()[:1000]),
             ("teachers.wp: cannot load a masked LM",), stage="data")


def _no_mask(t: Path) -> None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = t / name
        if p.is_file():
            d = json.loads(p.read_text())
            d.pop("mask_token", None)
            p.write_text(json.dumps(d))
    tj = json.loads((t / "tokenizer.json").read_text())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] != "[MASK]"]
    (t / "tokenizer.json").write_text(json.dumps(tj))


teacher_case("tokenizer without a mask token", _no_mask, ("no mask token",))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _unsafe_pickle(t: Path) -> None:
    (t / "model.safetensors").unlink()
    with open(t / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Payload()}, f)


@case("teacher weights as an unsafe pickle (data)", words=("teachers.wp: cannot load a masked LM",),
      check=lambda c: "the pickle's code ran" if (c.d / "PWNED").exists() else None)
def _(c: Ctx):
    t = teacher_copy(c)
    _unsafe_pickle(t)
    return cli(c.d, "data", "--config", "c.yaml", "--force", f"--teachers.wp.path={t}")


# stages out of order
@case("data before vocab", words=("no complete vocabulary", "mergedistill vocab"))
def _(c: Ctx):
    shutil.rmtree(c.d / "vocab")
    return cli(c.d, "data", "--config", "c.yaml")


@case("train before data", words=("no manifest", "mergedistill data"))
def _(c: Ctx):
    shutil.rmtree(c.d / "runs/b/data")
    return cli(c.d, "train", "--config", "c.yaml", "--force")


@case("evaluate before train", words=("no exported student", "mergedistill train"))
def _(c: Ctx):
    shutil.rmtree(c.d / "runs/b/train")
    return cli(c.d, "evaluate", "--config", "c.yaml")


@case("train on shards of another vocabulary", words=("vocabulary",))
def _(c: Ctx):
    rc, out = cli(c.d, "vocab", "--config", "c.yaml", "--vocab.prune=true")
    if rc != 0:
        return rc, "setup: " + out
    c.config(**{"vocab.prune": True})
    return cli(c.d, "train", "--config", "c.yaml", "--force")


@case("train --resume of a checkpoint with other settings", words=("belongs to a run with other settings",))
def _(c: Ctx):
    return cli(c.d, "train", "--config", "c.yaml", "--resume", "--train.lr=0.001")


# tampered or truncated files
def truncate(p: Path, keep: float = 0.5) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def file_case(name: str, stage: str, breaker: Callable[[Ctx], None], words: tuple[str, ...], rc: int = 2, extra=(), check=None):
    def run(c: Ctx):
        breaker(c)
        return cli(c.d, stage, "--config", "c.yaml", *extra)
    CASES.append(Case(name, run, rc, words, check, stage=stage))


def _edit_parquet_tokens(c: Ctx) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = c.d / "vocab/b/vocab.parquet"
    t = pq.read_table(p)
    tokens = t.column("token").to_pylist()
    tokens[10], tokens[11] = tokens[11], tokens[10]
    pq.write_table(t.set_column(t.schema.get_field_index("token"), "token", pa.array(tokens, pa.string())), p)


def _swap_idmap(c: Ctx) -> None:
    import numpy as np

    p = c.d / "vocab/b/idmaps/wp.npy"
    m = np.load(p)
    m[10], m[11] = m[11], m[10]
    np.save(p, m)


file_case("vocab idmap edited (data)", "data", _swap_idmap, ("do not match its fingerprint.json", "mergedistill vocab"))
file_case("vocab.txt edited (data)", "data", lambda c: (c.d / "vocab/b/vocab.txt").write_text("x\n" * 10), ("vocab.txt", "do not match"))
file_case("vocab.parquet token column edited (train)", "train", _edit_parquet_tokens, ("vocab.parquet", "do not match"), extra=("--force",))
file_case("vocab fingerprint.json truncated (data)", "data", lambda c: truncate(c.d / "vocab/b/fingerprint.json"),
          ("fingerprint.json: unreadable or truncated", "rerun `mergedistill vocab"))
file_case("vocab fingerprint.json not an object (train)", "train", lambda c: (c.d / "vocab/b/fingerprint.json").write_text("[1, 2]"),
          ("not a JSON object", "rerun"), extra=("--force",))
file_case("vocab idmap .npy truncated (data)", "data", lambda c: truncate(c.d / "vocab/b/idmaps/uni.npy"),
          ("idmaps/uni.npy", "rerun `mergedistill vocab"))
file_case("vocab tokenizer file edited (evaluate)", "evaluate", lambda c: truncate(c.d / "vocab/b/tokenizers/wp/tokenizer.json"),
          ("tokenizers/wp/tokenizer.json", "do not match"), extra=("--force",))
file_case("manifest.json truncated (train)", "train", lambda c: truncate(c.d / "runs/b/data/manifest.json"),
          ("manifest.json: unreadable or truncated", "rerun `mergedistill data"), extra=("--force",))
file_case("manifest.json without languages (train)", "train", lambda c: (c.d / "runs/b/data/manifest.json").write_text('{"format": 2}'),
          ("incomplete manifest", "rerun `mergedistill data"), extra=("--force",))
file_case("train state.json truncated (train)", "train", lambda c: truncate(c.d / "runs/b/train/state.json"),
          ("state.json: unreadable or truncated", "rerun `mergedistill train"))
file_case("train state.json empty (train --resume)", "train", lambda c: (c.d / "runs/b/train/state.json").write_text(""),
          ("state.json: unreadable or truncated",), extra=("--resume",))


def first_shard(c: Ctx) -> Path:
    return sorted((c.d / "runs/b/data/de/train").glob("shard-*.arrow"))[0]


def _relabel(c: Ctx) -> None:
    """The shard rewritten with the same size: every label replaced in place (what a size check misses)."""
    import numpy as np
    import pyarrow as pa

    p = first_shard(c)
    data = bytearray(p.read_bytes())
    buf = pa.py_buffer(bytes(data))
    values = pa.ipc.open_stream(buf).read_all().column("labels").chunks[0].values
    start = values.buffers()[1].address - buf.address + values.offset * values.type.byte_width
    n = len(values) * values.type.byte_width
    data[start: start + n] = np.full(len(values), 7, dtype=values.type.to_pandas_dtype()).tobytes()
    p.write_bytes(bytes(data))


def _flip(c: Ctx) -> None:
    p = first_shard(c)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _shard_intact(c: Ctx) -> str | None:
    from mergedistill.data.shards import shard_record

    return None if shard_record(first_shard(c)) is not None else f"{first_shard(c)} was not rebuilt"


file_case("shard relabelled, same size (train)", "train", _relabel, ("corrupt shard", "shard-00000.arrow", "rerun `mergedistill data"),
          extra=("--force",))
file_case("shard with a flipped byte (train)", "train", _flip, ("corrupt shard", "shard-00000.arrow"), extra=("--force",))
file_case("shard truncated (train)", "train", lambda c: truncate(first_shard(c)), ("not a complete shard", "shard-00000.arrow"), extra=("--force",))
file_case("shard record deleted (train)", "train", lambda c: first_shard(c).with_suffix(".json").unlink(), ("not a complete shard",),
          extra=("--force",))
file_case("shard relabelled: data --verify", "data", _relabel, ("corrupt shard", "shard-00000.arrow"), extra=("--verify",))
file_case("shard with a flipped byte: data rebuilds it", "data", _flip, ("corrupt shard", "rebuilding it"), rc=0, check=_shard_intact)


@case("last.ckpt corrupt (train --resume)", words=("last.ckpt: corrupt checkpoint", "--force"))
def _(c: Ctx):
    state = c.d / "runs/b/train/state.json"
    s = json.loads(state.read_text())
    s["status"] = "training"
    state.write_text(json.dumps(s))
    shutil.rmtree(c.d / "runs/b/train/export")
    truncate(c.d / "runs/b/train/checkpoints/last.ckpt", 0.3)
    return cli(c.d, "train", "--config", "c.yaml", "--resume")


file_case("export languages.json corrupt (evaluate)", "evaluate", lambda c: truncate(c.d / "runs/b/train/export/languages.json"),
          ("languages.json", "mergedistill train"), extra=("--force",))
file_case("export weights truncated (evaluate)", "evaluate", lambda c: truncate(c.d / "runs/b/train/export/model.safetensors"),
          ("cannot load the exported student",), extra=("--force",))
file_case("routing file invalid (vocab)", "vocab", lambda c: (c.d / "r.yaml").write_text("de: [wp\n"), ("routing:",), extra=("--routing=r.yaml",))


# the environment: read-only folders and full disks
def env_case(name: str, stage: str, folder: str, kind: str, words: tuple[str, ...], prepare: Callable[[Ctx], None] | None = None,
             check: Callable[[Ctx], str | None] | None = None, extra=(), room: int = 16 * 1024):
    def run(c: Ctx):
        if prepare is not None:
            prepare(c)
        target = c.d / folder
        ctx = read_only(target) if kind == "ro" else full_disk(target, room)
        with ctx as (how, inject):
            c.notes.append(how)
            return cli(c.d, stage, "--config", "c.yaml", *extra, inject=inject)
    CASES.append(Case(name, run, 2, words, check, stage=stage))


def no_complete(*paths: str):
    def check(c: Ctx) -> str | None:
        found = [p for p in paths if (c.d / p).exists()]
        debris = [str(p) for p in c.d.rglob("*.partial")]
        return ("looks complete: " + ", ".join(found)) if found else ("left behind: " + ", ".join(debris)) if debris else None
    return check


def _drop(*paths: str):
    def prepare(c: Ctx) -> None:
        for p in paths:
            shutil.rmtree(c.d / p, ignore_errors=True)
    return prepare


env_case("read-only vocab folder (vocab)", "vocab", "vocab", "ro", ("cannot write vocab", "Read-only file system"),
         prepare=_drop("vocab"), check=no_complete("vocab/b/fingerprint.json"))
env_case("read-only runs folder (data)", "data", "runs", "ro", ("cannot write runs", "Read-only file system"),
         prepare=_drop("runs"), check=no_complete("runs/b/data/manifest.json"))
env_case("read-only train folder (train)", "train", "runs/b/train", "ro", ("cannot write runs/b/train", "Read-only file system"),
         prepare=_drop("runs/b/train"))
env_case("read-only run folder (evaluate)", "evaluate", "runs/b", "ro", ("cannot write runs/b", "Read-only file system"),
         prepare=_drop("runs/b/eval"), check=no_complete("runs/b/eval/report.md"))
env_case("full disk (vocab)", "vocab", "vocab", "full", ("cannot write vocab/b", "No space left on device"),
         prepare=_drop("vocab"), check=no_complete("vocab/b/fingerprint.json"), room=96 * 1024)
env_case("full disk (data)", "data", "runs/b", "full", ("cannot write runs/b/data", "No space left on device"),
         prepare=_drop("runs/b/data", "runs/.shards"), check=no_complete("runs/b/data/manifest.json"))
env_case("full disk (evaluate)", "evaluate", "runs/b", "full", ("cannot write runs/b/eval", "No space left on device"),
         prepare=_drop("runs/b/eval"), check=no_complete("runs/b/eval/report.md"))


def _ckpt_step(c: Ctx, path: str = "runs/b/train/checkpoints/last.ckpt") -> int | None:
    import torch

    try:
        return torch.load(c.d / path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:
        return None


@case("full disk while saving a checkpoint (train)", words=("cannot write", "runs/b/train/checkpoints/", "No space left on device"),
      check=lambda c: None if _ckpt_step(c, "last.ckpt.after") == 3 else
      f"last.ckpt is not the good one of step 3 (step {_ckpt_step(c, 'last.ckpt.after')})")
def _(c: Ctx):
    """Training to step 6 with checkpoints every 3 steps; after step 3's, the disk fills up but for half a
    checkpoint, so the save at step 6 fails: last.ckpt must still be step 3's, readable."""
    train = c.d / "runs/b/train"
    shutil.rmtree(train)
    ckpt = train / "checkpoints"

    def hook_fill(fill: Callable[[int], None]) -> Callable[[], None]:
        def inject() -> None:
            import mergedistill.train.module as module

            real = module.DistillModule.training_step
            done = {"x": False}

            def step(self, batch, batch_idx):
                if self.global_step == 4 and not done["x"] and (ckpt / "last.ckpt").is_file():
                    done["x"] = True
                    fill((ckpt / "last.ckpt").stat().st_size)
                return real(self, batch, batch_idx)

            module.DistillModule.training_step = step
        return inject

    if CAN_MOUNT:
        mount_tmpfs(train, "64m")
        c.notes.append("tmpfs filled up during training")

        def fill(ckpt_size: int) -> None:
            st = os.statvfs(train)
            free = st.f_bavail * st.f_frsize
            with open(train / "filler", "wb") as f:
                f.write(b"\0" * max(0, free - ckpt_size // 2))

        try:
            return cli(c.d, "train", "--config", "c.yaml", inject=hook_fill(fill))
        finally:
            with contextlib.suppress(OSError):
                shutil.copy(ckpt / "last.ckpt", c.d / "last.ckpt.after")
            umount(train)
    c.notes.append("injected ENOSPC during training")
    try:
        return cli(c.d, "train", "--config", "c.yaml", inject=hook_fill(lambda size: deny_writes(ckpt, errno.ENOSPC, size // 2)()))
    finally:
        with contextlib.suppress(OSError):
            shutil.copy(ckpt / "last.ckpt", c.d / "last.ckpt.after")


# interruptions, kills, concurrent runs
def _wait_file(p: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    return wait_for(p.exists, timeout, proc)


def spawn_logged(c: Ctx, *argv: str) -> tuple[subprocess.Popen, Path]:
    RAN.append(argv[0])
    log = c.d / f"proc-{len(list(c.d.glob('proc-*')))}.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    fh = open(log, "w")
    # Ctrl-C must reach it even when this battery runs in the background (where a shell ignores SIGINT)
    proc = subprocess.Popen([sys.executable, "-m", "mergedistill", *argv], cwd=c.d, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, log.read_text(errors="replace")


@case("Ctrl-C in train", rc=130, words=("interrupted at step", "continue with --resume"),
      check=lambda c: None if _ckpt_step(c) is not None else "no readable last.ckpt after Ctrl-C")
def _(c: Ctx):
    c.config(**{"train.max_steps": 100000})
    shutil.rmtree(c.d / "runs/b/train")
    proc, log = spawn_logged(c, "train", "--config", "c.yaml")
    if not _wait_file(c.d / "runs/b/train/checkpoints/last.ckpt", proc):
        return finish(proc, log)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    return finish(proc, log)


@case("Ctrl-C in data", rc=130, words=("interrupted; rerun the same command to resume",),
      check=no_complete("runs/b/data/manifest.json"))
def _(c: Ctx):
    shutil.rmtree(c.d / "runs/b/data")
    big = c.d / "big.txt"
    big.write_text((c.root / "corpora/de/train.txt").read_text() * 40)
    c.config(**{"languages.de.train": str(big)})
    proc, log = spawn_logged(c, "data", "--config", "c.yaml")
    wait_for(lambda: len(list((c.d / "runs/b/data").rglob("shard-*.json"))) >= 2, 300, proc)
    proc.send_signal(signal.SIGINT)
    return finish(proc, log)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _workers_gone(c: Ctx) -> str | None:
    """Handled only if workers were seen before the kill, and none of them outlived it."""
    note = c.notes[-1] if c.notes else ""
    if not note.startswith(("alive", "gone")):
        return "no worker of vocab was seen before the kill: nothing was checked"
    return f"workers still alive after their parent was killed: {note}" if note.startswith("alive") else None


@case("kill -9 of vocab with its workers", rc=-9, words=(), check=_workers_gone)
def _(c: Ctx):
    big = c.d / "big.txt"
    big.write_text((c.root / "corpora/de/train.txt").read_text() * 3000)
    c.config(**{"languages.de.train": str(big), "vocab.prune": True})
    proc, log = spawn_logged(c, "vocab", "--config", "c.yaml", "--force")
    workers: list[int] = []
    wait_for(lambda: len(workers.extend(_children(proc.pid)) or set(workers)) >= 2, 300, proc)
    workers = sorted(set(workers))
    proc.send_signal(signal.SIGKILL)
    rc, out = finish(proc, log)
    wait_for(lambda: not any(_alive(w) for w in workers), 10)
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w, signal.SIGKILL)
    if workers:
        c.notes.append(f"alive {alive}" if alive else f"gone: all {len(workers)} workers")
    return rc, f"killed; {len(workers)} workers seen, {len(alive)} still alive afterwards" if workers else "no workers seen"


def _debris(c: Ctx) -> list[Path]:
    """Temporaries as killed runs leave them: named after a dead process (pid 999999 on this host), or
    without a writer's tag (older names)."""
    import socket

    here = f"pid999999@{socket.gethostname().replace('.', '_')}"
    paths = [c.d / f"vocab/.b.{here}.x1.partial", c.d / f"vocab/.cache/b/.counts-wp-de-train-x.npy.{here}.x2.tmp",
             c.d / f"runs/b/data/de/train/.shard-00000.arrow.{here}.x3.tmp", c.d / "runs/b/data/de/train/.shard-00001.arrow.a1b2c3.tmp",
             c.d / f"runs/b/train/checkpoints/.last.ckpt.{here}.x4.tmp", c.d / f"runs/.shards/.shard-00000.arrow.{here}.link",
             c.d / f"runs/b/.eval.{here}.x5.partial"]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".partial":
            p.mkdir()
            (p / "half.txt").write_text("half")
        else:
            p.write_bytes(b"half a file")
    return paths


def _gone(c: Ctx) -> str | None:
    left = [str(p.relative_to(c.d)) for p in c.paths if p.exists()]
    return "still there: " + ", ".join(left) if left else None


@case("leftovers of killed runs removed by the next run", rc=0, words=("removed",), check=_gone, stage="vocab..evaluate")
def _(c: Ctx):
    c.paths = _debris(c)
    out = ""
    for stage in ("vocab", "data", "train", "evaluate"):
        rc, o = cli(c.d, stage, "--config", "c.yaml")
        out += o
        if rc != 0:
            return rc, out
    return 0, out


@case("two trains on one run at once", words=("another mergedistill train is running on runs/b (pid",))
def _(c: Ctx):
    c.config(**{"train.max_steps": 100000})
    proc, log = spawn_logged(c, "train", "--config", "c.yaml", "--force")
    try:
        lock = c.d / "runs/b/.lock-train"
        if not wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(proc.pid), 300, proc):
            return finish(proc, log)
        return cli(c.d, "train", "--config", "c.yaml", "--force")
    finally:
        proc.kill()
        finish(proc, log)


@case("two data runs on one run at once", words=("another mergedistill data is running on runs/b (pid",))
def _(c: Ctx):
    big = c.d / "big.txt"
    big.write_text((c.root / "corpora/de/train.txt").read_text() * 400)  # long enough to outlast the second run's start-up
    c.config(**{"languages.de.train": str(big)})
    proc, log = spawn_logged(c, "data", "--config", "c.yaml", "--force")
    try:
        lock = c.d / "runs/b/.lock-data"
        if not wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(proc.pid), 300, proc):
            return finish(proc, log)
        return cli(c.d, "data", "--config", "c.yaml")
    finally:
        proc.kill()
        finish(proc, log)


def _stale_lock_taken(c: Ctx) -> str | None:
    """Handled only if the data run was killed while it held the lock, its lock file still named it when the next
    run started (a stale lock stood in the way), and the next run took the lock and finished."""
    lock = c.d / "runs/b/.lock-data"
    killed = next((n.split()[-1] for n in c.notes if n.startswith("killed holding the lock")), None)
    if killed is None:
        return "the data run was not seen holding its lock when it was killed: nothing was checked"
    if not any(n.startswith("stale lock") for n in c.notes):
        return "no lock file naming the killed run was left: nothing stood in the next run's way"
    if _holder_of(lock) == killed:
        return "the next run did not take the lock: it still names the killed run"
    return None if (c.d / "runs/b/data/manifest.json").is_file() else "no manifest after the rerun"


def _holder_of(lock: Path) -> str | None:
    try:
        return lock.read_text().strip()
    except OSError:
        return None


@case("lock of a killed data run does not block the next", rc=0, words=(), check=_stale_lock_taken)
def _(c: Ctx):
    big = c.d / "big.txt"
    big.write_text((c.root / "corpora/de/train.txt").read_text() * 40)
    c.config(**{"languages.de.train": str(big)})
    proc, log = spawn_logged(c, "data", "--config", "c.yaml", "--force")
    lock = c.d / "runs/b/.lock-data"
    held = wait_for(lambda: _holder_of(lock) == str(proc.pid), 300, proc) and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    rc, _ = finish(proc, log)
    if held and rc == -signal.SIGKILL:
        c.notes.append(f"killed holding the lock: pid {proc.pid}")
    if _holder_of(lock) == str(proc.pid):
        c.notes.append("stale lock left")
    return cli(c.d, "data", "--config", "c.yaml")


# ---- extend: a new language (en) on the distilled student ----------------------------------------------
EN = ["The children learn to read and write at the small school.", "My brother works in a bakery near the old station.",
      "We walked along the river until the sun went down.", "She reads a book every evening before she goes to bed.",
      "The house on the hill has a red door and a green garden.", "Trains to the city leave every hour from the main station.",
      "He cooked a warm soup for his friends on Sunday.", "The weather was cold, but the market was full of people."]
EXTEND = {"languages": {"en": {"train": "en.txt", "valid": "en.valid.txt", "test": "en.valid.txt"}}, "method": "full", "compare": [],
          "steps": 6, "eval_every": 3, "batch_size": 4, "warmup_steps": 1, "tokenizer": "unigram", "tokenizer_vocab_size": 120,
          "share_tokens": False, "curve_lines": 8, "old_lines": 5, "device": "cpu"}
"""en without a teacher (a tokenizer trained on its corpus, MLM), every token a new row, the `full` method, 6 steps."""


def extend_setup(c: Ctx, **changes) -> None:
    """en's corpora in the case folder and an `extend:` section in its config (`changes`: dotted keys)."""
    lines = [f"{s} {' '.join(EN[(i + 1) % len(EN)].split()[: i % 4])}".strip() for i, s in enumerate(EN * 4)]
    (c.d / "en.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (c.d / "en.valid.txt").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    c.config(**{"extend": json.loads(json.dumps(EXTEND)), **changes})


def extend_cli(c: Ctx, *extra: str) -> tuple[int, str]:
    return cli(c.d, "extend", "--config", "c.yaml", "--language", "en", *extra)


def extend_case(name: str, breaker: Callable[[Ctx], None] | None, words: tuple[str, ...], rc: int = 2, extra=(), check=None, **changes):
    """A case: `mergedistill extend --language en` after `breaker` broke something (`changes`: config keys)."""
    def run(c: Ctx):
        extend_setup(c, **changes)
        if breaker is not None:
            breaker(c)
        return extend_cli(c, *extra)
    CASES.append(Case(name, run, rc, words, check or nothing_extended, stage="extend"))


def nothing_extended(c: Ctx) -> str | None:
    """Refused before any work: no export, no state, no trained method, no temporaries."""
    out = c.d / "runs/b/extend/en"
    done = [p for p in ("export/config.json", "state.json", "work/methods") if (out / p).exists()]
    debris = [str(p.relative_to(c.d)) for p in c.d.rglob("*.partial")]
    return f"written before the refusal: {', '.join(done)}" if done else f"left behind: {', '.join(debris)}" if debris else None


def _drop_module_weights(c: Ctx, lang: str = "ru") -> None:
    """The X-Mod export's weights without `lang`'s module (its config still lists it)."""
    from safetensors.numpy import load_file, save_file

    p = c.d / "runs/b/train/export/model.safetensors"
    weights = load_file(str(p))
    save_file({k: v for k, v in weights.items() if f".adapter_modules.{lang}." not in k}, str(p), metadata={"format": "pt"})


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d, indent=2))


extend_case("extend before train", lambda c: shutil.rmtree(c.d / "runs/b/train"), ("no exported student", "mergedistill train"))
extend_case("extend: export weights truncated", lambda c: truncate(c.d / "runs/b/train/export/model.safetensors"),
            ("cannot load the exported student", "runs/b/train/export", "mergedistill train"))
extend_case("extend: export config.json corrupt", lambda c: truncate(c.d / "runs/b/train/export/config.json"),
            ("runs/b/train/export", "config.json", "mergedistill train"))
extend_case("extend: export tokenizer folder missing", lambda c: shutil.rmtree(c.d / "runs/b/train/export/tokenizers/wp"),
            ("runs/b/train/export: no tokenizer for de: tokenizers/wp", "mergedistill train"))
extend_case("extend: export languages.json corrupt", lambda c: truncate(c.d / "runs/b/train/export/languages.json"),
            ("languages.json", "mergedistill train"))
extend_case("extend: a language of the run (--language de)", None, ("--language de", "'de' is already a language of this run"),
            extra=("--language", "de"))
extend_case("extend: a language the student already has", lambda c: _edit_json(c.d / "runs/b/train/export/languages.json",
                                                                                en="tokenizers/wp"),
            ("the student already has 'en'",))
extend_case("extend: unknown method", None, ("extend.method", "'minipots'", "minipost"), **{"extend.method": "minipots"})
extend_case("extend: unknown method to compare", None, ("extend.compare[0]: 'fast' is not one of",), **{"extend.compare": ["fast"]})
extend_case("extend: new language's corpus missing", None, ("extend.languages.en.train: no file 'nothere.txt'",),
            **{"extend.languages.en.train": "nothere.txt"})
extend_case("extend: X-Mod method on a dense student", None, ("extend.method xmod: needs an X-Mod student",),
            **{"extend.method": "xmod"})
extend_case("extend: X-Mod extend.module_init on a dense student", None, ("extend.module_init", "X-Mod"),
            **{"extend.module_init": "de"})
env_case("full disk (extend)", "extend", "runs/b/extend", "full", ("cannot write runs/b/extend", "No space left on device"),
         prepare=extend_setup, extra=("--language", "en"), check=no_complete("runs/b/extend/en/export", "runs/b/extend/en/state.json"))


def hashes(path: Path) -> dict[str, str]:
    """sha256 of the file at `path` (key ""), or of every file under the folder `path` (keys: relative paths)."""
    import hashlib

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return {str(p.relative_to(path)) if p != path else "": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def killed_then_rerun(out: str, clean: str, compare: tuple[str, ...]):
    """The check of a kill -9 case: the run was killed in the middle (a note says so), left nothing that looks
    complete (noted right after the kill), the rerun left no temporaries, and what it wrote (`compare`: files
    or folders under `out`) is bit for bit what the uninterrupted run in `clean` wrote."""
    def check(c: Ctx) -> str | None:
        if not any(n.startswith("killed") for n in c.notes):
            return "the run was not killed in the middle: nothing was checked"
        half = [n for n in c.notes if n.startswith("looked complete after the kill")]
        if half:
            return half[0]
        debris = [str(p.relative_to(c.d)) for p in (c.d / out).rglob("*") if p.name.endswith((".partial", ".tmp", ".old"))]
        if debris:
            return "left behind after the rerun: " + ", ".join(debris)
        differ = []
        for rel in compare:
            ha, hb = hashes(c.d / clean / rel), hashes(c.d / out / rel)
            if not ha:
                return f"the uninterrupted run wrote no {clean}/{rel}: nothing to compare"
            differ += [f"{rel}/{k}".rstrip("/") for k in sorted(set(ha) | set(hb)) if ha.get(k) != hb.get(k)]
        return ("not what the uninterrupted run wrote: " + ", ".join(differ[:6])) if differ else None
    return check


def _kill_when(c: Ctx, argv: tuple[str, ...], ready: Callable[[Path], bool], what: str, out: str, complete: tuple[str, ...]) -> None:
    """Start `mergedistill <argv>`, kill -9 it once `ready(log)` holds, and note what the kill left."""
    proc, log = spawn_logged(c, *argv)
    hit = wait_for(lambda: ready(log), 900, proc) and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    rc, text = finish(proc, log)
    if not (hit and rc == -signal.SIGKILL):
        c.notes.append(f"not killed in the middle (exit {rc}): {first_line(text)}")
        return
    c.notes.append(f"killed {what}")
    found = [p for p in complete if (c.d / out / p).exists()]
    if found:
        c.notes.append(f"looked complete after the kill: {', '.join(found)}")


@case("kill -9 of extend, then rerun", rc=0, words=("extend en: exported",), stage="extend",
      check=killed_then_rerun("runs/b/extend/en", "clean/en", ("export", "work/methods/full/params.safetensors")))
def _(c: Ctx):
    extend_setup(c)
    rc, out = extend_cli(c)  # the uninterrupted run, set aside
    if rc != 0:
        return rc, "the uninterrupted run failed: " + out
    (c.d / "clean").mkdir()
    os.replace(c.d / "runs/b/extend/en", c.d / "clean/en")
    _kill_when(c, ("extend", "--config", "c.yaml", "--language", "en"),
               lambda log: "extend en full: step 3/6" in log.read_text(errors="replace"), "while training (after step 3 of 6)",
               "runs/b/extend/en", ("export", "state.json", "report.md"))
    return extend_cli(c)


# ---- compress ------------------------------------------------------------------------------------------------
COMPRESS = {"sparsity": [0.5], "recovery_steps": 0, "heads": [], "neurons": [], "layers": [], "quantize": True, "small": False,
            "importance_batches": 1, "throughput_batches": 1, "throughput_batch_size": 4, "throughput_repeats": 1}
"""Two variants: sparse-50 (one-shot magnitude pruning) and int8."""


def compress_setup(c: Ctx, **changes) -> None:
    c.config(**{"compress": dict(COMPRESS), **changes})


def compress_case(name: str, breaker: Callable[[Ctx], None] | None, words: tuple[str, ...], rc: int = 2, extra=(), check=None,
                  **changes):
    def run(c: Ctx):
        compress_setup(c, **changes)
        if breaker is not None:
            breaker(c)
        return cli(c.d, "compress", "--config", "c.yaml", *extra)
    CASES.append(Case(name, run, rc, words, check or no_complete("runs/b/compress/sparse-50", "runs/b/compress/report.md"),
                      stage="compress"))


compress_case("compress before train", lambda c: shutil.rmtree(c.d / "runs/b/train"), ("no exported student", "mergedistill train"))
compress_case("compress: export weights truncated", lambda c: truncate(c.d / "runs/b/train/export/model.safetensors"),
              ("cannot load the exported student", "runs/b/train/export", "mergedistill train"))
compress_case("compress: export config.json corrupt", lambda c: truncate(c.d / "runs/b/train/export/config.json"),
              ("runs/b/train/export", "config.json", "mergedistill train"))
compress_case("compress: unknown setting (compress.method)", None, ("compress.method: unknown key",), extra=("--compress.method=magnitude",))
compress_case("compress: misspelt variant setting", None, ("compress.quantise: unknown key; did you mean 'quantize'?",),
              extra=("--compress.quantise=false",))
compress_case("compress: a variant the student cannot take (drop 5 of 2 layers)", None,
              ("compress.layers[0]: cannot drop 5 of the student's 2 layers",), extra=("--compress.layers=[5]",))
env_case("full disk while writing compress variants", "compress", "runs/b/compress", "full",
         ("cannot write runs/b/compress", "No space left on device"), prepare=compress_setup,
         check=no_complete("runs/b/compress/sparse-50/config.json", "runs/b/compress/int8/config.json", "runs/b/compress/report.md"))


@case("kill -9 of compress, then rerun", rc=0, words=("compress: done",), stage="compress",
      check=killed_then_rerun("runs/b/compress", "clean", ("sparse-50", "int8", "results.csv", "drops.csv")))
def _(c: Ctx):
    compress_setup(c)
    rc, out = cli(c.d, "compress", "--config", "c.yaml")  # the uninterrupted run, set aside
    if rc != 0:
        return rc, "the uninterrupted run failed: " + out
    os.replace(c.d / "runs/b/compress", c.d / "clean")
    _kill_when(c, ("compress", "--config", "c.yaml"), lambda log: (c.d / "runs/b/compress/sparse-50/mergedistill.json").is_file(),
               "after its first variant", "runs/b/compress", ("report.md", "state.json"))
    return cli(c.d, "compress", "--config", "c.yaml")


# ---- X-Mod students ---------------------------------------------------------------------------------------
stage_with("train", "--student.adapter_reduction_factor=4", "--student.modules={de: germanic}",
           words=("X-Mod settings (modules, adapter_reduction_factor) need `student.arch: xmod`",),
           name="config X-Mod settings on a dense student")


def xmod_student(c: Ctx) -> None:
    """runs/b/train: an X-Mod student (student.arch: xmod) trained on the base run's shards; trained once per
    battery (kept in <root>/xmod-train), copied into each case that needs it."""
    cached = c.root / "xmod-train"
    c.config(**{"student.arch": "xmod"})
    if not (cached / "export/config.json").is_file():
        rc, out = cli(c.d, "train", "--config", "c.yaml", "--force")
        if rc != 0:
            raise RuntimeError(f"training the X-Mod student failed (exit {rc}): {first_line(out)}")
        shutil.rmtree(cached, ignore_errors=True)
        shutil.copytree(c.d / "runs/b/train", cached.with_name(cached.name + ".tmp"), symlinks=True)
        os.replace(cached.with_name(cached.name + ".tmp"), cached)
    else:
        shutil.rmtree(c.d / "runs/b/train")
        shutil.copytree(cached, c.d / "runs/b/train", symlinks=True)


def xmod_case(name: str, stage: str, breaker: Callable[[Ctx], None] | None, words: tuple[str, ...], extra=(), check=None, **changes):
    """A case on an X-Mod student: `mergedistill <stage>` after `breaker` (extend: on en, `changes` to its section)."""
    def run(c: Ctx):
        xmod_student(c)
        if stage == "extend":
            extend_setup(c, **{"student.arch": "xmod", **changes})
        elif stage == "compress":
            compress_setup(c, **{"student.arch": "xmod"})
        if breaker is not None:
            breaker(c)
        if stage == "extend":
            return extend_cli(c, *extra)
        return cli(c.d, stage, "--config", "c.yaml", *extra)
    CASES.append(Case(name, run, 2, words, check, stage=stage))


xmod_case("X-Mod export weights truncated (evaluate)", "evaluate",
          lambda c: (shutil.rmtree(c.d / "runs/b/eval"), truncate(c.d / "runs/b/train/export/model.safetensors")),
          ("cannot load the exported student", "runs/b/train/export"), check=no_complete("runs/b/eval/report.md"))
xmod_case("X-Mod export without ru's module weights (extend)", "extend", _drop_module_weights,
          ("runs/b/train/export", "adapter_modules.ru", "mergedistill train"), check=nothing_extended,
          **{"extend.method": "xmod"})
xmod_case("X-Mod export whose config lost a language (extend)", "extend",
          lambda c: _edit_json(c.d / "runs/b/train/export/config.json", languages=["de", "fr"], language_modules={"de": "de", "fr": "fr"}),
          ("runs/b/train/export", "'ru'", "no module"), check=nothing_extended, **{"extend.method": "xmod"})
xmod_case("X-Mod extend.module_init not a language of the student", "extend", None,
          ("extend.module_init: 'xx' is not a language of the student",), check=nothing_extended,
          **{"extend.method": "xmod", "extend.module_init": "xx"})
xmod_case("X-Mod student in compress", "compress", None, ("the student is a 'xmod' model", "compression supports"),
          check=no_complete("runs/b/compress/sparse-50", "runs/b/compress/report.md"))


# ---- the demo's teachers (teachers_build, e5) --------------------------------------------------------------------
TEACHERS_CONFIG = {
    "defaults": {"vocab_size": 300, "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64,
                 "train": {"seq_len": 32, "batch_size": 8, "max_steps": 4, "eval_every": 2, "eval_sequences": 4, "log_every": 2,
                           "num_threads": 1, "accelerator": "cpu"}},
    "teachers": {"de": {"languages": ["de"], "tokenizer": "wordpiece"}},
    "eval": {"pll_lines": 2, "acc_sequences": 4},
}


def demo_cli(c: Ctx, module: str, *argv: str, before: Callable[[], None] | None = None) -> tuple[int, str]:
    """`python -m mergedistill.demo.<module> <argv>` in the case folder, in a forked child (`before` runs there first)."""
    RAN.append({"teachers_build": "teachers"}.get(module, module))
    out = c.d / "stderr.txt"

    def run() -> int:
        import importlib

        os.chdir(c.d)
        if before is not None:
            before()
        return importlib.import_module(f"mergedistill.demo.{module}").main(list(argv))

    rc = in_child(run, out)
    return rc, out.read_text(errors="replace")


def tiny_e5(path: Path, keep: float = 1.0) -> Callable[[], None]:
    """Write (in the child) a tiny E5S1 file (2 layers, hidden 32: tests/demo/test_e5.py's), its first `keep` share."""
    def write() -> None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("battery_test_e5", HERE / "demo" / "test_e5.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)  # type: ignore[union-attr]
        m.write_tiny_e5(path, m.tiny_tensors())
        if keep < 1:
            truncate(path, keep)
    return write


def teachers_config(c: Ctx, **changes) -> None:
    cfg = json.loads(json.dumps(TEACHERS_CONFIG))
    cfg["corpora"] = str(c.root / "corpora")
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    (c.d / "teachers.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")


def nothing_built(c: Ctx) -> str | None:
    built = [str(p.relative_to(c.d)) for p in (c.d / "t-out").rglob("config.json")] if (c.d / "t-out").exists() else []
    return f"built before the refusal: {', '.join(built)}" if built else None


def teachers_case(name: str, words: tuple[str, ...], extra=(), text: str | None = None, e5: float | None = None, **changes):
    """`python -m mergedistill.demo.teachers_build` on a broken teachers config (`changes`, or the whole `text`); `e5`:
    a tiny E5S1 file (that share of it) is written as tiny-e5.bin first."""
    def run(c: Ctx):
        teachers_config(c, **changes)
        if text is not None:
            (c.d / "teachers.yaml").write_text(text)
        before = tiny_e5(c.d / "tiny-e5.bin", e5) if e5 is not None else None
        return demo_cli(c, "teachers_build", "--config", "teachers.yaml", "--out", "t-out", *extra, before=before)
    CASES.append(Case(name, run, 2, words, nothing_built, stage="teachers"))


PRETRAINED = {"languages": ["de", "fr"], "model_file": "tiny-e5.bin",
              "fit": {"minutes": 0, "max_steps": 2, "batch_size": 4, "seq_len": 32, "warmup_steps": 1, "num_threads": 1}}
teachers_case("teachers config invalid YAML", ("teachers.yaml", "not valid YAML"), text="teachers: [unclosed\n")
teachers_case("teachers config unknown key", ("teachers.de.hiden: unknown key; did you mean 'hidden'?",), **{"teachers.de.hiden": 32})
teachers_case("teachers config: a teacher that is not a mapping", ("teachers.de",), **{"teachers.de": ["de"]})
teachers_case("teachers config: a language without corpora", ("teachers.de.languages: xx (train)", "build the corpora first"),
              **{"teachers.de.languages": ["xx"]})
teachers_case("teachers config: hidden not a multiple of heads", ("teachers.de.hidden: 33 must be a multiple of heads (2)",),
              **{"teachers.de.hidden": 33})
teachers_case("teachers --only an unknown teacher", ("--only: nobody not among the configured teachers",), extra=("--only", "nobody"))
teachers_case("teachers: pretrained e5 file truncated", ("pretrained.e5.model_file", "tiny-e5.bin", "corrupt"), e5=0.6,
              **{"pretrained.e5": PRETRAINED})
teachers_case("teachers: pretrained e5 fit.train_layers above the model's layers",
              ("pretrained.e5.fit.train_layers: 5", "tiny-e5.bin has 2 encoder layers"), e5=1.0,
              **{"pretrained.e5": {**PRETRAINED, "fit": {**PRETRAINED["fit"], "train_layers": 5}}})


def e5_case(name: str, words: tuple[str, ...], model_file: str, write: Callable[[Ctx], Callable[[], None] | None], extra=()):
    """`python -m mergedistill.demo.e5` on de and fr with `--model-file`, written by `write`'s callable in the child."""
    def run(c: Ctx):
        return demo_cli(c, "e5", "--corpora", str(c.root / "corpora"), "--languages", "de,fr", "--out", "t-out/e5",
                        "--model-file", model_file, "--fit.minutes=0", "--fit.max_steps=2", "--fit.batch_size=4",
                        "--fit.seq_len=32", *extra, before=write(c))
    CASES.append(Case(name, run, 2, words, nothing_built, stage="e5"))


e5_case("e5 weight file truncated", ("tiny-e5.bin", "corrupt", "E5S1"), "tiny-e5.bin",
        lambda c: tiny_e5(c.d / "tiny-e5.bin", 0.3))
e5_case("e5 weight file of another format (safetensors)", ("model.safetensors", "not an E5S1 model file"),
        "teacher-wp/model.safetensors", lambda c: (teacher_copy(c), None)[1])
e5_case("e5 fit.train_layers above the model's layers", ("fit.train_layers: 5", "tiny-e5.bin has 2 encoder layers", "at most 2"),
        "tiny-e5.bin", lambda c: tiny_e5(c.d / "tiny-e5.bin"), extra=("--fit.train_layers=5",))


# ---- the run ---------------------------------------------------------------------------------------
def first_line(out: str, words: tuple[str, ...] = ()) -> str:
    """The message's first line: the error (or, under a header that counts problems, the first problem);
    for a stage that succeeds, the first line saying what the case is about."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if words and not any(": error:" in ln for ln in lines):
        said = [ln for ln in lines if words[0] in ln]
        if said:
            return said[0].strip()
    for i, ln in enumerate(lines):
        if ": error:" in ln or "interrupted" in ln:
            msg = ln.split(": error: ", 1)[-1].strip()
            if msg.endswith(":") and i + 1 < len(lines) and lines[i + 1].lstrip().startswith("- "):
                msg = lines[i + 1].strip()[2:]
            return msg
    return lines[-1].strip() if lines else ""


def judge(cs: Case, c: Ctx, rc: int, out: str) -> str | None:
    """Why the case is not handled, or None."""
    if rc != cs.rc:
        return f"exit {rc}, expected {cs.rc}"
    if "Traceback (most recent call last)" in out:
        return "printed a traceback"
    missing = [w for w in cs.words if w not in out]
    if missing:
        return f"message lacks {missing}"
    return cs.check(c) if cs.check else None


def run_all(root: Path, selected: list[Case]) -> int:
    base = build_base(root)
    rows = []
    for i, cs in enumerate(selected):
        d = root / "cases" / f"{i:02d}"
        unmount_under(d)
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(base, d, symlinks=True)
        c = Ctx(d, root)
        RAN.clear()
        start = time.monotonic()
        try:
            rc, out = cs.run(c)
            why = judge(cs, c, rc, out)
        except Exception as e:  # the battery itself failed on this case
            rc, out, why = -1, "", f"battery error: {type(e).__name__}: {e}"
        msg = first_line(out, cs.words)
        stage = cs.stage or (RAN[-1] if RAN else "?")
        rows.append((cs.name, rc, msg, why, c.notes, time.monotonic() - start, stage))
        print(f"[{i + 1}/{len(selected)}] {cs.name}: exit {rc} {'ok' if why is None else 'NOT HANDLED: ' + why}"
              f" ({time.monotonic() - start:.0f} s)", flush=True)
    handled = sum(1 for r in rows if r[3] is None)
    print()
    print("| # | stage | case | exit | first line of the message | handled |")
    print("|---|---|---|---|---|---|")
    for i, (name, rc, msg, why, notes, secs, stage) in enumerate(rows, 1):
        how = f" ({', '.join(notes)})" if notes else ""
        msg = msg.replace("|", "\\|")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        print(f"| {i} | {stage} | {name}{how} | {rc} | {msg} | {'yes' if why is None else 'NO: ' + why} |")
    print(f"\nbattery: {handled} / {len(rows)} cases handled"
          f" (full disks and read-only folders: {'real tmpfs mounts' if CAN_MOUNT else 'injected or chmod'})")
    print("per stage (handled / cases):")
    for stage, (ok, n, secs) in stage_totals(rows).items():
        print(f"  {stage:<16} {ok} / {n}  ({secs:.0f} s)")
    return 0 if handled == len(rows) else 1


STAGE_ORDER = ("vocab", "data", "train", "evaluate", "extend", "compress", "ablate", "vocab..evaluate", "teachers", "e5")


def stage_totals(rows: list[tuple]) -> dict[str, tuple[int, int, float]]:
    """stage -> (cases handled, cases, seconds), stages in pipeline order."""
    out: dict[str, list] = {}
    for name, rc, msg, why, notes, secs, stage in rows:
        t = out.setdefault(stage, [0, 0, 0.0])
        t[0] += why is None
        t[1] += 1
        t[2] += secs
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return {s: tuple(out[s]) for s in sorted(out, key=lambda s: (order.get(s, len(order)), s))}  # type: ignore[misc]


def entry() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only cases whose name contains this")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (reuses its base run)")
    ap.add_argument("--list", action="store_true", help="list the cases")
    args = ap.parse_args()
    selected = [cs for cs in CASES if args.k.lower() in cs.name.lower()]
    if args.list:
        for cs in selected:
            print(f"{cs.name}  (exit {cs.rc}{', ' + cs.stage if cs.stage else ''})")
        print(f"{len(selected)} cases")
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run_all(args.keep.resolve(), selected)
    with tempfile.TemporaryDirectory(prefix="mergedistill-battery-") as tmp:
        return run_all(Path(tmp), selected)


if __name__ == "__main__":
    sys.exit(entry())
