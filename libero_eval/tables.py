"""Plain-text tables for the terminal: the sweep summary, the replay summary and the cache benchmark all
print through `format_table`.

Cells are given already formatted (each caller knows its precision: `fmt` helps with missing values);
numbers given as int/float are printed with `str`/4 significant digits. Columns are as wide as their widest
cell, numeric columns right-aligned, text left-aligned, under a dashed rule.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

MISSING = "-"
# A number as printed in these tables: 12, -0.5, 1e-3, 1,024, with an optional unit (50%, 1.31x, 3.2 ms).
_NUMBER = re.compile(r"[-+]?(\d[\d,]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s?(%|x|ms|s)?")


def fmt(value: Any, spec: str = "", suffix: str = "", missing: str = MISSING) -> str:
    """format(value, spec) + suffix, or `missing` when value is None."""
    return missing if value is None else format(value, spec) + suffix


def is_number(cell: Any) -> bool:
    if isinstance(cell, bool):
        return False
    if isinstance(cell, (int, float)):
        return True
    return isinstance(cell, str) and _NUMBER.fullmatch(cell.strip()) is not None


def _text(cell: Any) -> str:
    if cell is None:
        return MISSING
    if isinstance(cell, float):
        return f"{cell:.4g}"
    return str(cell)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | Sequence[str] | None = None,
                 gap: str = "  ", rule: str = "-") -> str:
    """Header, a rule of `rule` as wide as the header, then one line per row.

    align: one "<" (left) or ">" (right) per column, e.g. "<<>>>"; None: right-align the columns whose
    every present cell is a number (an int/float, or text such as "0.98", "50%", "1.31x"; missing cells
    "-" / None do not count), left-align the rest. A left-aligned last column is not padded (free text).
    """
    headers = [str(h) for h in headers]
    cells = [[_text(c) for c in row] for row in rows]
    for n, row in enumerate(cells):
        if len(row) != len(headers):
            raise ValueError(f"row {n} has {len(row)} cells, the table has {len(headers)} columns: {row}")
    if align is None:
        align = []
        for j in range(len(headers)):
            present = [row[j] for row in rows if row[j] is not None and _text(row[j]) not in (MISSING, "")]
            align.append(">" if present and all(is_number(c) for c in present) else "<")
    align = list(align)
    if len(align) != len(headers) or set(align) - {"<", ">"}:
        raise ValueError(f"align must be one '<' or '>' per column ({len(headers)}), got {align!r}")
    widths = [max([len(headers[j]), *(len(row[j]) for row in cells)]) for j in range(len(headers))]

    def line(values: list[str]) -> str:
        out = [f"{v:{a}{w}}" for v, a, w in zip(values, align, widths, strict=True)]
        return gap.join(out).rstrip()

    lines = [line(row) for row in cells]
    head = line(headers)
    return "\n".join([head, rule * max(len(l) for l in [head, *lines]), *lines])
