"""``cpctl flag``: kill switches and flag values; commands and their output."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._errors import CliError, invalid, report_warning
from controlplane.cli._output import (
    Rendered,
    beneath_lines,
    cleared,
    every_layer,
    expires_cell,
    expiry_note,
    format_value,
    meta_cells,
    overridden_warning,
    record_details,
    table,
    time_boxed,
    write_line,
)
from controlplane.cli._params import FlagValue, parse_flag_value
from controlplane.cli._write import WaitArgs, WriteArgs, wait_command, write_and_wait, write_command

if TYPE_CHECKING:
    from controlplane.api.v1 import types_pb2


@click.group()
def flag() -> None:
    """Kill switches and flag values (bool, number, string, JSON object).

    SCOPE is "global" (the default of every service) or a service name; a service's own
    value wins over the global one.
    """


@flag.command("set")
@click.argument("scope")
@click.argument("name")
@click.argument("value")
@click.option("--string", "force_string", is_flag=True, help="Store VALUE as a string, as is.")
@click.option(
    "--change-type",
    is_flag=True,
    help="VALUE's type may differ from the flag's (boolean, number, string, object): "
    "without it, such a write is refused, so that a typo cannot turn a kill switch into "
    "a string.",
)
@write_command
@wait_command(service_option=True)
@click.pass_obj
def flag_set(
    app: App,
    scope: str,
    name: str,
    value: str,
    force_string: bool,
    change_type: bool,
    write: WriteArgs,
    wait: WaitArgs,
) -> None:
    """Set flag NAME in SCOPE to VALUE.

    VALUE: true/false -> bool; 50 or 0.5 -> number; @PATH -> the JSON object in a file
    (@- reads stdin); {"mode": "lite"} -> a JSON object; anything else -> a string.
    A flag keeps the type it was first set with: a VALUE of another type is refused
    unless --change-type.

    JSON: {result: WriteResult, flag: Flag, previous: Flag|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    try:
        parsed = parse_flag_value(value, force_string=force_string)
    except ValueError as e:
        raise invalid(str(e)) from e
    services = scope_wait_services(scope, wait)
    request = mitigation_pb2.SetFlagRequest(
        scope=scope,
        name=name,
        value=flag_value_proto(parsed),
        options=write.to_proto(app.actor),
        change_type=change_type,
    )
    write_and_wait(app, "SetFlag", request, render_flag_set, wait, lambda _: services)


@flag.command("get")
@click.argument("scope")
@click.argument("name")
@click.option(
    "--effective", is_flag=True, help="For a service: the value it sees (its own, else global)."
)
@click.pass_obj
def flag_get(app: App, scope: str, name: str, effective: bool) -> None:
    """Show flag NAME in SCOPE, who set it, why and until when.

    A NAME that is not set exits 5 naming the flags SCOPE sees with the closest names
    (with --json: did_you_mean: [{scope, name}, ...] in the error).

    JSON: {flag: Flag, overridden_by: [service, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.GetFlagRequest(scope=scope, name=name, effective=effective)
    try:
        doc = app.call("GetFlag", request)
    except CliError as e:
        if e.code == "NOT_FOUND":
            seen = flags_seen(app, scope)
            if seen is not None:
                similar = closest_flags(name, seen)
                e.hint = did_you_mean_hint(scope, similar)
                e.details["did_you_mean"] = suggestions_json(similar)
        raise
    respond(app, doc, lambda d, now: render_flag_get(d, now, scope, name))


@flag.command("list")
@click.argument("scope", required=False, default="")
@click.option("--effective", is_flag=True, help="With a service: include the global flags it sees.")
@click.pass_obj
def flag_list(app: App, scope: str, effective: bool) -> None:
    """List flags, of every scope or of SCOPE.

    JSON: {flags: [Flag, ...], revision: N}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ListFlagsRequest(scope=scope, effective=effective)
    respond(app, app.call("ListFlags", request), render_flag_list)


@flag.command("clear")
@click.argument("scope")
@click.argument("name")
@click.option(
    "--all-layers", is_flag=True, help="Remove every time-boxed layer, not only the top one."
)
@write_command
@wait_command(service_option=True)
@click.pass_obj
def flag_clear(
    app: App, scope: str, name: str, all_layers: bool, write: WriteArgs, wait: WaitArgs
) -> None:
    """Remove flag NAME from SCOPE (what it replaced, if time-boxed, applies again).

    Clearing a flag that is not set changes nothing (exit 0, so runbooks can be re-run)
    and warns on stderr, naming the flags SCOPE sees with the closest names (with --json:
    {"warning": {..., did_you_mean: [{scope, name}, ...]}}).

    JSON: {result: WriteResult, removed: Flag|null, restored: Flag|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    services = scope_wait_services(scope, wait)
    request = mitigation_pb2.ClearFlagRequest(
        scope=scope, name=name, all_layers=all_layers, options=write.to_proto(app.actor)
    )

    def render(doc: Mapping[str, Any], now: datetime) -> Rendered:
        return render_flag_clear(doc, now, scope, name)

    doc = write_and_wait(app, "ClearFlag", request, render, wait, lambda _: services)
    result = doc.get("result") or {}
    if not result.get("changed") and not result.get("would_change"):
        warn_not_set(app, scope, name)


# ---- the wire form and --wait of a flag ----


def flag_value_proto(value: FlagValue) -> types_pb2.FlagValue:
    """The wire form of a flag value (a JSON object is sent as compact text)."""
    from controlplane.api.v1 import types_pb2

    if isinstance(value, bool):
        return types_pb2.FlagValue(bool_value=value)
    if isinstance(value, int | float):
        return types_pb2.FlagValue(number_value=float(value))
    if isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return types_pb2.FlagValue(json_value=text)
    return types_pb2.FlagValue(string_value=value)


WAIT_NEEDS_SERVICE = (
    "--wait needs a service scope; for a global flag name the service with --wait-service S"
)


def scope_wait_services(scope: str, wait: WaitArgs) -> tuple[str, ...]:
    """The services to wait for after a write to a flag in ``scope``.

    Raises:
        click.UsageError: a global flag without --wait-service, or --wait-service with a
            service scope (that service is the one waited for).
    """
    if not wait.enabled:
        return ()
    if scope == "global":
        if not wait.services:
            raise click.UsageError(WAIT_NEEDS_SERVICE)
        return wait.services
    if wait.services:
        raise click.UsageError(
            f"--wait-service is for a global flag; {scope} is a service: --wait waits for it"
        )
    return (scope,)


# ---- a name that is not set: the closest ones ----

MAX_SUGGESTIONS = 3
# difflib's ratio a name must reach to be suggested (its default).
SUGGESTION_CUTOFF = 0.6


def flags_seen(app: App, scope: str) -> list[tuple[str, str]] | None:
    """The flags ``scope`` sees, as (scope, name): for a service its own and the global
    ones; for ``global`` the global ones. None when they cannot be listed (the lookup only
    adds to a message, so its failure is not the command's)."""
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ListFlagsRequest(scope=scope, effective=scope != "global")
    try:
        doc = app.call("ListFlags", request)
    except CliError:
        return None
    return [(str(f.get("scope", "")), str(f.get("name", ""))) for f in doc.get("flags") or []]


def closest_flags(
    name: str, seen: Iterable[tuple[str, str]], *, limit: int = MAX_SUGGESTIONS
) -> list[tuple[str, str]]:
    """The flags among ``seen`` (scope, name) whose names are closest to ``name``, closest
    first: by difflib's ratio (at least ``SUGGESTION_CUTOFF``), then a name with the same
    letters (two swapped: ``new-iu`` for ``new-ui``), then a service's own flag before a
    global one, then by name."""
    ranked = []
    for scope, candidate in dict.fromkeys(seen):
        ratio = difflib.SequenceMatcher(None, name, candidate).ratio()
        if ratio >= SUGGESTION_CUTOFF:
            key = (-ratio, sorted(candidate) != sorted(name), scope == "global", candidate)
            ranked.append((key, (scope, candidate)))
    ranked.sort()
    return [flag for _, flag in ranked[:limit]]


def did_you_mean_hint(scope: str, similar: Sequence[tuple[str, str]]) -> str:
    """``did you mean new-ui (in checkout), new-ux (in global)?``, or where to look."""
    if similar:
        shown = ", ".join(f"{name} (in {where})" for where, name in similar)
        return f"did you mean {shown}?"
    if scope == "global":
        return "no global flag has a similar name: `cpctl flag list global` lists them"
    return (
        f"no flag {scope} sees (its own or global) has a similar name: "
        f"`cpctl flag list {scope} --effective` lists them"
    )


def suggestions_json(similar: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The ``did_you_mean`` field of --json errors and warnings."""
    return [{"scope": where, "name": name} for where, name in similar]


def warn_not_set(app: App, scope: str, name: str) -> None:
    """Warn that a clear found no flag ``name`` in ``scope``, with the closest names."""
    message = f"no flag {name} is set in {scope}, so there is nothing to clear"
    seen = flags_seen(app, scope)
    if seen is None:
        report_warning("NOT_FOUND", message, app.json_output)
        return
    similar = closest_flags(name, seen)
    report_warning(
        "NOT_FOUND",
        message,
        app.json_output,
        hint=did_you_mean_hint(scope, similar),
        details={"did_you_mean": suggestions_json(similar)},
    )


# ---- output ----


def flag_value_text(record: Mapping[str, Any] | None) -> str:
    """A flag's value as JSON text, ``unset`` when there is no flag."""
    return format_value(record.get("value")) if record else "unset"


def render_flag_set(doc: Mapping[str, Any], now: datetime) -> Rendered:
    flag, result = doc.get("flag") or {}, doc.get("result") or {}
    scope, name, value = flag.get("scope", "?"), flag.get("name", "?"), flag_value_text(flag)
    was = flag_value_text(doc.get("previous"))
    line = write_line(
        result,
        done=f"{scope}: flag {name} = {value} (was {was})",
        would=f"set {scope}: flag {name} = {value} (was {was})",
        same=f"{scope}: flag {name} = {value}",
        expiry=expiry_note(flag, now, flag_value_text),
    )
    return Rendered([line], overridden_warning(result, f"flag {name}"))


def render_flag_clear(doc: Mapping[str, Any], now: datetime, scope: str, name: str) -> Rendered:
    clear = cleared(doc, now)
    was = flag_value_text(clear.removed)
    warnings = overridden_warning(clear.result, f"flag {name}")
    if clear.restored:
        # A time-boxed value came off and the value beneath it applies: still set.
        boxed = time_boxed(clear.removed)
        line = write_line(
            clear.result,
            done=f"{scope}: {boxed}value {was} of flag {name} removed; {name} is still set",
            would=f"remove the {boxed}value {was} of {scope}: flag {name}; {name} would stay set",
            same=f"{scope}: flag {name} not set",
        )
        more = beneath_lines(
            clear, now, flag_value_text, layer="value", command=f"cpctl flag clear {scope} {name}"
        )
        return Rendered([line, *more], warnings)
    was += every_layer(clear.beneath, flag_value_text)
    after = "; the global value applies, if any" if scope != "global" else ""
    line = write_line(
        clear.result,
        done=f"{scope}: flag {name} cleared (was {was}){after}",
        would=f"clear {scope}: flag {name} (was {was}){after}",
        same=f"{scope}: flag {name} not set",
    )
    return Rendered([line], warnings)


def render_flag_get(doc: Mapping[str, Any], now: datetime, scope: str, name: str) -> Rendered:
    flag = doc.get("flag")
    if not flag:
        return Rendered([f"{scope}: flag {name} not set"])
    head = f"{scope}: flag {flag.get('name', name)} = {flag_value_text(flag)}"
    if flag.get("scope") and flag["scope"] != scope:
        head += f" (from {flag['scope']}: {scope} has no value of its own)"
    lines = [head, *record_details(flag, now, flag_value_text)]
    overridden = list(doc.get("overridden_by") or [])
    if overridden:
        lines.append(f"  overridden by {len(overridden)} service(s): {', '.join(overridden)}")
    return Rendered(lines)


def render_flag_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    flags = doc.get("flags") or []
    if not flags:
        return Rendered(["no flags set"])
    rows = [
        [
            f.get("scope", ""),
            f.get("name", ""),
            flag_value_text(f),
            expires_cell(f, now),
            *meta_cells(f),
        ]
        for f in flags
    ]
    headers = ["SCOPE", "NAME", "VALUE", "EXPIRES", "REV", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))
