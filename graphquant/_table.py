"""The plain-text tables of ``Plan.table()``, ``CompareReport.table()`` and the TFLite reports.

Cells longer than their column are cut in the middle (``conv2d_…_relu``),
so both ends of a long layer path stay readable. The ``graphquant`` command
renders its tables inside :func:`fit_width` with :func:`terminal_width`, so
they fit the terminal; the library's tables (and output piped to a file) keep
their natural width.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import sys
from typing import Collection, Iterator, List, Optional, Sequence

#: the narrowest a column is cut to when a table is fitted to a width
MIN_COLUMN = 8

_WIDTH: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("graphquant_table_width", default=None)


def terminal_width() -> Optional[int]:
    """The terminal's width in columns (``COLUMNS`` when set), or ``None`` when stdout is not a terminal."""
    if os.environ.get("COLUMNS", "").strip().isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


@contextlib.contextmanager
def fit_width(width: Optional[int]) -> Iterator[None]:
    """Within the block, tables are fitted to ``width`` columns (``None``: their natural width)."""
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int or None, got {width!r}")
    token = _WIDTH.set(width)
    try:
        yield
    finally:
        _WIDTH.reset(token)


def table_width() -> Optional[int]:
    """The width tables are fitted to inside :func:`fit_width` (``None``: their natural width)."""
    return _WIDTH.get()


def cut_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters: its middle replaced by "…" when too long."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = width // 2
    tail = width - 1 - head
    return text[:head] + "…" + (text[len(text) - tail :] if tail else "")


def _fitted(widths: List[int], limit: int) -> List[int]:
    """Column widths with the widest columns narrowed (to :data:`MIN_COLUMN` at most) until a line,
    two spaces between columns, fits ``limit``."""
    widths = list(widths)
    sep = 2 * (len(widths) - 1)
    while sum(widths) + sep > limit:
        i = max(range(len(widths)), key=widths.__getitem__)
        if widths[i] <= MIN_COLUMN:
            break
        widths[i] -= 1
    return widths


def render_table(
    header: Sequence[str],
    body: Sequence[Sequence[str]],
    *,
    right: Collection[int] = (),
    max_width: Optional[int] = None,
    width: Optional[int] = None,
) -> List[str]:
    """Lines of a table: the header, a rule of dashes, one line per row.

    Columns are as wide as their widest cell (at most ``max_width``), separated
    by two spaces; the columns in ``right`` are right-aligned, the others
    left-aligned; trailing spaces are dropped. With ``width`` (default: the
    width set by :func:`fit_width`, if any) the widest columns are narrowed
    until a line fits. Longer cells are cut in the middle with "…".
    """
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    if max_width is not None:
        widths = [min(w, max_width) for w in widths]
    limit = width if width is not None else table_width()
    if limit is not None:
        widths = _fitted(widths, limit)

    def line(r: Sequence[str]) -> str:
        cells = []
        for i, (c, w) in enumerate(zip(r, widths)):
            c = cut_middle(c, w)
            cells.append(c.rjust(w) if i in right else c.ljust(w))
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
