"""The value types the agent's state and its break-glass overrides share.

The snapshot (``agents._state``) holds them and the override file
(``agents._override``) produces them; both modules import them from here, so
neither imports the other. Pure: the standard library only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

FlagValue: TypeAlias = bool | float | str | dict[str, Any]
"""A flag's value: a kill switch, a number, a degradation mode or a JSON object."""


# ---------------------------------------------------------------- criticality


class Criticality(enum.IntEnum):
    """How important a request is, most important first (Google SRE book).

    Values match the protobuf ``Tier``, so a shedding tier and a request's
    criticality compare as integers: a larger value is less critical.
    """

    CRITICAL_PLUS = 1
    CRITICAL = 2
    SHEDDABLE_PLUS = 3
    SHEDDABLE = 4

    @classmethod
    def parse(cls, value: object) -> Criticality:
        """The criticality a header, metadata value or argument names.

        Tolerant, as request input must be: a member, its value, or its name in any
        case with ``-`` or ``_`` (``"sheddable-plus"``); anything else (another
        string, a bool, None, a list, NaN, any object) is :attr:`CRITICAL`, the
        default of a request. Never raises.
        """
        try:
            found = _CRITICALITY.get(value)
            if found is not None and not isinstance(value, bool):
                return found
            if isinstance(value, str):
                name = str.upper(str.strip(value)).replace("-", "_")
                return _CRITICALITY.get(name, cls.CRITICAL)
        except Exception:  # an unhashable value, or one whose hash or == raises
            return cls.CRITICAL
        return cls.CRITICAL


# Members (hashing as their int values) and names, for one dict lookup on the read path.
_CRITICALITY: dict[object, Criticality] = {}
for _member in Criticality:
    _CRITICALITY[_member] = _member
    _CRITICALITY[_member.name] = _member
    _CRITICALITY[_member.name.lower()] = _member
del _member


# ---------------------------------------------------------------- effective values


@dataclass(frozen=True, slots=True)
class SheddingLevel:
    """The shedding level in force: every request less critical than ``tier`` is shed,
    and ``percent`` of the tier itself."""

    tier: Criticality
    percent: float


@dataclass(frozen=True, slots=True)
class PinnedVersion:
    """The version the service is pinned to, why, since when and until when (None:
    until unpinned)."""

    version: str
    reason: str
    since: datetime | None
    expires_at: datetime | None = None


# ---------------------------------------------------------------- overrides


@dataclass(frozen=True, slots=True)
class Override:
    """A valid override, as read from the file.

    Attributes:
        reason: Why, as the file says.
        actor: Who, as the file says ("" when it does not).
        expires_at: When it stops applying (aware, UTC or the file's zone).
        flags: Flag name to value (numbers as floats, as from the server).
        shedding: The shedding level it sets, or None.
        pin: The version it pins, or None.
        content_json: The canonical JSON of what it sets (``flags``,
            ``shedding``, ``pin``): sorted keys, no spaces, integral numbers
            without a fraction. What the server audits.
        digest: The SHA-256 of ``content_json`` (hex): the server audits each
            override once by it.
    """

    reason: str
    actor: str
    expires_at: datetime
    flags: Mapping[str, FlagValue]
    shedding: SheddingLevel | None
    pin: str | None
    content_json: str
    digest: str
