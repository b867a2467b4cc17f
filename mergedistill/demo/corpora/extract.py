"""Raw paragraphs from an unpacked package: LibreOffice help HTML, troff man pages, fortune files.

Each extractor walks its part of the tree and yields one `Document` per source file, named by its
path relative to the language root (`text/swriter/guide/autocorr.html`, `man1/ls.1.gz`,
`fortunes/de/murphy`), so that the same help file has the same name in every language. Text comes out
with whitespace collapsed but otherwise raw; language-aware cleaning is `clean.py`'s job.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import lxml.etree
import lxml.html

from .sources import Kind, PackageError, PackageSpec

logger = logging.getLogger(__name__)

EXTRACT_VERSION = 2
"""Bump when extraction output changes: it is part of the extracted-text cache's file names."""

Paragraph = tuple["str | None", str]
"""(key, text): key is the help paragraph's id attribute (shared across languages) or None."""


@dataclass
class Document:
    """One source file's paragraphs, in reading order."""

    source: Kind
    doc: str
    """Path relative to the language root; decides the split, identical across languages."""
    paras: list[Paragraph] = field(default_factory=list)


def _collapse(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- help

HELP_BLOCKS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th"})
# Page chrome, code and things without prose. Dropping keeps an element's tail text (it belongs to the parent).
HELP_DROP = frozenset({"script", "style", "code", "pre", "noscript", "header", "footer", "aside", "nav",
                       "button", "input", "label", "img", "object", "svg"})


def _pick_switch_variant(switch) -> None:
    """Inline switches hold one hidden variant per platform/module ("Cmd" for MAC, "Ctrl" by default);
    keep the default variant (or the first one) so the sentence reads once."""
    variants = [c for c in switch if isinstance(c.tag, str)]
    keep = [c for c in variants if (c.get("id") or "").startswith("default")] or variants[:1]
    for c in variants:
        if c not in keep:
            c.drop_tree()


def help_paragraphs(html: bytes) -> list[Paragraph]:
    """Leaf <p>/<h*>/<li>/<td>/<th> elements of a LibreOffice help page's content area, as (id, text);
    scripts, code, page header/footer/sidebars and non-default switch variants are dropped."""
    root = lxml.html.document_fromstring(html, parser=lxml.html.HTMLParser(encoding="utf-8"))
    area = root.get_element_by_id("DisplayArea", None)
    if area is None:
        area = root.find("body") if root.find("body") is not None else root
    for el in [e for e in area.iter() if isinstance(e.tag, str) and e.tag in HELP_DROP]:
        if el.getparent() is not None:
            el.drop_tree()
    for switch in area.find_class("switchinline"):
        _pick_switch_variant(switch)
    for br in area.iter("br"):
        br.tail = " " + (br.tail or "")  # "a<br>b" must not become "ab"
    out: list[Paragraph] = []
    for el in area.iter(*HELP_BLOCKS):
        if any(isinstance(d.tag, str) and d.tag in HELP_BLOCKS for d in el.iterdescendants()):
            continue  # not a leaf: its text is taken from the blocks inside it
        text = _collapse(el.text_content())
        if text:
            out.append((el.get("id") or None, text))
    return out


def help_root(tree: Path, spec: PackageSpec) -> Path:
    """`usr/share/libreoffice/help/<lang>` inside an unpacked help package."""
    root = tree / "usr/share/libreoffice/help" / str(spec.subdir)
    if not (root / "text").is_dir():
        found = sorted(p.parent.name for p in (tree / "usr/share/libreoffice/help").glob("*/text"))
        raise PackageError(f"{spec.name}: no help pages under {root}/text (found languages: {found or 'none'}); "
                           f"fix the folder name for this package in mergedistill/corpora/sources.py")
    return root


def extract_help(tree: Path, spec: PackageSpec) -> Iterator[Document]:
    """One Document per help HTML file, named like `text/swriter/guide/autocorr.html`."""
    root = help_root(tree, spec)
    for path in sorted((root / "text").rglob("*.html")):
        if path.is_symlink() or not path.is_file():
            continue
        doc = path.relative_to(root).as_posix()
        try:
            paras = help_paragraphs(path.read_bytes())
        except (lxml.etree.ParserError, ValueError) as e:  # e.g. an empty file
            logger.warning("%s: skipping %s (%s)", spec.name, doc, e)
            continue
        yield Document("help", doc, paras)


# ----------------------------------------------------------------------------------------------- man

GROFF = ["groff", "-k", "-Tutf8", "-man", "-rLL=3000n", "-rHY=0", "-P-cbou"]


def groff_problem() -> str | None:
    """Why man pages cannot be rendered here, with the fix; None when groff is installed."""
    if shutil.which("groff") is None:
        return ("`groff` not found: man pages are rendered with `groff -k -Tutf8 -man`; install it with "
                "`apt-get install groff-base` (as root), or build without the man pages' languages")
    return None


def is_so_link(source: bytes) -> bool:
    """True for a `.so other/page.1` redirect page: its first line that is not a comment is `.so`."""
    for line in source.splitlines():
        line = line.strip()
        if not line or line.startswith((b'.\\"', b"'\\\"", b'.\\#')):
            continue
        return line.startswith(b".so ") or line == b".so"
    return False


TBL_BLOCK = re.compile(rb"^\.TS\b.*?^\.TE\b[^\n]*\n?", re.M | re.S)


def drop_tables(source: bytes) -> bytes:
    """Remove tbl tables (`.TS` ... `.TE`). The recipe runs no tbl preprocessor, so their format
    lines (`l l l c lp-1.`) would leak into the text; rendered, they are box-drawing grids of codes
    and constants, not prose."""
    return TBL_BLOCK.sub(b"", source)


def render_man(source: bytes, name: str = "<page>") -> str:
    """Plain UTF-8 text of a troff man page: lines unwrapped (LL=3000n), no hyphenation, no
    bold/underline overstrikes. `-k` runs preconv, so non-ASCII sources come out right."""
    env = dict(os.environ, LC_ALL="C.UTF-8")  # preconv's fallback input encoding follows the locale
    proc = subprocess.run(GROFF, input=source, capture_output=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"groff failed on {name}: {proc.stderr.decode('utf-8', 'replace').strip()[-300:]}")
    return proc.stdout.decode("utf-8", "replace")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def man_paragraphs(rendered: str) -> list[str]:
    """Blank-line-separated blocks of rendered man text, without the page header and footer lines
    (the first and last non-empty lines: `LS(1)   User Commands   LS(1)`).

    A block is also cut where the indentation changes: groff puts a section heading (column 0) or an
    option tag (`-a, --all`) on the line right above its indented text, and gluing "DESCRIPTION" to
    the first sentence would make a paragraph nobody wrote. Lines are not wrapped (LL=3000n), so a
    line at one indentation is a whole filled paragraph."""
    lines = rendered.splitlines()
    nonempty = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(nonempty) < 2:
        return []
    body = lines[nonempty[0] + 1: nonempty[-1]]
    blocks, current, indent = [], [], None
    for ln in body + [""]:
        if ln.strip() and (not current or _indent(ln) == indent):
            current.append(ln.strip())
            indent = _indent(ln)
            continue
        if current:
            blocks.append(" ".join(current))
        current, indent = ([ln.strip()], _indent(ln)) if ln.strip() else ([], None)
    return [_collapse(b) for b in blocks]


def extract_man(tree: Path, spec: PackageSpec) -> Iterator[Document]:
    """One Document per gzipped man page under `usr/share/man/<lang>/man*/`, named like `man1/ls.1.gz`;
    symlinks and `.so` redirect pages are skipped, tables dropped."""
    root = tree / "usr/share/man" / str(spec.subdir)
    if not root.is_dir():
        found = sorted(p.name for p in (tree / "usr/share/man").glob("*"))
        raise PackageError(f"{spec.name}: no man pages under {root} (found: {found or 'none'}); "
                           f"fix the folder name for this package in mergedistill/corpora/sources.py")
    skipped = 0
    for path in sorted(root.glob("man*/*.gz")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            source = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as e:
            logger.warning("%s: skipping %s, not a readable gzip file (%s)", spec.name, path.relative_to(root), e)
            continue
        if is_so_link(source):
            skipped += 1
            continue
        doc = path.relative_to(root).as_posix()
        try:
            rendered = render_man(drop_tables(source), f"{spec.name}:{doc}")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            logger.warning("%s: skipping %s (%s)", spec.name, doc, e)
            continue
        yield Document("man", doc, [(None, p) for p in man_paragraphs(rendered)])
    if skipped:
        logger.debug("%s: skipped %d .so link pages", spec.name, skipped)


# ------------------------------------------------------------------------------------------- fortune

# CSI sequences (colours: ESC [ 33 m) and the two-byte escapes; then backspace overstrikes (x BS x).
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
OVERSTRIKE = re.compile(r".\x08")
FORTUNE_SEP = re.compile(r"^%[ \t]*$", re.M)


def fortune_paragraphs(text: str) -> list[str]:
    """One paragraph per fortune: split on lines holding only `%`, ANSI colour codes stripped."""
    text = OVERSTRIKE.sub("", ANSI.sub("", text))
    return [p for p in (_collapse(chunk) for chunk in FORTUNE_SEP.split(text)) if p]


def extract_fortunes(tree: Path, spec: PackageSpec) -> Iterator[Document]:
    """One Document per fortune file under `usr/share/games/fortunes*/`, named like `fortunes/de/murphy`;
    `.dat` indexes, links, empty files and offensive (`off/`) collections are skipped."""
    games = tree / "usr/share/games"
    if not any(games.glob("fortunes*")):
        raise PackageError(f"{spec.name}: no fortune files under {games}/fortunes*; "
                           f"check this package's kind in mergedistill/corpora/sources.py")
    files = sorted(p for d in games.glob("fortunes*") for p in ([d] if d.is_file() else d.rglob("*")))
    for path in files:
        rel = path.relative_to(games)
        if (path.is_symlink() or not path.is_file() or path.suffix == ".dat" or path.stat().st_size == 0
                or "off" in rel.parts[:-1]):
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("%s: %s is not UTF-8; decoding it as Latin-1", spec.name, rel)
            text = raw.decode("latin-1")
        yield Document("fortune", rel.as_posix(), [(None, p) for p in fortune_paragraphs(text)])


EXTRACTORS = {"help": extract_help, "man": extract_man, "fortune": extract_fortunes}


def extract_documents(tree: Path, spec: PackageSpec) -> Iterator[Document]:
    """Documents of an unpacked package, with the extractor its kind calls for."""
    return EXTRACTORS[spec.kind](tree, spec)
