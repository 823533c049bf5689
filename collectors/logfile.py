"""Kernel log text from a support bundle → :class:`KernelRecord` values.

Understands raw ``/dev/kmsg`` dumps, ``dmesg`` (also ``-x``, ``-T``), ``journalctl -k`` in
its short forms (also ``--no-hostname``) and syslog files (with or without the host name).
In a file with none of these stamps every line is a plain message (``dmesg -t``, bare
messages); once a line with a stamp was seen, a line in no known form is not understood:
it is skipped and counted in :class:`LogReading`, never read as a message. Parsing is
pure and never raises on malformed text; only :func:`read_kernel_log_file` touches the
file system.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, islice
from pathlib import Path
from typing import BinaryIO

from collectors.records import KernelRecord

KMSG = "kmsg"
DMESG = "dmesg"
DMESG_T = "dmesg-T"
JOURNAL_SHORT = "journal-short"
JOURNAL_ISO = "journal-iso"
PLAIN = "plain"

MAX_LINE_LENGTH = 64 * 1024
"""Longer lines are cut to this many characters (bytes when reading a file)."""

DETECT_SAMPLE_LINES = 20
KEPT_LINE_NUMBERS = 5

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
_MONTH = "(?P<month>" + "|".join(_MONTHS) + ")"
_WEEKDAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_CLOCK = r"(?P<clock>\d\d:\d\d:\d\d(?:\.\d{1,6})?)"
# "[<hostname> ]<identifier>[<pid>]: " — the identifier of kernel records is always
# "kernel"; syslog files and `journalctl --no-hostname` print no hostname. A hostname does
# not end in ":" (else "kernel: CPU: 1 …" would be host "kernel:", identifier "CPU").
_JOURNAL_SOURCE = (
    r"(?: (?P<host>\S*[^\s:]))? (?P<ident>[^\s\[:]+)(?:\[\d{1,10}\])?:(?: |$)(?P<message>.*)"
)

# prio,seq,usec,flags[,more fields];message
_KMSG_RE = re.compile(
    r"(?P<prio>\d{1,10}),(?P<seq>\d{1,20}),(?P<usec>\d{1,20}),[^;]*;(?P<message>.*)"
)
# dmesg -x: "kern  :warn  : " before the usual dmesg line
_DMESG_LEVEL_RE = re.compile(
    r"(?P<facility>[a-z][a-z0-9]{1,8}) *:"
    r"(?:emerg|alert|crit|err|warn|notice|info|debug) *: (?P<rest>.*)"
)
_UPTIME_PREFIX_RE = re.compile(r"\[ *(?P<uptime>\d{1,12}\.\d{1,9})\] ?(?P<message>.*)")
_DMESG_CTIME_RE = re.compile(
    r"\[" + _WEEKDAY + " " + _MONTH + r" +(?P<day>\d{1,2}) " + _CLOCK + r" (?P<year>\d{4})\]"
    r" ?(?P<message>.*)"
)
_JOURNAL_SHORT_RE = re.compile(_MONTH + r" +(?P<day>\d{1,2}) " + _CLOCK + _JOURNAL_SOURCE)
_JOURNAL_ISO_RE = re.compile(
    r"(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:?\d\d))" + _JOURNAL_SOURCE
)
# journalctl -o short-full: "Wed 2026-11-25 07:41:49 UTC host kernel: message"
_JOURNAL_FULL_RE = re.compile(
    _WEEKDAY + r" (?P<date>\d{4}-\d\d-\d\d) " + _CLOCK + r" (?P<zone>\S+)" + _JOURNAL_SOURCE
)
# journalctl -o short-unix: "1795592509.236982 host kernel: message"
_JOURNAL_UNIX_RE = re.compile(r"(?P<epoch>\d{1,11})\.(?P<micros>\d{6})" + _JOURNAL_SOURCE)
# journalctl -o short-monotonic prints the dmesg stamp, then "<hostname> kernel: "
_MONOTONIC_SOURCE_RE = re.compile(r"\S+ kernel:(?: |$)(?P<message>.*)")
# "-- Boot 3d12… --", "-- Logs begin at … --", "-- No entries --", "-- Reboot --"
_JOURNAL_MARKER_RE = re.compile(r"-- .* --")
_UTC_ZONE_NAMES = frozenset({"UTC", "GMT", "Z"})


@dataclass(frozen=True, slots=True)
class _Line:
    """One recognised line, before it becomes a record."""

    format: str
    message: str
    time: datetime | None = None
    uptime: float | None = None
    seq: int | None = None
    from_kernel: bool = True
    year_inferred: bool = False


@dataclass
class LogReading:
    """What reading a log file could not use, and where the year of year-less stamps
    came from (for the reader to say)."""

    not_understood: int = 0
    not_understood_lines: list[int] = field(default_factory=list)
    """The line numbers of the first ``KEPT_LINE_NUMBERS`` lines not understood."""
    year_source: str | None = None
    """``None``: no year-less stamp in the file; else how their year was found."""

    def skip(self, number: int) -> None:
        self.not_understood += 1
        if len(self.not_understood_lines) < KEPT_LINE_NUMBERS:
            self.not_understood_lines.append(number)


class _YearClock:
    """Years for year-less timestamps: starts at ``year``, +1 when the month wraps around.

    A drop of six months or more between consecutive records is taken as a new year
    (December → January); a smaller drop is a clock that went back, not a new year.
    ``inferred``: ``year`` was not given by the user.
    """

    def __init__(self, year: int | None, *, inferred: bool = False) -> None:
        self._year = year
        self._month: int | None = None
        self.inferred = inferred

    @property
    def year(self) -> int | None:
        return self._year

    def year_for(self, month: int) -> int | None:
        if self._month is not None and self._month - month >= 6 and self._year is not None:
            self._year += 1
        self._month = month
        return self._year


_LineParser = Callable[[str, _YearClock], _Line | None]


def parse_kernel_log_text(
    lines: Iterable[str],
    *,
    year: int | None = None,
    year_inferred: bool = False,
    reading: LogReading | None = None,
) -> Iterator[KernelRecord]:
    """Yield the kernel records in ``lines`` of kernel log text, whatever its format.

    ``year`` is the year of the first record of year-less formats (``journalctl -o short``,
    syslog); without it those records have ``time=None``; ``year_inferred`` marks their
    records (``KernelRecord.year_inferred``). Records written by userspace (a kmsg facility
    other than kernel, ``dmesg -x`` lines of another facility, journal lines of another
    identifier) are skipped, as are journal markers and kmsg continuation lines; lines
    not understood are skipped and counted in ``reading``.
    """
    iterator = iter(lines)
    sample = list(islice(iterator, DETECT_SAMPLE_LINES))
    detected = detect_format(sample)
    parsers = _parsers_trying_first(detected)
    clock = _YearClock(year, inferred=year_inferred)
    stamped = detected != PLAIN  # plain lines are messages only in a file without stamps
    after_kmsg = False
    for number, raw in enumerate(chain(sample, iterator), start=1):
        text = _clean(raw)
        if after_kmsg and text.startswith(" "):
            continue  # " SUBSYSTEM=…", " DEVICE=…" continue the previous kmsg record
        if not text or _JOURNAL_MARKER_RE.fullmatch(text):
            continue
        line = _parse_line(text, parsers, clock)
        after_kmsg = line.format == KMSG
        if line.format == PLAIN and stamped:
            if reading is not None:
                reading.skip(number)
            continue
        stamped = stamped or line.format != PLAIN
        if line.from_kernel:
            yield _to_record(line, number)


def read_kernel_log_file(
    path: Path, *, year: int | None = None, reading: LogReading | None = None
) -> Iterator[KernelRecord]:
    """Yield the kernel records of a log file.

    Year-less stamps (syslog, ``journalctl -o short``) get ``year`` for the first of them
    when given; else the year the file's dated lines (``dmesg -T``, ISO stamps) show; else
    the latest year that puts the file's last year-less stamp no later than the file's
    mtime (nor now). The years after the first follow the stamps' months. ``reading``
    receives what could not be used and where the year came from. Iterating raises
    ``OSError`` if the file cannot be read.
    """
    modified = min(datetime.fromtimestamp(path.stat().st_mtime, UTC), datetime.now(UTC))
    with path.open("rb") as file:
        years = _scan_years(_decoded_lines(file))
        first_year, source = _first_year(years, year, modified)
        if reading is not None:
            reading.year_source = source if years.has_yearless else None
        file.seek(0)
        yield from parse_kernel_log_text(
            _decoded_lines(file), year=first_year, year_inferred=year is None, reading=reading
        )


def detect_format(sample_lines: list[str]) -> str:
    """The format most of the sample's records are in; ``plain`` when none is recognised."""
    votes: dict[str, int] = {}
    clock = _YearClock(None)
    for raw in sample_lines:
        text = _clean(raw)
        if not text or text.startswith(" ") or _JOURNAL_MARKER_RE.fullmatch(text):
            continue
        line_format = _parse_line(text, _PARSERS, clock).format
        votes[line_format] = votes.get(line_format, 0) + 1
    recognised = {name: count for name, count in votes.items() if name != PLAIN}
    if not recognised:
        return PLAIN
    # max() keeps the first of equal counts: the format seen first wins a tie.
    return max(recognised, key=recognised.__getitem__)


