"""``agents.criticality.current`` and ``use``: what a service's own code sees and sets.

Where the middleware sets it and what the clients send is in
tests/integration/test_criticality.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from agents import Criticality
from agents.criticality import current, use


def test_none_outside_a_request() -> None:
    assert contextvars.Context().run(current) is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (Criticality.SHEDDABLE, Criticality.SHEDDABLE),
        ("SHEDDABLE_PLUS", Criticality.SHEDDABLE_PLUS),
        ("sheddable-plus", Criticality.SHEDDABLE_PLUS),
        (" Critical_Plus ", Criticality.CRITICAL_PLUS),
        # Anything else is CRITICAL, as a header would be: never an error.
        ("SHEDABLE", Criticality.CRITICAL),
        ("", Criticality.CRITICAL),
        (None, None),
    ],
    ids=repr,
)
def test_use_sets_it_for_the_block_and_gives_back_the_one_before(
    given: Criticality | str | None, expected: Criticality | None
) -> None:
    with use("SHEDDABLE") as outer:
        assert outer is Criticality.SHEDDABLE
        with use(given) as inner:
            assert inner is expected
            assert current() is expected
        assert current() is Criticality.SHEDDABLE
    assert current() is None


def test_use_gives_it_back_when_the_block_raises() -> None:
    with pytest.raises(KeyError), use("SHEDDABLE"):
        raise KeyError("boom")
    assert current() is None


async def test_tasks_carry_the_one_they_were_started_under() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    seen: dict[str, list[Criticality | None]] = {"a": [], "b": []}

    async def work(name: str, level: str) -> None:
        with use(level):
            seen[name].append(current())
            if name == "a":
                started.set()
                await release.wait()  # b sets its own meanwhile
            else:
                await started.wait()
                release.set()
            child = asyncio.create_task(asyncio.to_thread(current))
            seen[name].append(await child)

    await asyncio.gather(work("a", "SHEDDABLE"), work("b", "CRITICAL_PLUS"))
    assert seen == {
        "a": [Criticality.SHEDDABLE, Criticality.SHEDDABLE],
        "b": [Criticality.CRITICAL_PLUS, Criticality.CRITICAL_PLUS],
    }
    assert current() is None


def test_a_thread_of_ones_own_starts_without_it() -> None:
    # What the docs tell: a plain thread starts in an empty context, so work handed
    # to it carries no criticality unless it is given one.
    seen: list[Criticality | None] = []
    with use("SHEDDABLE"):
        thread = threading.Thread(target=lambda: seen.append(current()))
        thread.start()
        thread.join()
        copied = contextvars.copy_context()
        thread = threading.Thread(target=copied.run, args=(lambda: seen.append(current()),))
        thread.start()
        thread.join()
    assert seen == [None, Criticality.SHEDDABLE]
