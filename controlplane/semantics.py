"""What a write does to a key's record: pure decisions, no I/O.

Each ``decide_*`` function takes the record stored under a key (or None) and the
time, and returns a :class:`Decision`: the record to store (None: delete the
key), the audit action, a one-line summary, and whether anything changes. The
store reads, calls one of these, and writes the result in one transaction.

Time-boxed changes (docs/architecture.md, "State in etcd"): a record with ``expires_at``
keeps the record it replaced in ``replaced``, which may be time-boxed too (a
chain). When it expires, the replaced record applies again; if it replaced
nothing, the key is gone. A write without expiry is the new base (the chain is
dropped); one with expiry layers on top. Writing the value in force with a new
expiry moves the top layer's expiry; with no expiry, it makes it permanent.
Expired layers anywhere in a chain never apply again and are pruned whenever
the chain is rewritten.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from controlplane import model
from controlplane.errors import InvalidArgumentError
from controlplane.model import Flag, FlagValue, KnownGood, Meta, Pin, Shedding, Tier, WriteOptions

MAX_LAYERS = 8

Layered = TypeVar("Layered", Flag, Shedding, Pin)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a write for one key."""

    new: Any  # the record to store; None deletes the key
    action: str
    summary: str
    changed: bool = True
    restored: Any = None  # on clear/expiry: the layer that applies again


def prune_expired(record: Layered | None, now: datetime) -> Layered | None:
    """The chain without the layers that have expired by ``now``."""
    if record is None:
        return None
    if record.meta.expires_at is not None and record.meta.expires_at <= now:
        return prune_expired(record.replaced, now)
    below = prune_expired(record.replaced, now)
    return record if below is record.replaced else replace(record, replaced=below)


def chain_depth(record: Any) -> int:
    """How many layers a record has (1 for a plain record, 0 for None)."""
    depth = 0
    while record is not None:
        depth += 1
        record = record.replaced
    return depth


def _until(meta: Meta) -> str:
    return f" until {model.format_time(meta.expires_at)}" if meta.expires_at else ""


def _layered_set(
    current: Layered | None,
    now: datetime,
    opts: WriteOptions,
    *,
    build: Callable[[Meta], Layered],
    same: Callable[[Layered], bool],
    action: str,
    what: str,
    was: str,
) -> Decision:
    """Set a layered record (flag, shedding, pin) by the rules in the module docstring."""
    cur = prune_expired(current, now)
    meta = Meta.from_options(opts, now)
    summary = f"{what}{_until(meta)}{was}"
    if opts.expires_at is None:
        if cur is not None and same(cur) and cur.meta.expires_at is None:
            return Decision(current, action, summary, changed=False)
        return Decision(replace(build(meta), replaced=None), action, summary)
    if cur is not None and same(cur) and cur.meta.expires_at is not None:
        if cur.meta.expires_at == opts.expires_at:
            return Decision(current, action, summary, changed=False)
        # Extending (or shortening) the change in force: same layer, new expiry.
        extended = replace(build(meta), replaced=cur.replaced)
        return Decision(extended, action.replace(".set", ".extend"), summary)
    new = replace(build(meta), replaced=cur)
    if chain_depth(new) > MAX_LAYERS:
        raise InvalidArgumentError(
            "options",
            f"{what} would stack {chain_depth(new)} time-boxed layers (at most {MAX_LAYERS}): "
            "clear some, or write without an expiry to start afresh",
        )
    return Decision(new, action, summary)


def _layered_clear(
    current: Layered | None,
    now: datetime,
    *,
    all_layers: bool,
    action: str,
    label: str,
    layer: str,
    describe: Callable[[Layered], str],
) -> Decision:
    """Clear a layered record: its top layer, or with ``all_layers`` the whole chain.

    ``layer`` names one layer as people say it ("value", "level", "pin"). When a layer
    beneath comes back, the summary says the removed one was time-boxed and that the one
    beneath applies now (with its own expiry), since the key is still set.
    """
    if current is None:
        return Decision(None, action, f"{label} not set", changed=False)
    cur = prune_expired(current, now)
    if cur is None:
        # Everything in it has expired: nothing is set; the expiry restores it and
        # writes its own audit record.
        return Decision(current, action, f"{label} not set (expired)", changed=False)
    if all_layers and cur.replaced is not None:
        beneath: list[str] = []
        below: Layered | None = cur.replaced
        while below is not None:
            beneath.append(describe(below))
            below = below.replaced
        summary = (
            f"{label} cleared (was {describe(cur)}) with every layer beneath it "
            f"({', '.join(beneath)})"
        )
        return Decision(None, action, summary)
    restored = None if all_layers else cur.replaced
    if restored is None:
        return Decision(None, action, f"{label} cleared (was {describe(cur)})")
    boxed = "time-boxed " if cur.meta.expires_at is not None else ""
    summary = (
        f"{label}: {boxed}{layer} {describe(cur)} removed (the {layer} beneath it, "
        f"{describe(restored)}, applies now{_until(restored.meta)})"
    )
    return Decision(restored, action, summary, restored=restored)