def _clean(raw: str) -> str:
    return raw[:MAX_LINE_LENGTH].rstrip("\r\n").removeprefix("\ufeff")


def _parse_line(text: str, parsers: list[_LineParser], clock: _YearClock) -> _Line:
    for parser in parsers:
        line = parser(text, clock)
        if line is not None:
            return line
    return _Line(PLAIN, text)


def _to_record(line: _Line, number: int) -> KernelRecord:
    position = f"seq {line.seq}" if line.seq is not None else f"line {number}"
    return KernelRecord(
        line.message,
        time=line.time,
        uptime=line.uptime,
        position=position,
        year_inferred=line.year_inferred,
    )


def _parse_kmsg(text: str, _clock: _YearClock) -> _Line | None:
    match = _KMSG_RE.fullmatch(text)
    if match is None:
        return None
    return _Line(
        KMSG,
        match["message"],
        uptime=int(match["usec"]) / 1e6,
        seq=int(match["seq"]),
        from_kernel=int(match["prio"]) >> 3 == 0,
    )


def _parse_dmesg(text: str, _clock: _YearClock) -> _Line | None:
    level = _DMESG_LEVEL_RE.fullmatch(text)
    rest = level["rest"] if level else text
    line = _parse_dmesg_uptime(rest) or _parse_dmesg_ctime(rest)
    if level is None:
        return line
    from_kernel = level["facility"] == "kern"
    if line is None:  # dmesg -x -t: no stamp at all
        return _Line(DMESG, rest, from_kernel=from_kernel)
    return _Line(line.format, line.message, line.time, line.uptime, from_kernel=from_kernel)


