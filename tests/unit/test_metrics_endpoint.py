"""The control server's metrics endpoint: served, idle without wake-ups, stopped at once."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from controlplane.metrics import MetricsEndpoint
from tests.helpers.threads import HAS_PROC, wakes_while_idle


def scrape(endpoint: MetricsEndpoint) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as r:
        return str(r.read().decode())


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc")
def test_an_idle_endpoint_wakes_for_nothing_and_stops_at_once() -> None:
    registry = CollectorRegistry()
    Counter("controlplane_demo", "A counter to scrape.", registry=registry).inc(3)
    endpoint = MetricsEndpoint("127.0.0.1", 0, registry)
    closed = False
    try:
        assert "controlplane_demo_total 3.0" in scrape(endpoint)
        assert wakes_while_idle([endpoint._thread]) == [0]
        # Asleep, not stuck: a scrape is answered.
        assert "controlplane_demo_total 3.0" in scrape(endpoint)
        # A client holding its connection open does not hold the stop (a thread per
        # connection, as prometheus-client's own server).
        held = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
        started = time.monotonic()
        endpoint.close()
        closed = True
        assert time.monotonic() - started < 2.0
        held.close()
    finally:
        if not closed:
            endpoint.close()
    assert not endpoint._thread.is_alive()
    # The port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", endpoint.port))
    endpoint.close()  # idempotent
