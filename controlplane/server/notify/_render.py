"""An event as each destination takes it: Slack Block Kit, a PagerDuty change event, or
our JSON for webhooks (signed with HMAC-SHA256 when the destination has a secret).

Every request carries ``X-Controlplane-Event-Id`` (the event's stable id) so receivers
can drop a message they already have.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

from controlplane import model
from controlplane.server.notify._config import Destination
from controlplane.server.notify._events import Event, when

__all__ = ["EVENT_ID_HEADER", "SIGNATURE_HEADER", "request_of"]

EVENT_ID_HEADER = "X-Controlplane-Event-Id"
SIGNATURE_HEADER = "X-Controlplane-Signature"
_SLACK_TEXT = 3000  # characters in one section's text
_SLACK_LINES = 40
_PD_SUMMARY = 1024


def _who_why(event: Event) -> list[str]:
    parts = []
    if event.actor:
        parts.append(f"by {event.actor}")
    if event.reason:
        parts.append(event.reason)
    if event.incident:
        parts.append(event.incident)
    if event.expires_at is not None:
        parts.append(f"until {when(event.expires_at)}")
    if event.applied:
        parts.append(event.applied)
    return parts


def _link(event: Event, base: str) -> str:
    """Where to read more: the incident's timeline, else the history of the services."""
    if not base:
        return ""
    if event.incident and "," not in event.incident:
        return f"{base}v1/incidents/{quote(event.incident)}/timeline"
    if len(event.services) == 1:
        return f"{base}v1/history?service={quote(event.services[0])}"
    return f"{base}v1/history"


def _escape(text: str) -> str:
    """Slack's mrkdwn control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(event: Event, link: str = "") -> dict[str, Any]:
    """A Slack incoming-webhook message: the title, then who/why/incident/applied, then
    the changes of a group."""
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_escape(event.title)}*"}}
    ]
    context = [_escape(part) for part in _who_why(event)]
    href = _link(event, link)
    if href:
        context.append(f"<{href}|details>")
    if context:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]}
        )
    if event.lines:
        shown = [f"• {_escape(line)}" for line in event.lines[:_SLACK_LINES]]
        if len(event.lines) > _SLACK_LINES:
            shown.append(f"… and {len(event.lines) - _SLACK_LINES} more")
        text = "\n".join(shown)
        if len(text) > _SLACK_TEXT:
            text = text[: _SLACK_TEXT - 2] + " …"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    return {"text": event.title, "blocks": blocks}


def webhook_body(event: Event, link: str = "") -> dict[str, Any]:
    """Our JSON: the event, its id, and its details."""
    return {
        "id": event.id,
        "kind": event.kind,
        "title": event.title,
        "services": list(event.services),
        "time": model.format_time(event.time),
        "actor": event.actor,
        "reason": event.reason,
        "incident": event.incident,
        "expires_at": model.format_time(event.expires_at) if event.expires_at else None,
        "lines": list(event.lines),
        "applied": event.applied or None,
        "link": _link(event, link) or None,
        "details": event.details,
    }


def pagerduty_event(event: Event, routing_key: str, link: str = "") -> dict[str, Any]:
    """A PagerDuty Events API v2 change event."""
    summary = event.title if len(event.title) <= _PD_SUMMARY else event.title[:1021] + "..."
    document: dict[str, Any] = {
        "routing_key": routing_key,
        "payload": {
            "summary": summary,
            "timestamp": model.format_time(event.time),
            "source": "controlplane"
            + (f" ({', '.join(event.services[:3])})" if event.services else ""),
            "custom_details": {
                key: value
                for key, value in webhook_body(event).items()
                if key not in ("title", "time", "link") and value not in (None, "", [])
            },
        },
    }
    href = _link(event, link)
    if href:
        document["links"] = [{"href": href, "text": "controlplane"}]
    return document


def request_of(
    destination: Destination, event: Event, link: str = ""
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the request that tells ``destination`` of ``event``."""
    if destination.kind == "slack":
        document = slack_message(event, link)
    elif destination.kind == "pagerduty":
        document = pagerduty_event(event, destination.routing_key, link)
    else:
        document = webhook_body(event, link)
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", EVENT_ID_HEADER: event.id}
    if destination.kind == "webhook" and destination.secret:
        digest = hmac.new(destination.secret.encode(), body, hashlib.sha256).hexdigest()
        headers[SIGNATURE_HEADER] = f"sha256={digest}"
    return body, headers
