"""Result tables for people (markdown) and for tools (CSV), written the same way by every stage."""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence

from mergedistill.fsutil import write_text_atomic


def cell(value: Any) -> str:
    """One markdown cell: floats with 3 decimals, integers with thousands separators, text with its
    pipes escaped (a `|` would end the cell)."""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table. `align`: one letter per column, `l` or `r` (default: left everywhere)."""
    rule = [("---:" if a == "r" else "---") for a in (align or "l" * len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file atomically (a reader never sees half of it)."""
    write_text_atomic(path, csv_text(header, rows))


def dict_rows(records: Sequence[dict], header: Sequence[str]) -> list[list[Any]]:
    """Records (dicts) as rows in `header`'s order, for `csv_text` / `markdown_table`."""
    return [[r.get(h, "") for h in header] for r in records]
