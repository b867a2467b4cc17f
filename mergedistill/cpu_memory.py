"""How this process's C allocator treats freed memory (CPU tensors live there).

glibc's malloc gives every large block (above a threshold that tops out at 32 MB) its own mmap and
returns it to the system when freed, so the next step's tensor of the same size starts on fresh pages
and pays a page fault per 4 KB to have them zeroed. A training step over a large vocabulary allocates
and frees several such tensors (the (masked positions x vocabulary) logits, their gradient, the
bf16 copies autocast makes): on the demo student, 2 cores spent about a third of each step in the
kernel doing that. `keep_freed_memory` raises the mmap and trim thresholds to 2 GB, so freed blocks
stay in the heap and are reused, as PyTorch's CUDA caching allocator does on GPUs. The price is that
the process's resident memory stays near its peak instead of shrinking between steps.
`make bench-loss` measures both, side by side.

Set MERGEDISTILL_MALLOC=system to keep glibc's defaults (`keep`, or unset: this setting); any other value is
refused (exit 2) rather than read as `keep`. MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ in the environment (glibc's own knobs) are left as the user set them.
Other C libraries (macOS, musl) are left alone."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from mergedistill.errors import UserError

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int
_applied: bool | None = None
SETTINGS = {"keep": "freed memory is kept for reuse (the default)", "system": "glibc's defaults"}
"""The values MERGEDISTILL_MALLOC takes (case-insensitive; unset or empty: keep)."""


def malloc_setting() -> str:
    """MERGEDISTILL_MALLOC, checked: `keep` or `system`; UserError naming the accepted values otherwise (a
    misspelt `system` must not silently keep the memory)."""
    raw = os.environ.get("MERGEDISTILL_MALLOC", "")
    value = raw.strip().lower() or "keep"
    if value not in SETTINGS:
        accepted = "; ".join(f"`{k}`: {v}" for k, v in SETTINGS.items())
        raise UserError(f"MERGEDISTILL_MALLOC={raw!r}: not a setting; use one of {accepted}, or unset it")
    return value


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (see the module's docstring). Idempotent;
    returns whether the setting is in effect. UserError for an unknown MERGEDISTILL_MALLOC."""
    global _applied
    if _applied is not None:
        return _applied
    setting = malloc_setting()
    _applied = False
    if setting == "system":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
            return False
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_LIMIT)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_LIMIT)) == 1 and ok
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("cpu_memory: glibc refused the malloc thresholds; keeping its defaults")
    _applied = ok
    return ok
