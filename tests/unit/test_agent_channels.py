"""The reconnect backoff: its bounds, its jitter, its reset."""

from __future__ import annotations

import random

from agents import Backoff

# ---------------------------------------------------------------- backoff


def test_backoff_bounds_grow_from_50_ms_and_are_capped_at_1_s() -> None:
    highest = Backoff(rand=lambda: 0.999999)
    delays = [highest.next() for _ in range(10)]
    bounds = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]
    for delay, bound in zip(delays, bounds, strict=True):
        assert bound * 0.9999 < delay < bound
    lowest = Backoff(rand=lambda: 0.0)
    assert [lowest.next() for _ in range(10)] == [0.0] * 10


def test_backoff_is_full_jitter_within_its_bounds_and_resets() -> None:
    rng = random.Random(7)
    backoff = Backoff(rand=rng.random)
    delays = [backoff.next() for _ in range(2000)]
    assert all(0 <= d < min(1.0, 0.05 * 2 ** min(i, 10)) for i, d in enumerate(delays))
    capped = delays[10:]
    # Full jitter: spread over the whole range, not clustered near the bound.
    assert min(capped) < 0.05 and max(capped) > 0.95
    assert 0.45 < sum(capped) / len(capped) < 0.55
    backoff.reset()
    assert backoff.bound() == 0.05
    assert backoff.next() < 0.05
    assert Backoff(rand=rng.random).bound() == 0.05
    assert huge_attempt_bound() == 1.0


def huge_attempt_bound() -> float:
    backoff = Backoff()
    backoff.attempt = 10_000
    return backoff.bound()