def _parse_dmesg_uptime(text: str) -> _Line | None:
    match = _UPTIME_PREFIX_RE.fullmatch(text)
    if match is None:
        return None
    message = match["message"]
    journal = _MONOTONIC_SOURCE_RE.fullmatch(message)
    if journal is not None:
        message = journal["message"]
    return _Line(DMESG, message, uptime=float(match["uptime"]))


def _parse_dmesg_ctime(text: str) -> _Line | None:
    match = _DMESG_CTIME_RE.fullmatch(text)
    if match is None:
        return None
    # dmesg -T prints the local time of the machine it ran on; taken as UTC.
    time = _build_time(int(match["year"]), _MONTHS[match["month"]], match["day"], match["clock"])
    return _Line(DMESG_T, match["message"], time=time)


def _parse_journal_short(text: str, clock: _YearClock) -> _Line | None:
    match = _JOURNAL_SHORT_RE.fullmatch(text)
    if match is None:
        return None
    month = _MONTHS[match["month"]]
    year = clock.year_for(month)
    # No zone is printed (journalctl --utc neither): the time is taken as UTC.
    time = None if year is None else _build_time(year, month, match["day"], match["clock"])
    return _journal_line(
        JOURNAL_SHORT, match, time, year_inferred=clock.inferred and time is not None
    )


def _parse_journal_iso(text: str, _clock: _YearClock) -> _Line | None:
    match = _JOURNAL_ISO_RE.fullmatch(text)
    if match is None:
        return None
    return _journal_line(JOURNAL_ISO, match, _parse_iso(match["stamp"]))


def _parse_journal_full(text: str, _clock: _YearClock) -> _Line | None:
    match = _JOURNAL_FULL_RE.fullmatch(text)
    if match is None:
        return None
    time = _full_time(match["date"], match["clock"], match["zone"])
    return _journal_line(JOURNAL_ISO, match, time)


def _parse_journal_unix(text: str, _clock: _YearClock) -> _Line | None:
    match = _JOURNAL_UNIX_RE.fullmatch(text)
    if match is None:
        return None
    time = _from_epoch(int(match["epoch"]), int(match["micros"]))
    return _journal_line(JOURNAL_ISO, match, time)


def _journal_line(
    line_format: str, match: re.Match[str], time: datetime | None, *, year_inferred: bool = False
) -> _Line:
    message = match["message"]
    uptime = None
    embedded = _UPTIME_PREFIX_RE.fullmatch(message)
    if embedded is not None:
        message, uptime = embedded["message"], float(embedded["uptime"])
    return _Line(
        line_format,
        message,
        time,
        uptime,
        from_kernel=match["ident"] == "kernel",
        year_inferred=year_inferred,
    )


