"""The allocator setting the entry points apply (mergedistill/cpu_memory.py)."""
import ctypes
import ctypes.util

import pytest

from mergedistill import cpu_memory


@pytest.fixture()
def fresh(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", None)
    for var in ("MERGEDISTILL_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="the setting is glibc's; other C libraries are left alone")
def test_glibc_takes_the_setting_once(fresh):
    assert cpu_memory.keep_freed_memory() is True
    fresh.setenv("MERGEDISTILL_MALLOC", "system")
    assert cpu_memory.keep_freed_memory() is True  # decided once per process


@pytest.mark.parametrize("var, value", [("MERGEDISTILL_MALLOC", "system"), ("MERGEDISTILL_MALLOC", "SYSTEM"),
                                        ("MALLOC_TRIM_THRESHOLD_", "131072"), ("MALLOC_MMAP_THRESHOLD_", "131072")])
def test_the_user_can_keep_the_system_allocator(fresh, var, value):
    fresh.setenv(var, value)
    assert cpu_memory.keep_freed_memory() is False


@pytest.mark.parametrize("value", ["keep", "KEEP", "", " system "])
def test_the_accepted_values(fresh, value):
    fresh.setenv("MERGEDISTILL_MALLOC", value)
    assert cpu_memory.malloc_setting() == (value.strip().lower() or "keep")


def test_a_misspelt_value_is_refused_naming_the_accepted_ones(fresh, capsys):
    """MERGEDISTILL_MALLOC=sytem used to keep the memory silently; now every entry point exits 2 saying why."""
    from mergedistill.cli import main
    from mergedistill.errors import UserError

    fresh.setenv("MERGEDISTILL_MALLOC", "sytem")
    with pytest.raises(UserError, match=r"MERGEDISTILL_MALLOC='sytem': not a setting; use one of `keep`.*`system`"):
        cpu_memory.keep_freed_memory()
    assert cpu_memory._applied is None  # nothing decided
    assert main(["vocab", "--config", "no-such.yaml"]) == 2
    err = capsys.readouterr().err
    assert "mergedistill vocab: error: MERGEDISTILL_MALLOC='sytem': not a setting" in err and "Traceback" not in err