def decide_expiry(current: Layered | None, now: datetime, label: str) -> Decision:
    """What the server writes when a key's top layer has expired."""
    if current is None or current.meta.expires_at is None or current.meta.expires_at > now:
        return Decision(current, "", f"{label}: nothing expired", changed=False)
    restored = prune_expired(current, now)
    kind = _kind(current)
    after = (
        f"; {describe_record(restored)} applies again{_until(restored.meta)}"
        if restored is not None
        else "; now unset"
    )
    return Decision(
        restored,
        f"{kind}.expire",
        f"{label} {describe_record(current)} expired{after}",
        restored=restored,
    )


def _kind(record: Any) -> str:
    if isinstance(record, Flag):
        return "flag"
    if isinstance(record, Shedding):
        return "shedding"
    if isinstance(record, Pin):
        return "pin"
    return "known_good"


def describe_record(record: Any) -> str:
    """A record's value as a person reads it."""
    if isinstance(record, Flag):
        return model.describe_value(record.value)
    if isinstance(record, Shedding):
        return record.describe()
    if isinstance(record, Pin | KnownGood):
        return record.version
    return "(none)"


# ---------------------------------------------------------------- flags


def flag_type(value: FlagValue) -> str:
    """The type of a flag's value, as people name it: boolean, number, string, object."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


_CHANGE_TYPE = "change_type; cpctl flag set --change-type; change_type: true in a bundle file"


def _shown(value: FlagValue, limit: int = 40) -> str:
    """A value as a message quotes it, cut to ``limit``: a string in quotes, others as
    they are written."""
    text = value if isinstance(value, str) else model.describe_value(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text) if isinstance(value, str) else text


def _type_refusal(
    name: str, held: str, value: FlagValue, where: str = "", fix: str = ""
) -> InvalidArgumentError:
    given = flag_type(value)
    shown = _shown(value, 80)
    expected = {
        "boolean": "true or false",
        "number": "a number",
        "string": "a string",
        "object": "a JSON object",
    }[held]
    fix = fix or f"change the flag's type on purpose ({_CHANGE_TYPE})"
    return InvalidArgumentError(
        "value",
        f"{name} is {_a(held)} flag{where}; {shown} is not {expected} but {_a(given)}: "
        f"set {expected}, or {fix}",
    )


@dataclass(frozen=True, slots=True)
class Sibling:
    """What a bundle does to a flag in another scope than the change checked: sets
    ``value`` (with ``change_type`` or not), or clears it (``value`` None)."""

    value: FlagValue | None
    change_type: bool = False
    all_layers: bool = False

    def after(self, current: Flag | None, now: datetime, name: str) -> FlagValue | None:
        """The flag's value in force in that scope once the bundle is applied."""
        if self.value is not None:
            return self.value
        left = decide_clear_flag(current, now, name, all_layers=self.all_layers).new
        kept = prune_expired(left, now)
        return kept.value if kept is not None else None


def check_type_across_scopes(
    name: str,
    scope: str,
    value: FlagValue,
    others: Mapping[str, FlagValue],
    *,
    change_type: bool = False,
    in_bundle: Collection[str] = (),
    meant: Collection[str] = (),
) -> str:
    """Check a first value for ``name`` in ``scope`` against the flag's type in the other
    scopes (``others``: scope -> value in force there, or set by the same bundle: those
    scopes are ``in_bundle``, and the message says so; a difference with those of them
    set with ``change_type``, ``meant``, is meant too).

    A service's own entry wins over the global one: a string under ``checkout`` would
    turn a global kill switch into a value that ``enabled()`` takes for "unset" there. A
    value of another type is refused unless ``change_type``; then the returned note (for
    the summary, hence the audit) says which scopes hold which type. Empty: same type.
    """
    given = flag_type(value)
    held: dict[str, list[str]] = {}
    for other_scope, other in sorted(others.items()):
        if flag_type(other) != given:
            held.setdefault(flag_type(other), []).append(other_scope)
    if not held:
        return ""
    kind, scopes = max(held.items(), key=lambda item: (model.GLOBAL_SCOPE in item[1], len(item[1])))
    shown = ", ".join(scopes[:5]) + (f" and {len(scopes) - 5} more" if len(scopes) > 5 else "")
    where = f"{'scope' if len(scopes) == 1 else 'scopes'} {shown}"
    if any(other in in_bundle for other in scopes):
        where += " in this bundle" if all(o in in_bundle for o in scopes) else ", with this bundle"
    holds = f"{where} {'holds' if len(scopes) == 1 else 'hold'} {_a(kind)}"
    differing = sorted(o for group in held.values() for o in group)
    if change_type or all(o in meant for o in differing):
        return f" ({_a(given)} in {scope}, where {holds})"
    if all(o in in_bundle for o in differing):
        # Nothing in etcd says which is right: both sides, as the bundle gives them.
        sides = [(scope, value)] + [(o, others[o]) for o in differing[:4]]
        listed = " and ".join(
            f"{_shown(v)} ({_a(flag_type(v))}) in {where_}" for where_, v in sides
        )
        raise InvalidArgumentError(
            "value",
            f"this bundle gives {name} {('two', 'three', 'four')[len(held) - 1]} types: "
            f"{listed}: give it one type, "
            f"or say the difference is meant ({_CHANGE_TYPE})",
        )
    raise _type_refusal(
        name,
        kind,
        value,
        f" ({where})",
        f"if {scope} is meant to hold {_a(given)} where {holds}, say so ({_CHANGE_TYPE})",
    )


