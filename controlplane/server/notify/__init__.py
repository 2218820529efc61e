"""Notifications out: audited changes told to Slack, PagerDuty and webhooks.

``controlplane serve --notify FILE`` (:mod:`._config`) names the destinations; the
:class:`Notifier` (:mod:`._notifier`) follows the audit trail from one server process
at a time and sends each group of changes (:mod:`._events`) as the destination takes
it (:mod:`._render`), retrying until delivered or given up on.
"""

from controlplane.server.notify._config import (
    EVENT_KINDS,
    Destination,
    NotifyConfig,
    NotifyConfigError,
    load_notify_file,
    parse_notify,
)
from controlplane.server.notify._events import Change, Event, change_of, event_of, next_group
from controlplane.server.notify._notifier import Notifier
from controlplane.server.notify._render import EVENT_ID_HEADER, SIGNATURE_HEADER, request_of

__all__ = [
    "EVENT_ID_HEADER",
    "EVENT_KINDS",
    "SIGNATURE_HEADER",
    "Change",
    "Destination",
    "Event",
    "Notifier",
    "NotifyConfig",
    "NotifyConfigError",
    "change_of",
    "event_of",
    "load_notify_file",
    "next_group",
    "parse_notify",
    "request_of",
]
