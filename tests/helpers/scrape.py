"""Prometheus text scraped from a real endpoint (a server's, or etcd's own)."""

from __future__ import annotations

import urllib.request


def scraped_sum(address: str, metric: str, *, having: str = "") -> float:
    """The sum of every sample of ``metric`` (a name, with labels or not) served at
    ``http://ADDRESS/metrics`` whose line holds ``having``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((metric + "{", metric + " ")) and having in line
    )
