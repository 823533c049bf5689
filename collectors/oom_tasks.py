"""The ``Tasks state`` table of a kernel OOM report: its header says which column holds
what (the column set differs between kernels); each row becomes a ``TaskRow``. Pure."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TASK_ROWS = 20_000


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One row of the report's ``Tasks state`` table (the tasks of the OOM memcg)."""

    pid: int
    name: str
    tgid: int | None = None
    uid: int | None = None
    rss_pages: int | None = None
    oom_score_adj: int | None = None


@dataclass(frozen=True, slots=True)
class TableLayout:
    """Where a task table header puts the columns a ``TaskRow`` takes (the column set
    differs between kernels): computed once per header, not per row."""

    splits: int  # a row's values: ``rest.split(None, splits)`` (the name may hold spaces)
    tgid: int | None
    uid: int | None
    rss: int | None
    oom_score_adj: int | None

    def row(self, pid: int, rest: str) -> TaskRow | None:
        """The row ``rest`` (after "[pid]"), or ``None`` if it does not fit the header."""
        values = rest.split(None, self.splits)
        if len(values) != self.splits + 1:
            return None
        tgid, uid, rss, adj = self.tgid, self.uid, self.rss, self.oom_score_adj
        try:  # the columns are numbers (one int() each, not a call per column)
            return TaskRow(
                pid,
                values[-1],
                None if tgid is None else int(values[tgid]),
                None if uid is None else int(values[uid]),
                None if rss is None else int(values[rss]),
                None if adj is None else int(values[adj]),
            )
        except ValueError:  # one is not: that one is None
            return TaskRow(
                pid,
                values[-1],
                _column(values, tgid),
                _column(values, uid),
                _column(values, rss),
                _column(values, adj),
            )

    @classmethod
    def of(cls, columns: list[str]) -> TableLayout | None:
        """``None`` when no row can be read by this header (its last column is not the
        name, or it has no columns)."""
        if not columns or columns[-1] != "name":
            return None
        index = {name: i for i, name in enumerate(columns)}  # the last of a repeated name
        return cls(
            len(columns) - 1,
            index.get("tgid"),
            index.get("uid"),
            index.get("rss"),
            index.get("oom_score_adj"),
        )


def _column(values: list[str], index: int | None) -> int | None:
    if index is None:
        return None
    try:
        return int(values[index])
    except ValueError:
        return None
