"""The click parameter type of a duration option (``--ttl 30m``, ``--etcd-timeout 500ms``).

One type for ``cpctl`` and the server's command line, on the one parser of
``controlplane._durations`` (which stays free of click: the stored records use it too).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import click

from controlplane._durations import parse_duration

__all__ = ["DurationParam"]

if TYPE_CHECKING:
    _ParamType = click.ParamType[Any]
else:  # click < 8.4 has no generic ParamType
    _ParamType = click.ParamType


class DurationParam(_ParamType):
    """A duration in the forms of ``parse_duration``; converts to a ``timedelta``.

    ``positive`` refuses ``0s`` (a timeout or a time-box must last); ``strip`` ignores
    spaces around the value (settings read from the environment or a file).
    """

    name = "duration"

    def __init__(self, *, positive: bool = False, strip: bool = False) -> None:
        self.positive = positive
        self.strip = strip

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value)
        try:
            duration = parse_duration(text.strip() if self.strip else text)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if self.positive and duration <= timedelta(0):
            self.fail(f"{value!r} must be longer than zero", param, ctx)
        return duration
