"""The agent SDK: a service's view of the control plane's mitigations.

Reads (``enabled``, ``value``, ``should_shed``) are lookups in an immutable
snapshot, without lock, I/O or clock read; see ``agents._state``. For tests,
``agents.testing.StaticAgent`` has the same read API in memory.
"""

from agents._state import (
    Criticality,
    FlagValue,
    PinnedVersion,
    SheddingLevel,
    StateChange,
)

__all__ = [
    "Criticality",
    "FlagValue",
    "PinnedVersion",
    "SheddingLevel",
    "StateChange",
]
