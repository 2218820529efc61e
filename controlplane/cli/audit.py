"""The audit trail: ``cpctl watch`` (changes as they are made), ``history`` (the changes
made) and ``timeline`` (an incident's, for its post-mortem); commands and their output."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._errors import CliError, ExitCode
from controlplane.cli._output import (
    Rendered,
    dumps,
    dumps_line,
    format_percent,
    format_value,
    iso,
    one_line,
    table,
    terminal_safe,
)
from controlplane.cli._params import SINCE


@click.command()
@click.argument("service", required=False, default="")
@click.pass_obj
def watch(app: App, service: str) -> None:
    """Print changes as they are made: of SERVICE (with the global ones), or of every service.

    One line per change: time, revision, action, scope/name, before -> after, who, why,
    incident. Runs until stopped: Ctrl-C exits 130. Once the watch is live, stderr says
    from which revision ("watching ... from revision N", or with --json
    {"watching": {"service": ..., "revision": N}}).

    JSON: JSON Lines, one AuditEntry per line.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.WatchChangesRequest(service=service)
    # Ctrl-C stops the watch even where SIGINT came in ignored (a background job of a
    # script without job control): `kill -INT` is how such a script ends it.
    with contextlib.suppress(ValueError):  # not the main thread (in-process tests)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    live, last = False, 0
    responses = app.stream("WatchChanges", request)
    try:
        for response in responses:
            changes = response.get("changes") or []
            if not live:
                # The first response carries no changes: the revision the watch is live from.
                live, last = True, int(response.get("revision") or 0)
                _watch_note(app, service, last)
                continue
            for entry in changes:
                click.echo(
                    dumps_line(entry) if app.json_output else terminal_safe(render_change(entry))
                )
            last = max(last, int(response.get("revision") or 0))
    except KeyboardInterrupt:
        responses.close()
        raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None
    except CliError as e:
        if not live:
            raise
        raise CliError(
            e.code,
            f"the watch ended: {e.message}",
            ExitCode(e.exit_code),
            hint=f"changes after revision {last} were not shown: `cpctl history` lists them; "
            "start the watch again",
        ) from e


def _watch_note(app: App, service: str, revision: int) -> None:
    if app.json_output:
        note = {"watching": {"service": service, "revision": revision}}
        click.echo(json.dumps(note), err=True)
        return
    what = service or "every service"
    click.echo(f"watching {what} from revision {revision} (Ctrl-C to stop)", err=True)


