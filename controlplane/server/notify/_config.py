"""The notifications file (``controlplane serve --notify FILE``): where events go.

YAML (or JSON by its ``.json`` suffix)::

    destinations:
      - name: oncall
        kind: slack                  # slack | pagerduty | webhook
        url_file: /etc/controlplane/slack-url      # or url: (tests), or url_env:
        services: [checkout]         # optional filter (default: all)
        events: [change, expiry]     # default: all
      - name: pd
        kind: pagerduty              # Events API v2 change events
        routing_key_file: /etc/controlplane/pd-key
      - name: siem
        kind: webhook                # X-Controlplane-Signature: sha256=<HMAC of the body>
        url: https://siem.example/hook
        secret_file: /etc/controlplane/siem-secret
    link: https://controlplane.example/       # optional: links back in messages
    group_window: 2s                 # a burst to one service within it is one message
    incomplete_after: 30s            # a change not applied everywhere after it: `incomplete`
    give_up_after: 1h                # a message not delivered by then is recorded as failed

Secrets (webhook URLs, routing keys, signing secrets) come from a file (checked as the
auth file is: owned by this user or root, writable by no one else), an environment
variable, or, for tests, the file itself. They never appear in logs, errors or
``repr``: a destination is named by its ``name``. Every problem names the entry, the
field and the fix; nothing of a refused file is used (the server keeps what it had).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from controlplane._durations import parse_duration
from controlplane._files import UnsafeFileError, read_guarded

__all__ = [
    "EVENT_KINDS",
    "KINDS",
    "Destination",
    "NotifyConfig",
    "NotifyConfigError",
    "load_notify_file",
    "parse_notify",
]

EVENT_KINDS = ("change", "expiry", "nack", "incomplete", "stale", "trigger", "override")
"""Every kind of event, in the order the documentation gives them."""
KINDS = ("slack", "pagerduty", "webhook")
PAGERDUTY_CHANGE_URL = "https://events.pagerduty.com/v2/change/enqueue"

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SERVICE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TOP_KEYS = {
    "destinations",
    "link",
    "group_window",
    "incomplete_after",
    "give_up_after",
}
_SECRET_FIELDS = {
    "slack": ("url",),
    "pagerduty": ("url", "routing_key"),
    "webhook": ("url", "secret"),
}
_REQUIRED = {"slack": ("url",), "pagerduty": ("routing_key",), "webhook": ("url",)}


class NotifyConfigError(ValueError):
    """The notifications file cannot be used; the message names the entry and the field."""


@dataclass(frozen=True)
class Destination:
    """Where events go: a Slack incoming webhook, PagerDuty, or a webhook of ours."""

    name: str
    kind: str
    url: str = field(repr=False)
    routing_key: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    services: frozenset[str] = frozenset()
    """Only events of these services (and of ``global``); empty: all."""
    events: frozenset[str] = frozenset(EVENT_KINDS)

    def wants(self, kind: str, services: Sequence[str]) -> bool:
        """Whether an event of ``kind`` about ``services`` goes here."""
        if kind not in self.events:
            return False
        if not self.services:
            return True
        return any(s == "global" or s in self.services for s in services)


@dataclass(frozen=True)
class NotifyConfig:
    """A parsed notifications file."""

    destinations: tuple[Destination, ...] = ()
    link: str = ""
    group_window: timedelta = timedelta(seconds=2)
    incomplete_after: timedelta = timedelta(seconds=30)
    give_up_after: timedelta = timedelta(hours=1)
    source: str = ""
    warnings: tuple[str, ...] = ()
    """What to log: secret files others can read."""

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)


def _duration(data: Mapping[str, Any], key: str, default: timedelta, where: str) -> timedelta:
    given = data.get(key)
    if given is None:
        return default
    try:
        value = parse_duration(str(given))
    except ValueError as exc:
        raise NotifyConfigError(f"{where}: {key} {given!r}: {exc}") from None
    if value <= timedelta(0):
        raise NotifyConfigError(f"{where}: {key} must be positive (e.g. 30s, 4h)")
    return value


def _secret(
    entry: Mapping[str, Any], name: str, where: str, base: Path | None, warnings: list[str]
) -> str | None:
    """A secret given as NAME, NAME_file or NAME_env (one of them); None when absent."""
    given = [k for k in (name, f"{name}_file", f"{name}_env") if entry.get(k) is not None]
    if len(given) > 1:
        raise NotifyConfigError(f"{where}: give one of {', '.join(given)}, not several")
    if not given:
        return None
    key = given[0]
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise NotifyConfigError(f"{where}: {key} must be a non-empty string")
    if key.endswith("_env"):
        text = os.environ.get(value)
        if not text or not text.strip():
            raise NotifyConfigError(
                f"{where}: {key}: the environment variable {value} is not set in the "
                "server's environment"
            )
        return text.strip()
    if key.endswith("_file"):
        path = Path(value)
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            raw, warning = read_guarded(
                path, f"the {name.replace('_', ' ')} file of {where}", secret=True
            )
            if warning:
                warnings.append(warning)
            text = raw.decode("utf-8").strip()
        except UnsafeFileError as exc:
            raise NotifyConfigError(str(exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise NotifyConfigError(f"{where}: {key}: cannot read {path}: {exc}") from None
        if not text:
            raise NotifyConfigError(f"{where}: {key}: {path} is empty")
        return text
    return value.strip()


def _url(text: str, where: str, field_name: str) -> str:
    # Named by field, never shown: a Slack webhook URL is its own secret.
    try:
        parsed = httpx.URL(text)
        valid = parsed.scheme in ("http", "https") and bool(parsed.host)
        _ = parsed.port  # a port that is not a number fails here
    except (httpx.InvalidURL, ValueError, TypeError):
        valid = False
    if not valid or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text):
        raise NotifyConfigError(
            f"{where}: {field_name} is not an http(s) URL (the value is not shown: it may be "
            "a secret)"
        )
    return text


def _strings(entry: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NotifyConfigError(f"{where}: {key} must be a list of strings")
    return value


def _destination(
    entry: Any, index: int, base: Path | None, seen: set[str], warnings: list[str]
) -> Destination:
    where = f"destinations[{index}]"
    if not isinstance(entry, dict):
        raise NotifyConfigError(f"{where}: must be a mapping with name, kind and url")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NotifyConfigError(
            f"{where}: name must be 1-63 characters a-z, 0-9 and '-' (e.g. oncall)"
        )
    where = f"destination {name}"
    if name in seen:
        raise NotifyConfigError(f"{where}: the name is used twice; names must be unique")
    seen.add(name)
    kind = entry.get("kind")
    if kind not in KINDS:
        raise NotifyConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    allowed = {"name", "kind", "services", "events"}
    for secret in _SECRET_FIELDS[kind]:
        allowed |= {secret, f"{secret}_file", f"{secret}_env"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise NotifyConfigError(
            f"{where}: unknown field {unknown[0]!r} for a {kind} destination; "
            f"the fields are {', '.join(sorted(allowed))}"
        )
    secrets = {s: _secret(entry, s, where, base, warnings) for s in _SECRET_FIELDS[kind]}
    for required in _REQUIRED[kind]:
        if secrets[required] is None:
            raise NotifyConfigError(
                f"{where}: a {kind} destination needs {required}_file (or {required}_env, "
                f"or {required})"
            )
    url = secrets["url"] or PAGERDUTY_CHANGE_URL
    services = _strings(entry, "services", where)
    for service in services:
        if not _SERVICE.fullmatch(service):
            raise NotifyConfigError(f"{where}: services: {service!r} is not a service name")
    events = _strings(entry, "events", where) or list(EVENT_KINDS)
    for event in events:
        if event not in EVENT_KINDS:
            raise NotifyConfigError(
                f"{where}: events: {event!r} is not an event; the events are "
                f"{', '.join(EVENT_KINDS)}"
            )
    return Destination(
        name=name,
        kind=kind,
        url=_url(url, where, "url"),
        routing_key=secrets.get("routing_key") or "",
        secret=secrets.get("secret") or "",
        services=frozenset(services),
        events=frozenset(events),
    )


def parse_notify(
    data: Any, source: str = "notifications file", base: Path | None = None
) -> NotifyConfig:
    """Validate a loaded notifications document (``base``: where relative files are)."""
    if not isinstance(data, dict):
        raise NotifyConfigError(f"{source}: must be a mapping with a 'destinations' list")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise NotifyConfigError(
            f"{source}: unknown field {unknown[0]!r}; the fields are {', '.join(sorted(_TOP_KEYS))}"
        )
    entries = data.get("destinations")
    if not isinstance(entries, list) or not entries:
        raise NotifyConfigError(f"{source}: 'destinations' must be a non-empty list")
    seen: set[str] = set()
    warnings: list[str] = []
    destinations = tuple(_destination(e, i, base, seen, warnings) for i, e in enumerate(entries))
    link = data.get("link") or ""
    if link:
        if not isinstance(link, str):
            raise NotifyConfigError(f"{source}: link must be a URL string")
        link = _url(link, source, "link").rstrip("/") + "/"
    return NotifyConfig(
        destinations=destinations,
        link=link,
        group_window=_duration(data, "group_window", timedelta(seconds=2), source),
        incomplete_after=_duration(data, "incomplete_after", timedelta(seconds=30), source),
        give_up_after=_duration(data, "give_up_after", timedelta(hours=1), source),
        source=source,
        warnings=tuple(warnings),
    )


def load_notify_file(path: Path) -> NotifyConfig:
    """Read and validate the notifications file.

    Raises:
        NotifyConfigError: it cannot be read, someone else than its owner can change it,
            it does not parse, or it is invalid.
    """
    try:
        raw, _ = read_guarded(path, "the notifications file")
        text = raw.decode("utf-8")
    except UnsafeFileError as exc:
        raise NotifyConfigError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NotifyConfigError(f"cannot read notifications file {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise NotifyConfigError(f"notifications file {path} does not parse: {exc}") from None
    return parse_notify(data, str(path), path.parent)
