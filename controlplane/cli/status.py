"""``cpctl status``: what is in force for a service and which instances applied it;
``cpctl services``: which services the control plane knows."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._output import (
    Rendered,
    expires_cell,
    expiry_note,
    format_age,
    format_time,
    meta_of,
    one_line,
    table,
)
from controlplane.cli._write import unknown_service_warning
from controlplane.cli.flag import flag_value_text
from controlplane.cli.pin import pin_text
from controlplane.cli.shed import shedding_meaning, shedding_text


@click.command()
@click.argument("service")
@click.pass_obj
def status(app: App, service: str) -> None:
    """What is in force for SERVICE and which of its instances applied it.

    Flags in effect and the scope each comes from, shedding, the pin, and the time left on
    time-boxed ones; then each instance: its server, whether it is connected, the revision
    it applied, its lag (changes not yet applied; ? when unknown) and the version it runs,
    with drift from the pin marked. No connected instance is reported, not an error.

    A service no agent has connected for within the server's memory of agents is said
    to be unknown, with the closest known names (a mistyped name?). A mitigation in force
    without expiry for longer than the server's --stale-after (4h by default) is warned
    of: likely forgotten after its incident.

    JSON: {service, revision, flags: [Flag, ...], shedding: Shedding|null, pin: Pin|null,
    instances: [Instance, ...], drift: {version: count}, last_contact: time|null,
    unknown: UnknownService|null, sync_clients: count, stale: [{kind, scope, name,
    set_at, age: seconds}, ...], stale_after: seconds}. OpenFeature sync clients (flagd
    providers) are counted apart: they receive every change but confirm none.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("GetStatus", mitigation_pb2.GetStatusRequest(service=service))
    respond(app, doc, render_status)


