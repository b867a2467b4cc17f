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
from mergedistill.cpu_memory import keep_freed_memory
from mergedistill.errors import UserError
from mergedistill.preflight import preflight

log = logging.getLogger("mergedistill")

# stage name -> (one-line summary, "module:function", flags). The function takes the config and the flags as
# keyword-only arguments, which become the subcommand's --flags (FLAGS says what each does): a plain name is
# a boolean switch, `name=METAVAR` an option that takes a value (and is required), `name=METAVAR...` one that
# may be given several times (at least once; the function gets the list). Stage modules load only when their
# stage runs: training imports Lightning, which takes seconds.
STAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "vocab": ("joint vocabulary, teacher->student id maps, per-teacher tokenizers", "mergedistill.vocab.stage:run_vocab",
              ("force",)),
    "data": ("routed, masked corpora + offline teacher top-k shards", "mergedistill.data.stage:run_data", ("force", "verify")),
    "train": ("Lightning training of the student; --resume continues", "mergedistill.train.stage:run_train",
              ("resume", "baseline", "force", "restart_if_changed")),
    "evaluate": ("student vs teachers vs baselines, per language", "mergedistill.eval.stage:run_evaluate", ("force",)),
    "select": ("rank candidate teachers per language, write a routing", "mergedistill.eval.select:run_select", ()),
    "ablate": ("teacher-selection variants end to end, one table", "mergedistill.experiments.ablate:run_ablate", ("archs",)),
    "sweep": ("recipe variants end to end (--vary section.key=v1,v2), one table", "mergedistill.experiments.sweep:run_sweep",
              ("vary=KEY=V1,V2...",)),
    "run": ("all stages in order, skipping what is already done", "mergedistill.experiments.run:run_all", ("force",)),
    "extend": ("add a language to the distilled student (mini-model adaptation)", "mergedistill.extend.stage:run_extend",
               ("language=LANG", "force")),
    "compress": ("pruning / quantization / smaller-student audit, per language", "mergedistill.compress.stage:run_compress",
                 ("force",)),
}

FLAGS = {
    "force": "redo the stage even if its outputs are complete",
    "resume": "continue from the last checkpoint (refused if it was trained with other settings)",
    "baseline": "train the MLM-only baseline instead (nothing from any teacher; same size, data and steps) into runs/<run>/baseline",
    "restart_if_changed": "continue the last checkpoint if it was trained with these settings, else start over (what `run` does)",
    "verify": "build nothing: check that every shard is complete and that its content matches the hash in its record",
    "archs": "instead of routing variants: a dense and an X-Mod student of the same body, data and steps, one table (runs/<run>/archs/)",
    "language": "the new language: a code declared under extend.languages in the config",
    "vary": "a config field and the values to try, e.g. train.temperature=1,2 (values as YAML, comma-separated); "
            "repeat for more fields: every combination is a variant",
}


def flag_name(flag: str) -> str:
    """`force` -> `force`; `language=LANG` -> `language` (the keyword argument of the stage function)."""
    return flag.partition("=")[0]


def repeats(flag: str) -> bool:
    """`vary=KEY=V1,V2...`: an option that may be given several times."""
    return flag.endswith("...")


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
            name, _, metavar = flag.partition("=")
            if repeats(flag):
                p.add_argument("--" + name.replace("_", "-"), dest=name, metavar=metavar[:-3], required=True, action="append",
                               help=FLAGS[name] + " (may be repeated)")
            elif metavar:
                p.add_argument("--" + name.replace("_", "-"), dest=name, metavar=metavar, required=True, help=FLAGS[name])
            else:
                p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", help=FLAGS[name])
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
        keep_freed_memory()  # large CPU tensors reuse freed heap memory instead of faulting in fresh pages
        if bad:
            raise UserError(f"unrecognised arguments {' '.join(bad)}: overrides take the form --section.key=value")
        cfg = load_config(args.config, rest)
        preflight(cfg, args.stage)  # what the teachers' configs say about the settings, before any work
        stage_function(args.stage)(cfg, **{flag_name(f): getattr(args, flag_name(f)) for f in STAGES[args.stage][2]})
    except UserError as e:
        print(f"mergedistill {args.stage}: error: {e.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a stage may say where it stopped (train: the step)
        print(f"mergedistill {args.stage}: {str(e) or 'interrupted; rerun the same command to resume'}", file=sys.stderr)
        return 130
    except OSError as e:
        # a file that cannot be written (full disk, read-only folder) or read (permissions) anywhere
        # (libraries included): bad input, not a bug. Stages write atomically, so nothing half-written stays.
        message = _environment_error(e)
        if message is None:
            log.exception(f"mergedistill {args.stage}: internal error (please report it with the traceback above)")
            return 1
        print(f"mergedistill {args.stage}: error: {message}", file=sys.stderr)
        return 2
    except Exception:  # an internal failure: show where
        log.exception(f"mergedistill {args.stage}: internal error (please report it with the traceback above)")
        return 1
    return 0


def _environment_error(e: OSError) -> str | None:
    """The message for an OSError that the user's environment causes, or None for any other."""
    import os

    from mergedistill.fsutil import ACCESS_ERRNOS, WRITE_ERRNOS, cannot_write

    path = e.filename or "a file"
    if e.errno in WRITE_ERRNOS:
        return cannot_write(path, e).render()
    if e.errno in ACCESS_ERRNOS:
        if e.filename and os.path.exists(e.filename) and not os.access(e.filename, os.R_OK):
            return f"cannot read {path}: {os.strerror(e.errno)}; make it readable, then rerun the same command"
        return cannot_write(path, e).render()
    return None


def entry() -> None:
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before a stage started (while reading the command line or the config)
        print("mergedistill: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    entry()
