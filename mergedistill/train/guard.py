"""What keeps a training run's files sound whatever happens around it.

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin): a checkpoint is written beside its target and
  renamed onto it (same folder, same file system), so a full disk or a kill while saving never destroys
  the last good `last.ckpt`; a write failure is a WriteError ("cannot write <path>: <reason>", exit 2).
  On resume, a checkpoint that cannot be read is named as corrupt, with the way out.
- `InterruptWatch` (a callback): remembers the step at Ctrl-C and at the last checkpoint, so that the
  stage can say "interrupted at step N; continue with --resume" (Lightning itself exits with status 1).
"""
from __future__ import annotations

import io
import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mergedistill.errors import UserError
from mergedistill.fsutil import atomic_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into memory, then one atomic file write (fsutil.atomic_path) onto the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buf = io.BytesIO()
        torch.save(checkpoint, buf)  # torch's own file writer reports a full disk as a RuntimeError
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(buf.getbuffer())

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated, overwritten or not a checkpoint at all: torch raises many kinds
            raise CorruptCheckpoint(path, e) from None


class CorruptCheckpoint(UserError):
    def __init__(self, path, e: Exception):
        first = (str(e).splitlines() or [""])[0][:160]
        super().__init__(f"{path}: corrupt checkpoint, it cannot be read ({type(e).__name__}: {first}); delete it and "
                         "resume from another checkpoint of the folder, or start over with `--force`")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C, with where the stage stopped and how to go on (the CLI prints it and exits 130)."""


class InterruptWatch(L.Callback):
    """Notes the step of a Ctrl-C (Lightning handles KeyboardInterrupt itself and exits with status 1) and
    of the last checkpoint saved."""

    def __init__(self) -> None:
        self.interrupted_at: int | None = None
        self.saved_at: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_at = trainer.global_step

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_at = checkpoint.get("global_step")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted_at = trainer.global_step

    def error(self, last: Path) -> StageInterrupted:
        """The message of a Ctrl-C, once Lightning has handled it (it ignores further Ctrl-Cs meanwhile)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        saved = self.saved_at
        where = (f"the last checkpoint, {last}, is at step {saved}" if saved is not None
                 else "no checkpoint was saved yet, so it starts from step 0")
        return StageInterrupted(f"interrupted at step {self.interrupted_at}; continue with --resume ({where})")