def _build_time(year: int, month: int, day: str, clock: str) -> datetime | None:
    hours, minutes, seconds = clock.split(":")
    whole_seconds, _, fraction = seconds.partition(".")
    try:
        return datetime(
            year,
            month,
            int(day),
            int(hours),
            int(minutes),
            int(whole_seconds),
            int(fraction.ljust(6, "0")),
            tzinfo=UTC,
        )
    except ValueError:  # Feb 30, 25:00:00, …
        return None


def _from_epoch(seconds: int, microseconds: int) -> datetime | None:
    try:
        return datetime.fromtimestamp(seconds, UTC).replace(microsecond=microseconds)
    except (OverflowError, OSError, ValueError):
        return None


def _parse_iso(stamp: str) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp)
    except ValueError:
        return None


def _full_time(date: str, clock: str, zone: str) -> datetime | None:
    """Time of a ``short-full`` line; ``None`` for zone names that do not say one offset."""
    if zone in _UTC_ZONE_NAMES:
        return _parse_iso(f"{date}T{clock}+00:00")
    if re.fullmatch(r"[+-]\d\d:?\d\d", zone):
        return _parse_iso(f"{date}T{clock}{zone}")
    return None


def _parsers_trying_first(line_format: str) -> list[_LineParser]:
    wanted = DMESG if line_format == DMESG_T else line_format
    first = [parser for parser in _PARSERS if _PARSER_FORMATS[parser] == wanted]
    return first + [parser for parser in _PARSERS if parser not in first]


_PARSER_FORMATS: dict[_LineParser, str] = {
    _parse_kmsg: KMSG,
    _parse_dmesg: DMESG,  # also DMESG_T: one parser reads both bracket stamps
    _parse_journal_short: JOURNAL_SHORT,
    _parse_journal_iso: JOURNAL_ISO,
    _parse_journal_full: JOURNAL_ISO,
    _parse_journal_unix: JOURNAL_ISO,
}
_PARSERS = list(_PARSER_FORMATS)
_DATED_PARSERS: list[_LineParser] = [
    _parse_dmesg,
    _parse_journal_iso,
    _parse_journal_full,
    _parse_journal_unix,
]


@dataclass
class _Years:
    """What a first pass over a file tells about the years of its year-less stamps."""

    crossed: int = 0  # year boundaries between the first and the last year-less stamp
    last: tuple[int, int] | None = None  # month and day of the last year-less stamp
    dated_first_year: int | None = None  # the first one's year, by a dated line
    has_yearless: bool = False


def _scan_years(lines: Iterable[str]) -> _Years:
    """Count the year boundaries the year-less stamps cross; the first dated line (one
    whose stamp has a year) dates them, by the years counted up to it."""
    clock = _YearClock(0)
    years = _Years()
    for raw in lines:
        text = _clean(raw)
        match = _JOURNAL_SHORT_RE.fullmatch(text)
        if match is not None:
            month = _MONTHS[match["month"]]
            clock.year_for(month)
            years.has_yearless = True
            years.last = (month, int(match["day"]))
        elif years.dated_first_year is None and text[:1] not in ("", " "):
            dated = _parse_line(text, _DATED_PARSERS, clock).time
            if dated is not None:
                years.dated_first_year = dated.year - (clock.year_for(dated.month) or 0)
    years.crossed = clock.year or 0
    return years


def _first_year(years: _Years, given: int | None, modified: datetime) -> tuple[int, str]:
    """The year of the first year-less stamp, and where it came from."""
    if given is not None:
        return given, "--year"
    if years.dated_first_year is not None:
        return years.dated_first_year, "inferred from the file's dated lines"
    last_year = modified.year
    if years.last is not None and years.last > (modified.month, modified.day):
        last_year -= 1  # that day of this year is still to come: the log is older
    return last_year - years.crossed, "inferred: the latest year not after the file's mtime"


def _decoded_lines(file: BinaryIO) -> Iterator[str]:
    """Lines of ``file`` decoded as UTF-8 (bad bytes replaced), each cut to the length limit.

    Reads at most the limit at a time, so a file without newlines never fills the memory.
    """
    in_long_line = False
    while chunk := file.readline(MAX_LINE_LENGTH):
        if not in_long_line:
            yield chunk.decode("utf-8", errors="replace")
        in_long_line = not chunk.endswith(b"\n")


__all__ = [
    "DMESG",
    "DMESG_T",
    "JOURNAL_ISO",
    "JOURNAL_SHORT",
    "KMSG",
    "PLAIN",
    "LogReading",
    "detect_format",
    "parse_kernel_log_text",
    "read_kernel_log_file",
]
