"""`mergedistill <stage> --config C [--section.key=value ...]`: one entry point, one subcommand per stage.

Exit status: 0 on success, 2 on bad input (config, files, models), 1 on an internal failure.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
import warnings
from typing import Callable

from mergedistill.configlib import describe
from mergedistill.config import RunConfig, load_config
from mergedistill.errors import StageNotAvailable, UserError

log = logging.getLogger("mergedistill")

# stage name -> (one-line summary, "module:function" taking (cfg, args) or None while not built yet)
STAGES: dict[str, tuple[str, str | None]] = {
    "vocab": ("joint vocabulary, teacher->student id maps, per-teacher tokenizers", "mergedistill.vocab.stage:run_vocab"),
    "data": ("routed, masked corpora + offline teacher top-k shards", "mergedistill.data.stage:run_data"),
    "train": ("Lightning training of the student; --resume continues", "mergedistill.train.stage:run_train"),
    "evaluate": ("student vs teachers vs baselines, per language", "mergedistill.eval.stage:run_evaluate"),
    "select": ("rank candidate teachers per language, write a routing", "mergedistill.eval.select:run_select"),
    "ablate": ("teacher-selection variants end to end, one table", "mergedistill.eval.ablate:run_ablate"),
    "run": ("all stages in order, skipping what is already done", "mergedistill.run_all:run_all"),
}


def _fields_help() -> str:
    lines = describe(RunConfig)
    wrapped = [textwrap.fill(line, width=110, subsequent_indent="      ") for line in lines]
    return (
        "config fields (YAML keys; override any of them as --section.key=value):\n  "
        + "\n  ".join(wrapped)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergedistill",
        description="Merge several pretrained masked LMs into one multilingual student by task-agnostic distillation.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (summary, _) in STAGES.items():
        p = sub.add_parser(
            name,
            help=summary,
            description=f"mergedistill {name}: {summary}.",
            epilog=_fields_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", metavar="FILE", help="the run's YAML config (e.g. configs/demo.yaml)")
        p.add_argument("-v", "--verbose", action="store_true", help="log details")
        p.add_argument("--force", action="store_true", help="redo the stage even if its outputs are complete")
        if name in ("train", "run"):
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if name == "train":
            p.add_argument("--baseline", action="store_true",
                           help="train the MLM-only baseline instead (alpha 0, same size, data and steps) into runs/<run>/baseline")
    return parser


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s" if args.verbose else "%(message)s",
        datefmt="%H:%M:%S",
    )
    # Lightning has its own handler: keep its lines once, and only its warnings unless -v
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        lg.propagate = False
        if not args.verbose:
            lg.setLevel(logging.WARNING)
    if not args.verbose:
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "datasets", "fsspec"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    try:
        if bad:
            raise UserError(f"unrecognised arguments {' '.join(bad)}: overrides take the form --section.key=value")
        cfg = load_config(args.config, rest)
        summary, target = STAGES[args.stage]
        if target is None:
            raise StageNotAvailable(
                f"`mergedistill {args.stage}` ({summary}) is not implemented in this version yet; "
                "available: " + ", ".join(n for n, (_, t) in STAGES.items() if t)
            )
        _resolve(target)(cfg, args)
    except UserError as e:
        print(f"mergedistill {args.stage}: error: {e.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mergedistill {args.stage}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # an internal failure: show where
        log.exception(f"mergedistill {args.stage}: internal error (please report it with the traceback above)")
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