def decide_set_flag(
    current: Flag | None,
    now: datetime,
    scope: str,
    name: str,
    value: FlagValue,
    opts: WriteOptions,
    *,
    change_type: bool = False,
) -> Decision:
    """Set a flag. Its type is the one of the value it holds: a value of another type is
    refused (a typo must not turn a kill switch into a string that readers take for
    "unset") unless ``change_type`` says it is meant; the summary then says so."""
    cur = prune_expired(current, now)
    was = f" (was {model.describe_value(cur.value)})" if cur else " (was unset)"
    held = flag_type(cur.value) if cur is not None else None
    if held is not None and held != flag_type(value):
        if not change_type:
            raise _type_refusal(name, held, value)
        was += f" (type changed from {held} to {flag_type(value)})"
    key = model.value_key(value)
    return _layered_set(
        current,
        now,
        opts,
        build=lambda meta: Flag(scope, name, value, meta),
        same=lambda rec: model.value_key(rec.value) == key,
        action="flag.set",
        what=f"flag {name} = {model.describe_value(value)}",
        was=was,
    )


def decide_clear_flag(
    current: Flag | None, now: datetime, name: str, *, all_layers: bool
) -> Decision:
    return _layered_clear(
        current,
        now,
        all_layers=all_layers,
        action="flag.clear",
        label=f"flag {name}",
        layer="value",
        describe=lambda rec: model.describe_value(rec.value),
    )


# ---------------------------------------------------------------- shedding


def decide_set_shedding(
    current: Shedding | None,
    now: datetime,
    service: str,
    tier: Tier,
    percent: float,
    opts: WriteOptions,
) -> Decision:
    cur = prune_expired(current, now)
    was = f" (was {cur.describe()})" if cur else " (was off)"
    return _layered_set(
        current,
        now,
        opts,
        build=lambda meta: Shedding(service, tier, percent, meta),
        same=lambda rec: (rec.tier, rec.percent) == (tier, percent),
        action="shedding.set",
        what=f"shedding {model.describe_shedding(tier, percent)}",
        was=was,
    )


def decide_clear_shedding(current: Shedding | None, now: datetime, *, all_layers: bool) -> Decision:
    return _layered_clear(
        current,
        now,
        all_layers=all_layers,
        action="shedding.clear",
        label="shedding",
        layer="level",
        describe=lambda rec: rec.describe(),
    )


# ---------------------------------------------------------------- pins


def decide_pin(
    current: Pin | None, now: datetime, service: str, version: str, opts: WriteOptions,
    *, action: str = "pin.set",
) -> Decision:  # fmt: skip
    cur = prune_expired(current, now)
    was = f" (was {cur.version})" if cur else " (was unpinned)"
    previous = cur.history() if cur is not None and cur.version != version else None
    if cur is not None and cur.version == version:
        previous = cur.previous
    decision = _layered_set(
        current,
        now,
        opts,
        build=lambda meta: Pin(service, version, meta, previous=previous),
        same=lambda rec: rec.version == version,
        action="pin.set",
        what=f"pinned to {version}",
        was=was,
    )
    if action != "pin.set" and decision.changed:
        decision = replace(decision, action=action)
    return decision


def decide_unpin(current: Pin | None, now: datetime, *, all_layers: bool) -> Decision:
    return _layered_clear(
        current,
        now,
        all_layers=all_layers,
        action="pin.clear",
        label="pin",
        layer="pin",
        describe=lambda rec: rec.version,
    )


# ---------------------------------------------------------------- known-good


def decide_mark(
    current: KnownGood | None, now: datetime, service: str, version: str, opts: WriteOptions
) -> Decision:
    if current is not None:
        return Decision(current, "known_good.mark", f"{version} already known-good", changed=False)
    new = KnownGood(service, version, Meta.from_options(opts, now))
    return Decision(new, "known_good.mark", f"{version} marked known-good")


def decide_unmark(current: KnownGood | None, now: datetime, version: str) -> Decision:
    if current is None:
        return Decision(
            None, "known_good.unmark", f"{version} is not marked known-good", changed=False
        )
    return Decision(None, "known_good.unmark", f"{version} no longer known-good")
