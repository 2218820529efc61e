"""A service using OpenFeature's stock flagd provider in in-process mode, no code of ours.

    python -m tests.helpers.flagd_client HOST PORT SELECTOR

Prints one JSON line per provider event ({"event": "PROVIDER_READY", "flags": [...]}), and
``{"event": "INITIALIZED"}`` once the provider answers,
and for each line read on stdin ``KIND KEY DEFAULT_JSON`` (KIND: boolean, string,
float, integer, object) one JSON line with the resolution: value, reason, variant and
error code. Runs in a process of its own: the provider registers flagd's own protos.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.event import EventDetails, ProviderEvent
from openfeature.flag_evaluation import FlagEvaluationDetails


def _say(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, sort_keys=True) + "\n")
    sys.stdout.flush()


def main() -> None:
    host, port, selector = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for event in (
        ProviderEvent.PROVIDER_READY,
        ProviderEvent.PROVIDER_CONFIGURATION_CHANGED,
        ProviderEvent.PROVIDER_ERROR,
        ProviderEvent.PROVIDER_STALE,
    ):

        def handler(details: EventDetails, name: str = event.name) -> None:
            _say({"event": name, "flags": sorted(details.flags_changed or [])})

        api.add_handler(event, handler)
    provider = FlagdProvider(
        resolver_type=ResolverType.IN_PROCESS,
        host=host,
        port=port,
        selector=selector,
        retry_backoff_ms=100,
        retry_backoff_max_ms=200,
        deadline_ms=5000,
    )
    # Resolutions are answered once the provider is initialized (its first sync).
    api.set_provider_and_wait(provider)
    _say({"event": "INITIALIZED", "flags": []})
    client = api.get_client()
    resolve: dict[str, Callable[[str, Any], FlagEvaluationDetails[Any]]] = {
        "boolean": client.get_boolean_details,
        "string": client.get_string_details,
        "float": client.get_float_details,
        "integer": client.get_integer_details,
        "object": client.get_object_details,
    }
    for line in sys.stdin:
        kind, key, default = line.strip().split(" ", 2)
        details = resolve[kind](key, json.loads(default))
        _say(
            {
                "value": details.value,
                "reason": getattr(details.reason, "value", details.reason),
                "variant": details.variant,
                "error_code": details.error_code.value if details.error_code else None,
            }
        )
    api.shutdown()


if __name__ == "__main__":
    main()
