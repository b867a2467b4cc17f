"""Which Debian packages feed which language, and how to get a package's files onto disk.

`LANGUAGES` is the recipe: per language, the packages and the kind of text each holds. A
`PackageSource` turns a package name into versions and an unpacked file tree; `AptSource` is the real
one (`apt-get download` + `dpkg-deb -x`, never `apt-get install`), and tests inject `TreeSource`, which
serves hand-made trees from disk, so that no test needs the network.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Protocol

from mergedistill.errors import UserError

logger = logging.getLogger(__name__)

Kind = Literal["help", "man", "fortune"]


class PackageError(UserError):
    """A package could not be found, downloaded or unpacked. The message names the package and the
    command that retries it."""


@dataclass(frozen=True)
class PackageSpec:
    """One Debian package and where its text lives."""

    name: str
    """Debian package name, e.g. `libreoffice-help-de`."""
    kind: Kind
    """Which extractor reads it: LibreOffice help HTML, troff man pages, or fortune files."""
    subdir: str | None = None
    """The language folder inside the package: `de` in `usr/share/libreoffice/help/de/` or
    `usr/share/man/de/`; None for fortunes (all of `usr/share/games/fortunes*/`)."""


@dataclass(frozen=True)
class LanguageSpec:
    """The packages that make up one language's corpus."""

    code: str
    """Our language code, also the folder name under `corpora/`."""
    packages: tuple[PackageSpec, ...]
    langid: str | None
    """Code for the {target, en} language-id filter; None keeps everything (English itself)."""
    cjk: bool = False
    """Count characters instead of words, size fragments by CJK characters, and drop the spaces that
    line-joining leaves between CJK characters."""


def _help(lang: str, pkg_suffix: str | None = None) -> PackageSpec:
    return PackageSpec(f"libreoffice-help-{pkg_suffix or lang.lower()}", "help", lang)


def _man(name: str, subdir: str) -> PackageSpec:
    return PackageSpec(name, "man", subdir)


def _fortune(name: str) -> PackageSpec:
    return PackageSpec(name, "fortune")


def _european(code: str, fortunes: bool) -> LanguageSpec:
    pkgs = [_help(code), _man(f"manpages-{code}", code), _man(f"manpages-{code}-dev", code)]
    if fortunes:
        pkgs.append(_fortune(f"fortunes-{code}"))
    return LanguageSpec(code, tuple(pkgs), langid=code)


LANGUAGES: dict[str, LanguageSpec] = {
    "de": _european("de", fortunes=True),
    "fr": _european("fr", fortunes=False),  # Debian has no fortunes-fr
    "es": _european("es", fortunes=True),
    "ru": _european("ru", fortunes=True),
    "it": _european("it", fortunes=True),
    "pl": _european("pl", fortunes=True),
    "ja": LanguageSpec(
        "ja", (_help("ja"), _man("manpages-ja", "ja"), _man("manpages-ja-dev", "ja")), langid="ja", cjk=True
    ),
    # Simplified Chinese only: the help is zh-CN, and manpages-zh's zh_TW (Traditional) half is left out.
    "zh": LanguageSpec(
        "zh", (_help("zh-CN", "zh-cn"), _man("manpages-zh", "zh_CN"), _fortune("fortunes-zh")), langid="zh", cjk=True
    ),
    # English help only: the pivot for paragraph-aligned pairs (same doc, same id) with every language.
    "en": LanguageSpec("en", (_help("en-US", "en-us"),), langid=None),
}
DEFAULT_LANGS = ("de", "fr", "es", "ru", "ja", "zh", "it", "pl", "en")


class PackageSource(Protocol):
    """Where packages come from. Must be picklable: workers in other processes call `unpack`."""

    def preflight(self) -> list[str]:
        """Problems that stop any download (a missing tool), each with its fix; empty when ready."""

    def versions(self, names: list[str]) -> dict[str, str]:
        """The version that would be fetched for each name; raises PackageError naming every
        package that cannot be found."""

    def unpack(self, name: str, version: str, dest: Path) -> None:
        """Put the package's file tree (`usr/...`) under the empty folder `dest`; raises PackageError."""


