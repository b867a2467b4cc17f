"""Real per-language text corpora from Debian packages (`make corpora`).

LibreOffice help (HTML, paragraph ids shared across languages), translated man pages (troff, rendered
with groff) and fortune files are downloaded with `apt-get download`, unpacked with `dpkg-deb -x`,
extracted, cleaned (whitespace, fragments, untranslated English, duplicates) and split into
train/valid/test by source document. Output: `corpora/<lang>/{train,valid,test}.{txt,jsonl}` and
`corpora/manifest.json`. Run `python -m mergedistill.demo.corpora --help`.

Modules, one job each: `sources` (which packages, how to fetch them), `extract` (file formats ->
paragraphs), `cache` (extracted text per package version), `clean`, `split`, `language` (one
language's folder), `manifest` (checksums, atomic JSON), `build` (the cached parallel pipeline).
"""
from .build import BuildResult, build_corpora
from .sources import (
           DEFAULT_LANGS,
           LANGUAGES,
           AptSource,
           LanguageSpec,
           PackageSpec,
           TreeSource,
)

__all__ = ["BuildResult", "build_corpora", "DEFAULT_LANGS", "LANGUAGES", "AptSource", "LanguageSpec",
           "PackageSpec", "TreeSource"]
