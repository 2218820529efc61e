"""Durations and times as people type them (``500ms``, ``1h30m``, ``2026-11-26T18:00Z``).

One parser for the server's options, the stored records (``controlplane.model``) and
``cpctl``. Standard library only: ``cpctl --help`` imports this module and must stay fast,
and the records' parser must not pull in click. The click parameter type built on it is
``controlplane._duration_param``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["DURATION_FORMS", "TIME_FORMS", "in_the_past", "parse_duration", "parse_time"]

_DURATION_RE = re.compile(
    r"(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m(?!s))?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?"
)

DURATION_FORMS = (
    "a whole number with a unit ms, s, m, h or d, or several from the largest unit down "
    "(500ms, 30s, 15m, 2h, 1h30m, 7d)"
)

TIME_FORMS = (
    "ISO 8601 such as 2026-11-26T18:00Z, 2026-11-26T18:00:00+01:00 or 2026-11-26; "
    "a time without an offset is UTC"
)


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``15m``, ``1h30m``, ``500ms``, ``7d`` (units in that order, once each).

    No sign, no fraction, no spaces: ``0s`` is the shortest duration.

    Raises:
        ValueError: anything else; the message says "... is not a duration" and shows the
            accepted forms.
    """
    match = _DURATION_RE.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"{text!r} is not a duration: use {DURATION_FORMS}")
    parts = {unit: int(value) for unit, value in match.groupdict().items() if value is not None}
    try:
        return timedelta(
            days=parts.get("d", 0),
            hours=parts.get("h", 0),
            minutes=parts.get("m", 0),
            seconds=parts.get("s", 0),
            milliseconds=parts.get("ms", 0),
        )
    except OverflowError as e:
        raise ValueError(f"duration {text!r} is too large") from e


def parse_time(text: str, *, zone_required: bool = False) -> datetime:
    """Parse an ISO 8601 time (``Z`` allowed). Returns UTC.

    What a time without an offset means depends on who wrote it:

    - ``zone_required=False`` (people: ``cpctl --until``, ``--since``, a bundle file's
      ``until``): UTC, as ``TIME_FORMS`` says; a bare date is its midnight UTC.
    - ``zone_required=True`` (a time stored in etcd, always written with its offset by
      ``controlplane.model.format_time``): an error, since a stored time without one was
      not written by this project and is not guessed at.

    Raises:
        ValueError: not an ISO 8601 time (for people, the message shows the accepted
            forms), or, with ``zone_required``, a time without an offset.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        if zone_required:
            raise
        raise ValueError(f"{text!r} is not a time: use {TIME_FORMS}") from None
    if moment.tzinfo is None:
        if zone_required:
            raise ValueError(f"time {text!r} has no time zone")
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def in_the_past(moment: datetime, now: datetime) -> str:
    """What to say of a time that has gone by, showing the time now to compare with:
    ``2026-11-26T17:00:00Z is in the past: it is now 2026-11-26T17:30:05Z (UTC)``.

    Both to the second, in UTC: a time typed as local time but read as UTC (no offset) is
    the usual cause, and the two side by side show it.
    """
    return f"{_utc_seconds(moment)} is in the past: it is now {_utc_seconds(now)} (UTC)"


def _utc_seconds(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
