"""``cpctl notifications``: where the notifications (``controlplane serve --notify``) are,
and the messages given up on."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._output import Rendered, format_age, iso, table


@click.group()
def notifications() -> None:
    """Notifications to Slack, PagerDuty and webhooks: progress and failures."""


def _list(app: App, limit: int | None) -> Mapping[str, Any]:
    from controlplane.api.v1 import mitigation_pb2

    return app.call("ListNotifications", mitigation_pb2.ListNotificationsRequest(limit=limit or 0))


@notifications.command("status")
@click.pass_obj
def status(app: App) -> None:
    """Which server sends, and how far each destination got (the message in flight and
    its attempts, when one is being retried).

    JSON: {sender, destinations: [{name, cursor, pending_id, pending_since, attempts}],
    failed: [...]}.
    """
    respond(app, _list(app, 1), render_status)


@notifications.command("failed")
@click.option("--limit", type=click.IntRange(min=1, max=1000), help="At most N, newest first.")
@click.pass_obj
def failed(app: App, limit: int | None) -> None:
    """The messages given up on after retrying for the notifications file's
    give_up_after (1 h by default): when, where, what, and the last error.

    JSON: {failed: [{id, destination, kind, title, lines, first_attempt, given_up_at,
    attempts, error}, ...]}.
    """
    respond(app, _list(app, limit), render_failed)


# ---- output ----


def render_status(doc: Mapping[str, Any], now: datetime) -> Rendered:
    destinations = doc.get("destinations") or []
    if not destinations and not doc.get("sender"):
        return Rendered(["notifications are off: no server runs with --notify"])
    lines = [f"sender: {doc.get('sender') or 'none (no server holds the place now)'}"]
    rows = []
    for entry in destinations:
        sending = "-"
        if entry.get("pending_id"):
            since = entry.get("pending_since")
            age = f" for {format_age(now - since)}" if since is not None else ""
            attempts = int(entry.get("attempts", 0))
            sending = f"{entry['pending_id']} ({attempts} attempt(s){age})"
        rows.append([str(entry.get("name", "?")), str(entry.get("cursor", 0)), sending])
    lines += table(["DESTINATION", "TOLD UP TO REVISION", "SENDING"], rows)
    warnings = []
    if doc.get("failed"):
        warnings.append("warning: some messages were given up on: cpctl notifications failed")
    return Rendered(lines, warnings)


def render_failed(doc: Mapping[str, Any], now: datetime) -> Rendered:
    entries = doc.get("failed") or []
    if not entries:
        return Rendered(["no notification was given up on"])
    lines = []
    for entry in entries:
        when = entry.get("given_up_at")
        lines.append(
            f"{iso(when, seconds=True) if when is not None else '-'}  "
            f"{entry.get('destination', '?')}  {entry.get('kind', '?')}  "
            f"{entry.get('title', '')}"
        )
        lines += [f"    {line}" for line in entry.get("lines") or []]
        lines.append(
            f"    {entry.get('attempts', 0)} attempt(s); last error: {entry.get('error', '?')}"
            f"; id {entry.get('id', '?')}"
        )
    return Rendered(lines)
