"""How long the fuzzers run: a few examples in ``make test``, many in the fault run.

``CONTROLPLANE_FAULTS=full`` (``make test-faults``) draws new random examples each run;
otherwise the examples are derandomized, so CI runs the same ones every time.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from tests.faults.harness import FULL

settings.register_profile(
    "controlplane-fuzz",
    deadline=None,  # every example makes network calls
    database=None,  # CI runs the same examples every time
    derandomize=True,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,  # the servers live across examples on purpose
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
settings.register_profile(
    "controlplane-fuzz-full",
    parent=settings.get_profile("controlplane-fuzz"),
    derandomize=False,
)
_PROFILE = settings.get_profile("controlplane-fuzz-full" if FULL else "controlplane-fuzz")

TIMEOUT = 900 if FULL else 120
"""Seconds a fuzz test may take (pytest-timeout)."""


def budget(quick: int, full: int) -> settings:
    """Hypothesis settings for ``quick`` examples in ``make test``, ``full`` in the fault run."""
    return settings(_PROFILE, max_examples=full if FULL else quick)
