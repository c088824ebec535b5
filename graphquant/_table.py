"""The plain-text tables of ``Plan.table()`` and ``CompareReport.table()``."""

from __future__ import annotations

from typing import Collection, List, Optional, Sequence


def render_table(
    header: Sequence[str],
    body: Sequence[Sequence[str]],
    *,
    right: Collection[int] = (),
    max_width: Optional[int] = None,
) -> List[str]:
    """Lines of a table: the header, a rule of dashes, one line per row.

    Columns are as wide as their widest cell (at most ``max_width``; longer
    cells are cut with "…"), separated by two spaces; the columns in ``right``
    are right-aligned, the others left-aligned; trailing spaces are dropped.
    """
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    if max_width is not None:
        widths = [min(w, max_width) for w in widths]

    def line(r: Sequence[str]) -> str:
        cells = []
        for i, (c, w) in enumerate(zip(r, widths)):
            if len(c) > w:
                c = c[: w - 1] + "…"
            cells.append(c.rjust(w) if i in right else c.ljust(w))
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