@click.command()
@click.pass_obj
def services(app: App) -> None:
    """The services known: agents seen (instances connected now, last contact) or records
    held (own flags, shedding, pin, known-good marks).

    A service with records but no agent seen within the server's memory of agents (as
    long as its audit retention) is marked: a mistyped name, or one not running yet.
    Remove a stray one's records with `flag clear`, `shed clear`, `pin clear` and
    `known-good unmark`.

    JSON: {services: [{service, connected, last_contact: time|null, flags, shedding,
    pinned_version, known_good}, ...], memory: seconds}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("ListServices", mitigation_pb2.ListServicesRequest())
    respond(app, doc, render_services)


# ---- output ----


def render_services(doc: Mapping[str, Any], now: datetime) -> Rendered:
    """``cpctl services``: one row per known service."""
    rows = []
    never = []
    for entry in doc.get("services") or []:
        service = str(entry.get("service", "?"))
        contact = entry.get("last_contact")
        connected = int(entry.get("connected", 0))
        if connected:
            seen = "now"
        elif contact is not None:
            seen = f"{format_age(now - contact)} ago"
        else:
            seen = "never"
            never.append(service)
        held = []
        if entry.get("flags"):
            held.append(f"{entry['flags']} flag(s)")
        if entry.get("shedding"):
            held.append("shedding")
        if entry.get("pinned_version"):
            held.append(f"pin {entry['pinned_version']}")
        if entry.get("known_good"):
            held.append(f"{entry['known_good']} known-good")
        rows.append([service, str(connected), seen, ", ".join(held) or "-"])
    if not rows:
        return Rendered(["no services known: no agent has connected and no record is held"])
    lines = table(["SERVICE", "INSTANCES", "LAST CONTACT", "RECORDS"], rows)
    memory = doc.get("memory")
    warnings = []
    if never:
        within = f" in the last {format_age(memory)}" if memory is not None else ""
        warnings.append(
            f"warning: no agent of {', '.join(never)} has connected{within}: records held for "
            "a service nobody runs apply to no one (a mistyped name?)"
        )
    return Rendered(lines, warnings)


def _set_by(record: Mapping[str, Any], now: datetime) -> str:
    meta = meta_of(record)
    text = f"  by {meta.get('actor') or '?'}"
    if meta.get("set_at") is not None:
        text += f", {format_time(meta['set_at'], now)}"
    if meta.get("reason"):
        text += f": {meta['reason']}"
    if meta.get("incident"):
        text += f" [{meta['incident']}]"
    if meta.get("bundle_id"):
        text += f" (bundle {meta['bundle_id']})"
    return one_line(text)


def _instance_notes(instance: Mapping[str, Any], pinned: str | None, now: datetime) -> str:
    notes = []
    running = str(instance.get("running_version") or "")
    if pinned is not None and running and running != pinned:
        notes.append(f"DRIFT: pinned {pinned}")
    if not instance.get("connected"):
        last_seen = instance.get("last_seen")
        seen = f", last seen {format_age(now - last_seen)} ago" if last_seen is not None else ""
        notes.append(f"stale (disconnected{seen})")
    lag = int(instance.get("lag", 0))
    if lag < 0:
        notes.append("lag unknown")
    elif lag > 0:
        notes.append(f"behind by {lag} change(s)")
    if instance.get("override_active"):
        notes.append("local override active")
    return "; ".join(notes)


NO_INSTANCES = (
    "no connected instances: nothing applies these mitigations right now "
    "(is the service name right? are its agents running?)"
)


def render_status(doc: Mapping[str, Any], now: datetime) -> Rendered:
    """``cpctl status``: what is in force for a service and which instances applied it."""
    service = str(doc.get("service", "?"))
    instances = list(doc.get("instances") or [])
    connected = sum(1 for i in instances if i.get("connected"))
    clients = int(doc.get("sync_clients") or 0)
    lines = [
        f"{service} · revision {doc.get('revision', 0)} · "
        f"{connected} of {len(instances)} instance(s) connected"
        + (f" · {clients} OpenFeature sync client(s), no confirmation" if clients else ""),
        "",
    ]
    flags = list(doc.get("flags") or [])
    if flags:
        lines.append("flags in effect (the service's own value wins over the global one):")
        rows = [
            [
                str(f.get("name", "")),
                flag_value_text(f),
                f"{f.get('scope', '')} (own)" if f.get("scope") == service else "global",
                expires_cell(f, now),
                str(meta_of(f).get("actor") or ""),
                str(meta_of(f).get("incident") or ""),
                str(meta_of(f).get("reason") or ""),
            ]
            for f in flags
        ]
        headers = ["NAME", "VALUE", "FROM", "EXPIRES", "ACTOR", "INCIDENT", "REASON"]
        lines += ["  " + line for line in table(headers, rows)]
    else:
        lines.append("flags: none")
    shedding = doc.get("shedding")
    if shedding:
        lines.append(
            f"shedding: {shedding_text(shedding)} ({shedding_meaning(shedding)})"
            + expiry_note(shedding, now, shedding_text)
        )
        lines.append(_set_by(shedding, now))
    else:
        lines.append("shedding: off")
    pin = doc.get("pin")
    pinned = str(pin.get("version", "")) if pin else None
    if pin:
        lines.append(f"pin: {pinned}" + expiry_note(pin, now, pin_text))
        lines.append(_set_by(pin, now))
    else:
        lines.append("pin: none")
    lines.append("")
    if instances:
        rows = [
            [
                str(i.get("instance_id", "")),
                str(i.get("server_id", "")),
                "yes" if i.get("connected") else "no",
                str(i.get("applied_revision") or "-"),
                "?" if int(i.get("lag", 0)) < 0 else str(i.get("lag", 0)),
                str(i.get("running_version") or "?"),
                _instance_notes(i, pinned, now),
            ]
            for i in instances
        ]
        headers = ["INSTANCE", "SERVER", "CONNECTED", "APPLIED", "LAG", "VERSION", "NOTES"]
        lines += table(headers, rows)
    drift = dict(doc.get("drift") or {})
    for version in sorted(drift):
        lines.append(f"drift: {drift[version]} instance(s) run {version}, not the pinned {pinned}")
    warnings = []
    if connected == 0:
        lines.append(NO_INSTANCES)
        if doc.get("last_contact") is not None:
            lines.append(f"last contact: {format_time(doc['last_contact'], now)}")
        if doc.get("unknown"):
            warnings.append(unknown_service_warning(doc["unknown"]))
    warnings += stale_warnings(doc)
    return Rendered(lines, warnings)


def stale_warnings(doc: Mapping[str, Any]) -> list[str]:
    """One line per mitigation the server says is stale: in force, no expiry, for longer
    than its --stale-after."""
    threshold = doc.get("stale_after")
    after = f" (stale after {format_age(threshold)})" if threshold is not None else ""
    service = str(doc.get("service", "?"))
    warnings = []
    for stale in doc.get("stale") or []:
        kind = str(stale.get("kind", "?"))
        name = str(stale.get("name") or "")
        scope = str(stale.get("scope") or service)
        if kind == "flag":
            what = f"flag {name}" + (f" ({scope})" if scope != service else "")
            clear = f"cpctl flag clear {scope} {name}"
        elif kind == "pin":
            what = f"pin {name}" if name else "pin"
            clear = f"cpctl pin clear {service}"
        else:
            what = kind
            clear = f"cpctl shed clear {service}"
        age = stale.get("age")
        since = f" for {format_age(age)}" if age is not None else ""
        # Not "give it --ttl": a time-boxed write over a record without expiry layers on
        # top of it, and the same stale record applies again when the layer ends.
        warnings.append(
            one_line(
                f"warning: {what} has been in force{since} with no expiry{after}: clear it "
                f"once its incident is over ({clear} --reason ...)"
            )
        )
    return warnings
