"""The history checker: what every client saw under faults, checked against what must hold.

Writes carry values that are unique per write (the writer makes them so), which lets the
checker tell every write apart in what agents applied. The inputs:

- every write with its outcome: ``ok`` (acknowledged, with the revision it got),
  ``failed`` (the server said it was not applied) or ``unknown`` (a timeout or a lost
  connection: it may have committed);
- per agent, the sequence of ``(revision, state)`` it applied, ``state`` mapping each
  key to its value (absent: unset).

What must hold (:func:`check`):

1. revisions strictly increase per agent;
2. nothing an agent applied was never written (every value is some write's, or the
   initial state's);
3. a failed write never appears anywhere;
4. no agent goes back in time on a key (the writes it shows for a key follow write order);
5. no acknowledged write is missing from the final state: for every key, each agent's
   final value is the last acknowledged write's, or a write issued after it whose
   outcome is unknown;
6. every agent ends in the same state.

Timing (convergence within 5 s of the faults healing) is the harness's part: it collects
the final states only once every agent reached the expected ones or the 5 s passed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["ok", "failed", "unknown"]


@dataclass(frozen=True)
class Write:
    """One write as the writer saw it. ``seq`` orders writes by issue time."""

    seq: int
    key: str
    value: Any  # unique per write
    outcome: Outcome
    revision: int | None = None  # the acknowledged revision (ok only)


@dataclass
class AgentHistory:
    name: str
    applied: list[tuple[int, Mapping[str, Any]]] = field(default_factory=list)

    @property
    def final(self) -> Mapping[str, Any]:
        return self.applied[-1][1] if self.applied else {}


@dataclass
class Report:
    violations: list[str]
    writes: int
    acknowledged: int
    failed: int
    unknown: int
    agents: int
    applied: int

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        return (
            f"{self.writes} writes ({self.acknowledged} acknowledged, {self.failed} failed, "
            f"{self.unknown} unknown), {self.agents} agents, {self.applied} states applied, "
            f"{len(self.violations)} violations"
        )


def expected_final(
    writes: Sequence[Write], initial: Mapping[str, Any] | None = None
) -> dict[str, set[Any]]:
    """Per key, the values the final state may hold (absent key: the set holds None)."""
    by_key: dict[str, list[Write]] = {}
    for write in sorted(writes, key=lambda w: w.seq):
        by_key.setdefault(write.key, []).append(write)
    allowed: dict[str, set[Any]] = {}
    for key in set(by_key) | set(initial or {}):
        history = by_key.get(key, [])
        acked = [w for w in history if w.outcome == "ok"]
        if acked:
            last = max(acked, key=lambda w: w.revision or 0)
            values = {last.value}
            since = last.seq
        else:
            values = {(initial or {}).get(key)}
            since = -1
        values |= {w.value for w in history if w.outcome == "unknown" and w.seq > since}
        allowed[key] = values
    return allowed


def check(
    writes: Iterable[Write],
    agents: Iterable[AgentHistory],
    initial: Mapping[str, Any] | None = None,
    limit: int = 20,
) -> Report:
    """Check the histories; at most ``limit`` violations are described."""
    writes = list(writes)
    agents = list(agents)
    initial = dict(initial or {})
    violations: list[str] = []

    def violation(text: str) -> None:
        if len(violations) < limit:
            violations.append(text)
        elif len(violations) == limit:
            violations.append("... more violations not shown")

    by_value: dict[tuple[str, Any], Write] = {}
    for write in writes:
        if (write.key, write.value) in by_value:
            raise ValueError(f"write values must be unique per key: {write.key}={write.value!r}")
        by_value[(write.key, write.value)] = write
    # A write's place in time: acknowledged ones by revision; others by issue order.
    order = {w.seq: i for i, w in enumerate(sorted(writes, key=lambda w: w.seq))}

    for agent in agents:
        last_revision = 0
        last_seq: dict[str, int] = {}
        for revision, state in agent.applied:
            if revision <= last_revision:
                violation(
                    f"{agent.name}: revision {revision} applied after {last_revision} "
                    "(must strictly increase)"
                )
            last_revision = max(last_revision, revision)
            for key, value in state.items():
                if value is None:
                    continue
                found = by_value.get((key, value))
                if found is None:
                    if initial.get(key) != value:
                        violation(f"{agent.name}: {key}={value!r} at {revision} was never written")
                    continue
                write = found
                if write.outcome == "failed":
                    violation(f"{agent.name}: {key}={value!r} at {revision} is a write that failed")
                if write.outcome == "ok" and (write.revision or 0) > revision:
                    violation(
                        f"{agent.name}: {key}={value!r} shown at revision {revision}, "
                        f"but written at {write.revision}"
                    )
                previous = last_seq.get(key)
                if previous is not None and order[write.seq] < previous:
                    violation(
                        f"{agent.name}: {key} went back in time to {value!r} at revision {revision}"
                    )
                last_seq[key] = max(order[write.seq], previous if previous is not None else -1)

    allowed = expected_final(writes, initial)
    finals = [(agent.name, dict(agent.final)) for agent in agents]
    for name, final in finals:
        for key, values in allowed.items():
            if final.get(key) not in values:
                violation(
                    f"{name}: final {key}={final.get(key)!r}, expected one of "
                    f"{sorted(map(repr, values))} (an acknowledged write is missing)"
                )
    if finals:
        first_name, first = finals[0]
        for name, final in finals[1:]:
            if final != first:
                differing = sorted(
                    k for k in set(first) | set(final) if first.get(k) != final.get(k)
                )
                violation(f"{name} ended in another state than {first_name} (keys {differing})")

    return Report(
        violations=violations,
        writes=len(writes),
        acknowledged=sum(w.outcome == "ok" for w in writes),
        failed=sum(w.outcome == "failed" for w in writes),
        unknown=sum(w.outcome == "unknown" for w in writes),
        agents=len(agents),
        applied=sum(len(a.applied) for a in agents),
    )
