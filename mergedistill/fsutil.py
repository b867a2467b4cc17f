"""Atomic outputs: a stage writes into a temporary sibling and renames it into place when complete,
so a killed run never leaves something that looks finished. A write that fails (full disk, read-only
folder) raises `WriteError` ("cannot write <path>: <reason>", exit 2) and leaves the target as it was;
the temporaries of killed runs are removed by `remove_leftovers` when the stage runs again."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mergedistill.errors import UserError

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
"""Errors that can only mean an output cannot be written."""
ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_HINTS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota exceeded)",
          errno.EROFS: "run from a writable folder", errno.EFBIG: "the file system refuses files this large"}


class WriteError(UserError):
    """An output could not be written (full disk, read-only folder, no permission): exit 2, naming it."""

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None):
        self.path, self.reason, self.code = Path(path), reason, code
        hint = _HINTS.get(code or 0, "make it writable or run from a writable folder")
        super().__init__(f"cannot write {path}: {reason}; {hint}, then rerun the same command (complete outputs are kept)")


def cannot_write(path: str | os.PathLike, e: OSError) -> WriteError:
    return WriteError(path, os.strerror(e.errno) if e.errno else str(e), e.errno)


def _inside(path: str | os.PathLike | None, folder: Path) -> bool:
    if not path:
        return False
    p = Path(os.path.abspath(path))
    return p == folder or folder in p.parents


def is_write_failure(e: OSError, tmp: Path) -> bool:
    """Whether `e`, raised while writing the temporary `tmp` (a file or a folder), means that the output
    cannot be written (rather than, say, an input that cannot be read)."""
    if e.errno in WRITE_ERRNOS:
        return True
    return e.errno in ACCESS_ERRNOS and (_inside(e.filename, Path(os.path.abspath(tmp))) or
                                         _inside(getattr(e, "filename2", None), Path(os.path.abspath(tmp))))


def _renamed(e: WriteError, tmp: Path, final: Path) -> WriteError:
    """`e` with a path inside the temporary `tmp` shown as the same path inside `final`."""
    if _inside(e.path, Path(os.path.abspath(tmp))):
        rel = Path(os.path.abspath(e.path)).relative_to(os.path.abspath(tmp))
        return WriteError(final / rel if str(rel) != "." else final, e.reason, e.code)
    return e


@contextlib.contextmanager
def writing(target: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[None]:
    """Run a block that writes `target` (through `tmp`, when given): a write failure in it becomes a
    WriteError naming `target` (or the file inside it that failed)."""
    target = Path(target)
    try:
        yield
    except WriteError as e:
        raise (e if tmp is None else _renamed(e, Path(tmp), target)) from None
    except OSError as e:
        if not is_write_failure(e, Path(tmp or target)):
            raise
        where = target
        if tmp is not None and _inside(e.filename, Path(os.path.abspath(tmp))):
            rel = Path(os.path.abspath(e.filename)).relative_to(os.path.abspath(tmp))
            where = target / rel if str(rel) != "." else target
        raise cannot_write(where, e) from None


@contextlib.contextmanager
def library_write_errors(path: str | Path) -> Iterator[None]:
    """Run a block that writes `path` through a Rust-backed library (safetensors, tokenizers), which raises a
    failed write as a plain exception ("... No space left on device (os error 28)"): re-raised as the OSError
    it is, naming `path`, so that `atomic_dir` / `atomic_path` report a file that cannot be written (exit 2)
    instead of an internal error."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def make_dirs(path: str | os.PathLike) -> Path:
    """`mkdir -p path`, a failure raised as WriteError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(e.filename or path, e) from None
    return path


def temp_tag() -> str:
    """Part of every temporary name: which process writes it (`pid<N>@<host>`), so that
    `remove_leftovers` can tell the debris of a killed process from a file a live one is writing."""
    return f"pid{os.getpid()}@{socket.gethostname().replace('.', '_')}"


_TAG = re.compile(r"^pid(\d+)@(.+)$")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


def public_mode(fd: int) -> None:
    """Give a mkstemp file (created 0600) the permissions an ordinary open() would: 0666 minus umask."""
    os.fchmod(fd, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` for the caller to write (with any library); when the
    block ends, the file is flushed to disk and renamed onto `path`. On an exception it is removed and
    `path` is left as it was: a reader sees the old file or the new one, never half of one. A write
    failure (full disk, read-only folder) is raised as WriteError naming `path`."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{temp_tag()}.", suffix=".tmp")
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with writing(path, tmp):
            public_mode(fd)  # mkstemp makes 0600 files; outputs are for everyone to read
            os.close(fd)
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` whole.
    On an exception the temporary folder is removed and `final` is left as it was. A write failure
    raises WriteError naming the file of `final` that could not be written."""
    final = Path(final)
    make_dirs(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{temp_tag()}.", suffix=".partial"))
    except OSError as e:
        raise cannot_write(final, e) from None
    try:
        with writing(final, tmp):
            os.chmod(tmp, 0o777 & ~_UMASK)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    with writing(final, tmp):
        if final.exists():
            old = final.with_name(f".{final.name}.{temp_tag()}.old")
            os.replace(final, old)
        os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tag(name: str) -> re.Match | None:
    return next((m for part in name.split(".") if (m := _TAG.match(part))), None)


def _writer_alive(m: re.Match) -> bool:
    """Whether the process a temporary's tag names may still be writing it: a live pid on this host, or
    any process on another host (that cannot be checked from here)."""
    if m.group(2) != socket.gethostname().replace(".", "_"):
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LEFTOVER_SUFFIXES = (".partial", ".tmp", ".old", ".link")


def _leftover(name: str, prefix: str, exclusive: bool) -> bool:
    if not (name.startswith(prefix) and name.endswith(LEFTOVER_SUFFIXES)):
        return False
    tag = _tag(name)
    return exclusive if tag is None else not _writer_alive(tag)


def remove_leftovers(folder: str | os.PathLike, log: logging.Logger | None = None, exclusive: bool = True) -> int:
    """Remove the temporaries that killed runs left in `folder` (recursively) and beside it (named after
    it): `.partial` folders, `.tmp` / `.link` files and `.old` folders whose writer (the pid and host in
    the name) is dead; with `exclusive` (the caller holds the stage's lock) also those without a writer's
    tag (older names). Returns how many were removed."""
    folder = Path(folder)
    found: list[Path] = []
    if folder.parent.is_dir():
        found += [p for p in folder.parent.iterdir() if _leftover(p.name, f".{folder.name}.", exclusive)]
    if folder.is_dir():
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                if _leftover(name, ".", exclusive):
                    found.append(Path(root) / name)
            dirs[:] = [d for d in dirs if not _leftover(d, ".", exclusive)]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    if found:
        (log or logging.getLogger(__name__)).info("removed %d leftover temporary file(s) of an interrupted run from %s", len(found), folder)
    return len(found)


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_record(path: str | os.PathLike, rerun: str) -> dict:
    """The JSON object in `path`, which an earlier stage wrote; a missing, truncated or invalid file raises
    UserError naming it and saying to `rerun` (e.g. "mergedistill data --config c.yaml")."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; rerun `{rerun}`") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: unreadable or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"rerun `{rerun}`") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a JSON object (edited or truncated?); rerun `{rerun}`")
    return obj


def read_json_or_none(path: str | os.PathLike, log: logging.Logger | None = None) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable (then a warning says which:
    the caller rebuilds what it describes)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        (log or logging.getLogger(__name__)).warning("ignoring unreadable %s (%s); it will be rewritten", path, e)
        return None
    return obj if isinstance(obj, dict) else None
