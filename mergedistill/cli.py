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

from mergedistill.config import RunConfig, load_config
from mergedistill.configlib import describe
from mergedistill.errors import UserError

log = logging.getLogger("mergedistill")

# stage name -> (one-line summary, "module:function", flags). The function takes the config and the flags as
# keyword-only booleans, which become the subcommand's --flags (FLAGS says what each does). Stage modules
# load only when their stage runs: training imports Lightning, which takes seconds.
STAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "vocab": ("joint vocabulary, teacher->student id maps, per-teacher tokenizers", "mergedistill.vocab.stage:run_vocab",
              ("force",)),
    "data": ("routed, masked corpora + offline teacher top-k shards", "mergedistill.data.stage:run_data", ("force",)),
    "train": ("Lightning training of the student; --resume continues", "mergedistill.train.stage:run_train",
              ("resume", "baseline", "force", "restart_if_changed")),
    "evaluate": ("student vs teachers vs baselines, per language", "mergedistill.eval.stage:run_evaluate", ("force",)),
    "select": ("rank candidate teachers per language, write a routing", "mergedistill.eval.select:run_select", ()),
    "ablate": ("teacher-selection variants end to end, one table", "mergedistill.eval.ablate:run_ablate", ()),
    "run": ("all stages in order, skipping what is already done", "mergedistill.run_all:run_all", ("force",)),
    "compress": ("pruning / quantization / smaller-student audit, per language", "mergedistill.compress.stage:run_compress",
                 ("force",)),
}

FLAGS = {
    "force": "redo the stage even if its outputs are complete",
    "resume": "continue from the last checkpoint (refused if it was trained with other settings)",
    "baseline": "train the MLM-only baseline instead (nothing from any teacher; same size, data and steps) into runs/<run>/baseline",
    "restart_if_changed": "continue the last checkpoint if it was trained with these settings, else start over (what `run` does)",
}


def stage_function(name: str) -> Callable:
    module, func = STAGES[name][1].split(":")
    return getattr(importlib.import_module(module), func)


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
    for name, (summary, _, flags) in STAGES.items():
        p = sub.add_parser(
            name,
            help=summary,
            description=f"mergedistill {name}: {summary}.",
            epilog=_fields_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", metavar="FILE", help="the run's YAML config (e.g. configs/demo.yaml)")
        p.add_argument("-v", "--verbose", action="store_true", help="log details")
        for flag in flags:
            p.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", help=FLAGS[flag])
    return parser


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
        stage_function(args.stage)(cfg, **{flag: getattr(args, flag) for flag in STAGES[args.stage][2]})
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
