"""Shedding decisions: whether a request of a criticality is shed, by chance or by key.

Read path: the decision reads the snapshot's precomputed ``shed_tier``,
``shed_fraction`` and ``shed_threshold`` (``agents._state``) and nothing else:
no lock, no I/O, no clock read, and never an exception, whatever the caller
passes as the criticality or the key.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

from agents import _types
from agents._state import Snapshot

# Bound by assignment, not imported: CPython 3.11 compiles a method call on an
# imported name (``_CRITICALITY.get(...)``) as an attribute load and a call, not
# LOAD_METHOD, which costs the read path a bound method per call.
Criticality = _types.Criticality
_CRITICALITY = _types._CRITICALITY


def should_shed(
    snapshot: Snapshot,
    criticality: Criticality | str | object,
    rand: Callable[[], float] = random.random,
) -> bool:
    """Whether to shed a request of this criticality.

    Less critical than the tier: shed; the tier itself: shed when ``rand()`` (in
    [0, 1)) falls below ``percent / 100``; more critical, or no shedding: not shed.
    ``rand`` is called only for requests of the tier itself. A criticality that
    :meth:`Criticality.parse` does not recognise, of whatever type, counts as
    ``CRITICAL``: never an exception on the read path.
    """
    # One dict lookup for a member or an exact name; anything else, even
    # unhashable, goes to Criticality.parse. True == 1 and hashes alike, but a
    # bool is no criticality.
    try:
        c = _CRITICALITY.get(criticality)
    except Exception:
        c = None
    if c is None or criticality is True:
        c = Criticality.parse(criticality)
    tier = snapshot.shed_tier
    if c < tier:
        return False
    if c > tier:
        return True
    return rand() < snapshot.shed_fraction


def _key_bytes(key: object) -> bytes:
    """The bytes a request key hashes as: a string's UTF-8 (lone surrogates kept),
    bytes as they are, anything else as its ``str()``; never raises."""
    try:
        if isinstance(key, str):
            return str.encode(key, "utf-8", "surrogatepass")
        if isinstance(key, bytes | bytearray | memoryview):
            return bytes(key)
        return str.encode(str(key), "utf-8", "surrogatepass")
    except Exception:  # a str() that raises: one bucket for all such keys
        return b""


def should_shed_key(
    snapshot: Snapshot, criticality: Criticality | str | object, key: str | object
) -> bool:
    """Like :func:`should_shed`, with a stable decision per request key.

    The key (a user or session id) hashes to [0, 2**32): the same key gets the
    same decision for as long as the level holds, in every process and service,
    and a key shed at 20 % is also shed at 30 %. A key that is not a string is
    hashed as its ``str()`` (bytes as they are); never an exception.
    """
    # One dict lookup for a member or an exact name; anything else, even
    # unhashable, goes to Criticality.parse. True == 1 and hashes alike, but a
    # bool is no criticality.
    try:
        c = _CRITICALITY.get(criticality)
    except Exception:
        c = None
    if c is None or criticality is True:
        c = Criticality.parse(criticality)
    tier = snapshot.shed_tier
    if c < tier:
        return False
    if c > tier:
        return True
    # CRC-32 is fast but linear: keys differing in a few digits ("session-1",
    # "session-2", ...) get correlated hashes, and the share shed drifted by 5
    # standard deviations from the set percentage. Murmur3's 32-bit finalizer
    # mixes it; together still well under a microsecond, and stable across
    # processes, unlike hash().
    h = zlib.crc32(_key_bytes(key))
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h < snapshot.shed_threshold
