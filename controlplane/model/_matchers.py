"""A trigger's label matchers: Alertmanager's four operators, RE2 as Alertmanager's.

``alertname=HighErrorRate``, ``env!=staging``, ``severity=~critical|page`` and
``team!~db-.*`` hold for an alert's labels as they do in an Alertmanager route or
silence: a label the alert does not have is the empty string, and a regular
expression matches the whole value (anchored at both ends). Expressions are RE2's,
the syntax Alertmanager's Go code uses, and run in time linear in the value: a
matcher typed in a hurry cannot hang the server that evaluates it (Python's ``re``
backtracks, ``(a+)+$`` on a long value takes minutes).

The stored form is ``[label, value]`` for equality (the only operator of the
first triggers, still read) and ``[label, value, op]`` for the others.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.api.v1 import mitigation_pb2 as mpb
from controlplane.errors import InvalidArgumentError

__all__ = [
    "MAX_MATCHERS",
    "MAX_MATCHER_VALUE",
    "MatchOp",
    "Matcher",
    "MatcherSyntaxError",
    "matchers_from_proto",
    "matchers_from_record",
    "parse_matcher",
]

MAX_MATCHERS = 16
MAX_MATCHER_VALUE = 256
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ANY_BYTE = re.compile(r"(?<!\\)(?:\\\\)*\\C")
"""``\\C`` not itself escaped: RE2's "any byte", which Go's RE2 refuses."""
_TEXT = re.compile(r"\s*([^=!~\s]+)\s*(=~|!~|!=|=)\s*(.*?)\s*", re.DOTALL)


class MatchOp(enum.StrEnum):
    """The four operators, as they are written."""

    EQUAL = "="
    NOT_EQUAL = "!="
    REGEX = "=~"
    NOT_REGEX = "!~"

    @property
    def is_regex(self) -> bool:
        return self in (MatchOp.REGEX, MatchOp.NOT_REGEX)

    @property
    def negated(self) -> bool:
        return self in (MatchOp.NOT_EQUAL, MatchOp.NOT_REGEX)


_TO_PROTO = {
    MatchOp.EQUAL: mpb.MATCH_EQUAL,
    MatchOp.NOT_EQUAL: mpb.MATCH_NOT_EQUAL,
    MatchOp.REGEX: mpb.MATCH_REGEX,
    MatchOp.NOT_REGEX: mpb.MATCH_NOT_REGEX,
}
_FROM_PROTO = {number: op for op, number in _TO_PROTO.items()}


class MatcherSyntaxError(ValueError):
    """Text that is not ``LABEL=VALUE`` (or ``!=``, ``=~``, ``!~``)."""


class _Pattern:
    """A compiled RE2 expression, anchored; typed here as the library is not."""

    __slots__ = ("_compiled",)

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled

    def whole(self, value: str) -> bool:
        return self._compiled.fullmatch(value) is not None


@functools.lru_cache(maxsize=512)
def _compile(expression: str) -> _Pattern:
    """Compile an RE2 expression; ValueError with RE2's reason when it is not one."""
    import re2  # the server's only user of it; not loaded by the CLI's imports

    options = re2.Options()
    options.log_errors = False  # the reason goes to the caller, not to stderr
    try:
        return _Pattern(re2.compile(expression, options))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else ""
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(str(reason) or "not an RE2 expression") from None


@dataclass(frozen=True, slots=True)
class Matcher:
    """One condition on one alert label: :meth:`checked` builds it from a request,
    :func:`matchers_from_record` from what was checked then."""

    label: str
    op: MatchOp
    value: str

    @classmethod
    def checked(cls, label: str, op: MatchOp, value: str, where: str) -> Matcher:
        """A matcher, or INVALID_ARGUMENT naming ``where`` and the fix."""
        if not _LABEL.fullmatch(label):
            raise InvalidArgumentError(
                f"{where}.label",
                f"{label[:80]!r} is not an alert label name ([a-zA-Z_][a-zA-Z0-9_]*)",
            )
        if len(value) > MAX_MATCHER_VALUE:
            raise InvalidArgumentError(
                f"{where}.value",
                f"{len(value)} characters, over {MAX_MATCHER_VALUE}: match a telling part of "
                "it with =~ (e.g. .*timeout.*)",
            )
        if op is MatchOp.EQUAL and not value:
            raise InvalidArgumentError(
                f"{where}.value",
                f'is empty: give the value {label} must have (or {label}!="" for any value)',
            )
        if op.is_regex:
            if _ANY_BYTE.search(value):
                raise InvalidArgumentError(
                    f"{where}.value",
                    f"{value[:80]!r} uses \\C (any byte), which Alertmanager's RE2 does not "
                    "take and which can split a character: use . instead",
                )
            try:
                _compile(value)
            except ValueError as exc:
                raise InvalidArgumentError(
                    f"{where}.value",
                    f"{value[:80]!r} is not a regular expression (RE2 syntax, as "
                    f"Alertmanager's): {exc}",
                ) from None
        return cls(label, op, value)

    def holds(self, labels: Mapping[str, str]) -> bool:
        """Whether the condition holds for an alert's labels (a missing one is "")."""
        given = labels.get(self.label, "")
        if self.op.is_regex:
            try:
                found = _compile(self.value).whole(given)
            except ValueError:
                return False  # stored, then no longer RE2 (another version): nothing
        else:
            found = given == self.value
        return found != self.op.negated

    @property
    def text(self) -> str:
        """As typed, and as :func:`parse_matcher` reads it back: ``severity=~critical|page``;
        quoted as amtool quotes (``\\``, ``\"``, ``\n`` escaped) when the value is
        empty, has spaces, quotes, commas or characters that do not print, or starts
        with what would read as part of the operator (``~``, ``=``)."""
        value = self.value
        if (
            not value
            or value != value.strip()
            or any(c in value for c in '", ')
            or value[0] in "~="
            or not value.isprintable()
        ):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            value = f'"{escaped}"'
        return f"{self.label}{self.op.value}{value}"

    def to_proto(self) -> mpb.LabelMatcher:
        return mpb.LabelMatcher(label=self.label, value=self.value, type=_TO_PROTO[self.op])

    def to_record(self) -> list[str]:
        if self.op is MatchOp.EQUAL:
            return [self.label, self.value]
        return [self.label, self.value, self.op.value]