def parse_apt_policy(text: str) -> dict[str, str]:
    """Candidate versions from `apt-cache policy A B ...` output; packages without a candidate are left out."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(\S+):$", line)
        if head:
            current = head.group(1)
            continue
        cand = re.match(r"^\s+Candidate:\s+(\S+)", line)
        if cand and current and cand.group(1) != "(none)":
            out[current] = cand.group(1)
    return out


def deb_filename(name: str, version: str) -> str:
    """The cache file name of a package version (apt's own naming: the epoch colon becomes %3a)."""
    return f"{name}_{version.replace(':', '%3a')}.deb"


@dataclass(frozen=True)
class AptSource:
    """Real packages from the configured Debian archive, downloaded once into `deb_dir`."""

    deb_dir: Path
    """Cache of downloaded .deb files, e.g. `corpora/.cache/debs`."""

    def preflight(self) -> list[str]:
        problems = []
        for tool, pkg in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
            if shutil.which(tool) is None:
                problems.append(f"`{tool}` not found: these corpora are built from Debian packages; "
                                f"run on Debian/Ubuntu with the `{pkg}` package")
        return problems

    def versions(self, names: list[str]) -> dict[str, str]:
        proc = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True)
        found = parse_apt_policy(proc.stdout)
        missing = [n for n in names if n not in found]
        if missing:
            raise PackageError(
                [f"{n}: not in the apt package lists (no candidate version)" for n in missing]
                + ["fix: run `apt-get update` (once, as root) so that apt knows these packages, and check "
                   "the names in mergedistill/corpora/sources.py"],
                header=f"{len(missing)} Debian package(s) not found:",
            )
        return {n: found[n] for n in names}

    def fetch(self, name: str, version: str) -> Path:
        """The cached .deb of `name=version`, downloading it first if needed (atomically)."""
        deb = self.deb_dir / deb_filename(name, version)
        if deb.is_file():
            return deb
        self.deb_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".dl-{name}-", dir=self.deb_dir) as tmp:
            cmd = ["apt-get", "download", f"{name}={version}"]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            got = sorted(Path(tmp).glob("*.deb"))
            if proc.returncode != 0 or len(got) != 1:
                errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")] or proc.stderr.splitlines()[-3:]
                raise PackageError(
                    f"{name} {version}: download failed ({'; '.join(errors) or f'exit {proc.returncode}'}). "
                    f"Retry by hand with `cd {self.deb_dir} && apt-get download {name}={version}`"
                )
            os.replace(got[0], deb)
        return deb

    def unpack(self, name: str, version: str, dest: Path) -> None:
        deb = self.fetch(name, version)
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if proc.returncode != 0:
            deb.unlink(missing_ok=True)  # most likely a damaged download: fetch it again next time
            raise PackageError(
                f"{name} {version}: `dpkg-deb -x {deb}` failed ({proc.stderr.strip()[-300:]}); "
                "the cached .deb was removed so that the next run downloads it again"
            )


@dataclass(frozen=True)
class TreeSource:
    """Packages served from already-unpacked folders (tests, or a mirror someone unpacked by hand)."""

    trees: Mapping[str, Path]
    """Package name -> folder that holds its `usr/...` tree."""
    version: str = "0-test"
    """The version reported for every package."""

    def preflight(self) -> list[str]:
        return []

    def versions(self, names: list[str]) -> dict[str, str]:
        missing = [n for n in names if n not in self.trees]
        if missing:
            raise PackageError([f"{n}: no such package in this tree source" for n in missing]
                               + ["fix: add a tree for it"],
                               header=f"{len(missing)} package(s) not found:")
        return {n: self.version for n in names}

    def unpack(self, name: str, version: str, dest: Path) -> None:
        src = Path(self.trees[name])
        if not src.is_dir():
            raise PackageError(f"{name}: tree {src} does not exist; create it or drop the package")
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
