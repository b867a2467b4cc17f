"""`python -m mergedistill.demo.corpora [--out corpora] [--langs de,fr,...] [-j N] [--force] [-v]`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from mergedistill.errors import UserError

from .build import build_corpora
from .sources import DEFAULT_LANGS, LANGUAGES, PackageSource


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mergedistill.demo.corpora",
        description="Build per-language text corpora (train/valid/test by source document) from Debian "
                    "packages: LibreOffice help, translated man pages and fortunes. Downloads and "
                    "extracted text are cached under OUT/.cache; a run over complete corpora verifies "
                    "the checksums in OUT/manifest.json and skips.",
    )
    parser.add_argument("--out", default="corpora", help="output folder (default: %(default)s)")
    parser.add_argument("--langs", default=",".join(DEFAULT_LANGS),
                        help=f"comma-separated languages (default: %(default)s; known: {', '.join(LANGUAGES)}); "
                             "en is the LibreOffice help only, the pivot for aligned pairs")
    parser.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes for downloading/extracting/building (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the requested languages even if complete (cached downloads are kept)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, source: PackageSource | None = None) -> int:
    """Run the stage; returns the exit status: 0 done or skipped, 2 bad input or a package problem."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stdout)
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    try:
        build_corpora(args.out, langs, jobs=args.jobs, source=source, force=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