@click.command()
@click.option("--service", default="", help="Changes of this service (and global ones).")
@click.option("--incident", default="", metavar="ID", help="Changes made for this incident.")
@click.option("--since", type=SINCE, help="From this time, or this long ago (2h, 1d).")
@click.option("--until", type=SINCE, help="Up to this time, or this long ago.")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=2**31 - 1),
    help="At most N entries, newest first.  [default: 100]",
)
@click.pass_obj
def history(
    app: App,
    service: str,
    incident: str,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
) -> None:
    """Show the audit trail of changes, newest first.

    JSON: {entries: [AuditEntry, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ListHistoryRequest(
        service=service, incident=incident, limit=limit or 0
    )
    if since is not None:
        request.since.FromDatetime(since)
    if until is not None:
        request.until.FromDatetime(until)
    respond(app, app.call("ListHistory", request), render_history)


@click.command()
@click.option("--incident", required=True, metavar="ID", help="The incident (e.g. INC-42).")
@click.option(
    "--format",
    "output",
    type=click.Choice(["md", "json"]),
    default="md",
    show_default=True,
    help="Markdown for the post-mortem document, or JSON.",
)
@click.option("--limit", type=click.IntRange(min=1, max=10_000), help="At most N changes.")
@click.pass_obj
def timeline(app: App, incident: str, output: str, limit: int | None) -> None:
    """The post-mortem timeline of an incident, oldest first.

    Every change made for it (sets, clears, expiries, bundle reverts): when, who, why,
    what it changed, and when all connected instances of each service concerned had
    applied it.

    JSON (--format json or --json): {incident, entries: [TimelineEntry, ...]}; a
    TimelineEntry is {change: AuditEntry, applied: [ServiceApplied, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call(
        "GetTimeline", mitigation_pb2.GetTimelineRequest(incident=incident, limit=limit or 0)
    )
    if app.json_output or output == "json":
        click.echo(dumps(doc))
        return
    for line in render_timeline_md(doc):
        click.echo(terminal_safe(line))


# ---- output ----


def render_history(doc: Mapping[str, Any], now: datetime) -> Rendered:
    entries = doc.get("entries") or []
    if not entries:
        return Rendered(["no changes found"])
    rows = [
        [
            iso(e["time"], seconds=True) if e.get("time") else "-",
            str(e.get("revision", "")),
            str(e.get("action", "")),
            str(e.get("scope", "")),
            str(e.get("name", "")),
            str(e.get("actor", "")),
            str(e.get("incident", "")),
            str(e.get("reason", "")),
        ]
        for e in entries
    ]
    headers = ["TIME", "REV", "ACTION", "SCOPE", "NAME", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


_ABSENT = {"flag": "unset", "shedding": "off", "pin": "unpinned", "known_good": "not marked"}


def describe_record(kind: str, record: Any) -> str:
    """A record of an audit entry (``before`` / ``after``) in a few words."""
    if record is None:
        return _ABSENT.get(kind, "none")
    if not isinstance(record, Mapping):
        return str(record)
    if record.get("truncated") is True and "kind" not in record:
        # The server shows a record too large for the answer as its size and digest.
        return f"({record.get('bytes', '?')} bytes, too large to show)"
    if kind == "flag" or "value" in record:
        return format_value(record.get("value"))
    if kind == "shedding" or "percent" in record:
        return f"{record.get('tier', 'SHEDDABLE')} {format_percent(record.get('percent', 0))}"
    if kind == "known_good":
        return "known-good"
    if kind == "pin" or "version" in record:
        return str(record.get("version", "?"))
    return "set"


def render_change(entry: Mapping[str, Any]) -> str:
    """One line per change for ``cpctl watch``: time, revision, what, before -> after, who, why."""
    kind = str(entry.get("kind", ""))
    when = iso(entry["time"], seconds=True) if entry.get("time") else "-"
    target = str(entry.get("scope", ""))
    if entry.get("name"):
        target += f"/{entry['name']}"
    change = f"{describe_record(kind, entry.get('before'))} -> "
    change += describe_record(kind, entry.get("after"))
    if entry.get("expires_at") is not None:
        change += f" until {iso(entry['expires_at'], seconds=True)}"
    parts = [
        when,
        f"rev {entry.get('revision', 0)}",
        str(entry.get("action", "")),
        target,
        change,
        f"by {entry.get('actor') or '?'}",
    ]
    if entry.get("reason"):
        parts.append(json.dumps(str(entry["reason"]), ensure_ascii=False))
    if entry.get("incident"):
        parts.append(str(entry["incident"]))
    if entry.get("bundle_id"):
        parts.append(f"bundle {entry['bundle_id']}")
    return one_line("  ".join(parts))


def render_timeline_md(doc: Mapping[str, Any]) -> list[str]:
    """The post-mortem timeline of an incident as Markdown: one table row per change."""
    incident = str(doc.get("incident", ""))
    entries = list(doc.get("entries") or [])
    lines = [f"# Timeline of {incident}", ""]
    if not entries:
        return [*lines, f"No change was made for {incident}."]
    first = entries[0]["change"].get("time")
    last = entries[-1]["change"].get("time")
    if first and last:
        lines += [f"{len(entries)} changes from {iso(first)} to {iso(last)} (UTC).", ""]
    lines += [
        "| time (UTC) | rev | who | action | what | change | why | applied by all instances |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        change = entry["change"]
        kind = str(change.get("kind", ""))
        when = change.get("time")
        target = str(change.get("scope", ""))
        if change.get("name"):
            target += f"/{change['name']}"
        what = f"{describe_record(kind, change.get('before'))} → "
        what += describe_record(kind, change.get("after"))
        if change.get("expires_at") is not None:
            what += f" until {iso(change['expires_at'], seconds=True)}"
        applied = []
        for item in entry.get("applied") or []:
            at = item.get("applied_at")
            delay = f" (+{(at - when).total_seconds():.2f} s)" if at and when else ""
            applied.append(
                f"{item.get('service')}: {item.get('instances', 0)} at "
                f"{iso(at, seconds=True) if at else '?'}{delay}"
            )
        who = str(change.get("actor") or "?")
        if change.get("bundle_id"):
            who += f" (bundle {change['bundle_id']})"
        row = [
            iso(when, seconds=True) if when else "-",
            str(change.get("revision", "")),
            who,
            str(change.get("action", "")),
            target,
            what,
            str(change.get("reason", "")),
            "; ".join(applied) or "-",
        ]
        lines.append("| " + " | ".join(_md_cell(cell) for cell in row) + " |")
    return lines


def _md_cell(text: str) -> str:
    return one_line(text).replace("|", "\\|")