def _checked_set(matchers: list[Matcher], field: str) -> list[Matcher]:
    if not matchers:
        raise InvalidArgumentError(
            field, "is empty: match at least one alert label (e.g. alertname=HighErrorRate)"
        )
    if len(matchers) > MAX_MATCHERS:
        raise InvalidArgumentError(
            field,
            f"{len(matchers)} matchers, over {MAX_MATCHERS}: join values of one label in one "
            "=~ (a|b|c), or route the alerts to fewer labels",
        )
    seen: set[tuple[str, MatchOp, str]] = set()
    for i, matcher in enumerate(matchers):
        key = (matcher.label, matcher.op, matcher.value)
        if key in seen:
            raise InvalidArgumentError(f"{field}[{i}]", f"{matcher.text} is given twice")
        seen.add(key)
    if all(matcher.holds({}) for matcher in matchers):
        raise InvalidArgumentError(
            field,
            f"{', '.join(m.text for m in matchers)} also hold for an alert without these "
            "labels, so any alert would fire the trigger: add a matcher that names what "
            "must be there (e.g. alertname=HighErrorRate)",
        )
    return matchers


def matchers_from_proto(
    matchers: Sequence[mpb.LabelMatcher], field: str = "trigger.matchers"
) -> list[Matcher]:
    """A request's matchers, checked: INVALID_ARGUMENT naming the one at fault."""
    checked = []
    for i, given in enumerate(matchers):
        op = _FROM_PROTO.get(given.type)
        if op is None:
            raise InvalidArgumentError(
                f"{field}[{i}].type",
                f"{given.type} is not a match type (MATCH_EQUAL, MATCH_NOT_EQUAL, "
                "MATCH_REGEX or MATCH_NOT_REGEX)",
            )
        checked.append(Matcher.checked(given.label, op, given.value, f"{field}[{i}]"))
    return _checked_set(checked, field)


def matchers_from_record(stored: Any) -> list[Matcher]:
    """A stored trigger's matchers (``[label, value]`` or ``[label, value, op]``).

    A stored expression is not compiled again here: it was checked when written,
    and one that no longer compiles holds for nothing (see :meth:`Matcher.holds`).
    """
    found = []
    for item in stored or []:
        label, value, *rest = (str(part) for part in item)
        found.append(Matcher(label, MatchOp(rest[0]) if rest else MatchOp.EQUAL, value))
    return found


def parse_matcher(text: str) -> Matcher:
    """``LABEL=VALUE``, ``LABEL!=VALUE``, ``LABEL=~REGEX`` or ``LABEL!~REGEX`` as typed
    (a value may be double-quoted, as in Alertmanager's ``amtool``), unchecked.

    Raises:
        MatcherSyntaxError: not of that form.
    """
    found = _TEXT.fullmatch(text)
    if found is None:
        raise MatcherSyntaxError(
            f"{text!r} is not LABEL=VALUE, LABEL!=VALUE, LABEL=~REGEX or LABEL!~REGEX "
            '(e.g. alertname=HighErrorRate, severity=~"critical|page")'
        )
    label, op, value = found.groups()
    if value.startswith('"'):
        value = _unquoted(text, value[1:])
    try:
        (label + value).encode()
    except UnicodeEncodeError:
        raise MatcherSyntaxError(
            f"{text!r} is not valid text (an undecodable byte?): type it again"
        ) from None
    return Matcher(label, MatchOp(op), value)


def _unquoted(text: str, raw: str) -> str:
    """A quoted value's text (the opening quote gone) as amtool reads it: ``\\"``,
    ``\\\\`` and ``\\n`` are escapes; any other backslash is itself (``"db-\\d+"``)."""
    out: list[str] = []
    closed = escaped = False
    for i, char in enumerate(raw):
        if escaped:
            escaped = False
            out.append({"n": "\n", '"': '"', "\\": "\\"}.get(char, "\\" + char))
        elif char == "\\" and i < len(raw) - 1:
            escaped = True
        elif char == '"':
            if i < len(raw) - 1:
                raise MatcherSyntaxError(
                    f'{text!r}: a double quote inside the quoted value: write it \\"'
                )
            closed = True
        else:
            out.append(char)
    if not closed:
        raise MatcherSyntaxError(f"{text!r}: the quoted value has no closing double quote")
    return "".join(out)
