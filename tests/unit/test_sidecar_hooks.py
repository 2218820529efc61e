"""The cp-agent sidecar's hook runners: merging changes, retries, never twice.

Hook runners are tested with a fake executor where only their logic is at stake
(retries, merging, never twice), and with real commands where the process is
(stdin and environment, timeouts, stops).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agents import Criticality, SheddingLevel, StateChange
from agents.sidecar import (
    HookResult,
    HookRunner,
    PinHookRunner,
    merge_changes,
    retry_delay,
)
from tests.helpers.agent_sidecar import (
    FAIL,
    OK,
    WAIT,
    change,
    pin_change,
    pinned,
    read_state,
    sidecar_for,
    static,
    wait_until,
)

# ---------------------------------------------------------------- merging


def test_merged_changes_go_from_the_first_old_to_the_last_new() -> None:
    merged = merge_changes(
        StateChange(revision=2, flags={"a": (None, "x"), "b": (True, False)}),
        StateChange(
            revision=4,
            flags={"a": ("x", "y"), "b": (False, True), "c": (1.0, 2.0)},
            shedding=(None, SheddingLevel(Criticality.SHEDDABLE, 30.0)),
        ),
    )
    assert merged.revision == 4
    assert merged.flags == {"a": (None, "y"), "c": (1.0, 2.0)}  # b was undone
    assert merged.shedding == (None, SheddingLevel(Criticality.SHEDDABLE, 30.0))
    assert merge_changes(
        StateChange(revision=2, flags={}, pin=(None, pinned("v1"))),
        StateChange(revision=3, flags={}, pin=(pinned("v1"), None)),
    ).empty
    # A kill switch turning into a number is a change, though True == 1.0.
    assert merge_changes(change(2, a=(1.0, False)), change(3, a=(False, True))).flags == {
        "a": (1.0, True)
    }


# ---------------------------------------------------------------- hook runners, faked


@dataclass
class FakeExecutor:
    """Records each run; answers from ``results`` (then OK); may hold the first run."""

    results: list[HookResult] = field(default_factory=list)
    hold_first: bool = False
    calls: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __call__(
        self, command: str, stdin: bytes, env: Mapping[str, str], timeout: float
    ) -> HookResult:
        self.calls.append((json.loads(stdin), {k: v for k, v in env.items() if k[:3] == "CP_"}))
        if self.hold_first and len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(WAIT)
        return self.results.pop(0) if self.results else OK

    @property
    def revisions(self) -> list[int]:
        return [payload["revision"] for payload, _ in self.calls]


@pytest.fixture
def runners() -> Iterator[list[HookRunner]]:
    made: list[HookRunner] = []
    yield made
    for runner in made:
        runner.stop(grace=1)


def runner_with(
    runners: list[HookRunner], fake: FakeExecutor, kind: type[HookRunner] = HookRunner, **kw: Any
) -> HookRunner:
    runner = kind(
        "the hook", service="checkout", backoff=0.001, execute=fake, rand=lambda: 0.0, **kw
    )
    runner.start()
    runners.append(runner)
    return runner


def test_a_failing_hook_is_retried_with_backoff_until_it_succeeds(
    runners: list[HookRunner], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agents.sidecar")
    fake = FakeExecutor(results=[FAIL, FAIL])
    runner = runner_with(runners, fake)
    runner.submit(change(7, mode=("full", "read-only")))
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [7, 7, 7]
    assert runner.status()["last"] == {"revision": 7, "result": "ok", "attempts": 3}
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hook_failed")]
    assert len(failed) == 2
    assert "attempt=1/5" in failed[0] and "retry_in=" in failed[0] and "boom" in failed[0]


def test_a_hook_failing_every_time_is_given_up_after_its_attempts(
    runners: list[HookRunner], caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeExecutor(results=[FAIL] * 3)
    runner = runner_with(runners, fake, attempts=3)
    runner.submit(change(7, mode=("full", "read-only")))
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [7, 7, 7]
    assert runner.status()["last"] == {"revision": 7, "result": "gave_up", "attempts": 3}
    given_up = [r for r in caplog.records if r.getMessage().startswith("hook_given_up")]
    assert len(given_up) == 1 and given_up[0].levelno == logging.ERROR
    # The next change runs it again.
    runner.submit(change(8, mode=("read-only", "full")))
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [7, 7, 7, 8]


def test_the_retry_delay_doubles_per_attempt_up_to_a_cap_with_jitter() -> None:
    assert [retry_delay(n, 1.0, 0.0) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 15, 15]
    assert [retry_delay(n, 1.0, 1.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_changes_arriving_while_the_hook_runs_are_merged_into_its_next_run(
    runners: list[HookRunner],
) -> None:
    fake = FakeExecutor(hold_first=True)
    runner = runner_with(runners, fake)
    runner.submit(change(2, mode=("full", "degraded")))
    assert fake.started.wait(WAIT)
    runner.submit(change(3, mode=("degraded", "read-only")))
    runner.submit(change(4, **{"new-ui": (None, False)}))
    assert runner.status()["pending"] == 4
    fake.release.set()
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [2, 4]
    payload, env = fake.calls[1]
    assert payload["flags"] == {
        "mode": {"old": "degraded", "new": "read-only"},
        "new-ui": {"old": None, "new": False},
    }
    assert env["CP_CHANGED_FLAGS"] == "mode,new-ui"
    assert env["CP_REVISION"] == "4"


def test_a_change_undone_before_the_hook_got_to_it_is_not_run(
    runners: list[HookRunner],
) -> None:
    fake = FakeExecutor(hold_first=True)
    runner = runner_with(runners, fake)
    runner.submit(change(2, mode=("full", "degraded")))
    assert fake.started.wait(WAIT)
    runner.submit(change(3, **{"new-ui": (True, False)}))
    runner.submit(change(4, **{"new-ui": (False, True)}))
    fake.release.set()
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [2]


def test_a_retry_hands_over_the_changes_that_arrived_meanwhile(
    runners: list[HookRunner],
) -> None:
    fake = FakeExecutor(results=[FAIL], hold_first=True)
    runner = runner_with(runners, fake)
    runner.submit(change(2, mode=("full", "degraded")))
    assert fake.started.wait(WAIT)
    runner.submit(change(3, mode=("degraded", "read-only")))
    fake.release.set()
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [2, 3]
    assert fake.calls[1][0]["flags"] == {"mode": {"old": "full", "new": "read-only"}}
    assert runner.status()["last"] == {"revision": 3, "result": "ok", "attempts": 1}


def test_the_first_change_after_a_restart_is_not_run_again_but_an_expiry_is(
    runners: list[HookRunner],
) -> None:
    fake = FakeExecutor()
    previous = {"revision": 5, "result": "ok", "attempts": 1}
    runner = runner_with(runners, fake, last=previous)
    runner.submit(change(5, mode=(None, "degraded")))  # the cache, handed over before
    assert runner.wait_idle(WAIT)
    assert fake.calls == []
    runner.submit(change(5, mode=("degraded", "full")))  # a time-boxed value expired
    runner_idle_then = runner.wait_idle(WAIT)
    runner.submit(change(6, mode=("full", "off")))
    assert runner_idle_then and runner.wait_idle(WAIT)
    assert fake.revisions == [5, 6]
    assert [env["CP_EXPIRED"] for _, env in fake.calls] == ["1", "0"]
    assert [payload["expired"] for payload, _ in fake.calls] == [True, False]


def test_the_pin_hook_runs_when_the_pinned_version_changes_only(
    runners: list[HookRunner],
) -> None:
    fake = FakeExecutor()
    runner = runner_with(runners, fake, kind=PinHookRunner, running_version="v1.5.0")
    v1, v2 = pinned("v1.4.2"), pinned("v1.4.1", "rollback")
    for submitted in (
        pin_change(3, None, v1),
        change(4, mode=("full", "lite")),  # no pin change
        pin_change(5, v1, pinned("v1.4.2", "still good")),  # a new reason only
        pin_change(6, v1, v2),
        pin_change(7, v2, None),  # unpinned
    ):
        runner.submit(submitted)
        assert runner.wait_idle(WAIT)
    assert fake.revisions == [3, 6, 7]
    envs = [env for _, env in fake.calls]
    assert [e["CP_PIN_VERSION"] for e in envs] == ["v1.4.2", "v1.4.1", ""]
    assert [e["CP_PREVIOUS_PIN_VERSION"] for e in envs] == ["", "v1.4.2", "v1.4.1"]
    assert envs[1]["CP_PIN_REASON"] == "rollback"
    assert {e["CP_RUNNING_VERSION"] for e in envs} == {"v1.5.0"}
    payload = fake.calls[1][0]
    assert payload["pin"]["version"] == "v1.4.1"
    assert payload["previous"]["version"] == "v1.4.2"
    assert payload["running_version"] == "v1.5.0"
    assert runner.status()["last"] == {
        "revision": 7,
        "result": "ok",
        "attempts": 1,
        "version": None,
    }


def test_the_pin_hook_compares_with_what_it_handed_over_before_a_restart(
    runners: list[HookRunner],
) -> None:
    fake = FakeExecutor()
    previous = {"revision": 6, "result": "ok", "attempts": 1, "version": "v1.4.2"}
    runner = runner_with(runners, fake, kind=PinHookRunner, last=previous)
    # Booted without a cache: the server's state is a pin from nothing.
    runner.submit(pin_change(9, None, pinned("v1.4.2")))
    assert runner.wait_idle(WAIT)
    assert fake.calls == []
    runner.submit(pin_change(10, pinned("v1.4.2"), pinned("v1.4.3")))
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [10]


def test_a_pin_and_its_undo_while_the_hook_runs_redeploy_nothing(
    runners: list[HookRunner],
) -> None:
    fake = FakeExecutor(hold_first=True)
    runner = runner_with(runners, fake, kind=PinHookRunner)
    runner.submit(pin_change(2, None, pinned("v1")))
    assert fake.started.wait(WAIT)
    runner.submit(pin_change(3, pinned("v1"), pinned("v2")))
    runner.submit(pin_change(4, pinned("v2"), pinned("v1", "back")))
    fake.release.set()
    assert runner.wait_idle(WAIT)
    assert fake.revisions == [2]


# ---------------------------------------------------------------- hook runners, real commands


def recorder_command(out: Path) -> str:
    """A hook that appends its stdin and CP_* environment to ``out`` as one JSON line."""
    code = (
        "import json, os, sys; "
        "rec = {'stdin': json.load(sys.stdin), "
        "'env': {k: v for k, v in os.environ.items() if k.startswith('CP_')}}; "
        "open(sys.argv[1], 'a').write(json.dumps(rec) + '\\n')"
    )
    return shlex.join([sys.executable, "-c", code, str(out)])


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_hook_gets_the_change_on_stdin_and_in_its_environment(
    tmp_path: Path, runners: list[HookRunner]
) -> None:
    out = tmp_path / "hook.jsonl"
    runner = HookRunner(recorder_command(out), service="checkout", env={"CP_STATE_FILE": "/s"})
    runner.start()
    runners.append(runner)
    runner.submit(
        StateChange(
            revision=12,
            flags={"new-ui": (True, False), "limit": (None, 5.0)},
            shedding=(None, SheddingLevel(Criticality.SHEDDABLE, 30.0)),
            pin=(None, pinned("v1.4.2")),
        ),
        "STALE",
    )
    assert runner.wait_idle(WAIT)
    [record] = lines(out)
    assert record["stdin"]["revision"] == 12
    assert record["stdin"]["state"] == "STALE"
    assert record["stdin"]["flags"] == {
        "new-ui": {"old": True, "new": False},
        "limit": {"old": None, "new": 5.0},
    }
    assert record["stdin"]["shedding"]["new"] == {"tier": "SHEDDABLE", "percent": 30.0}
    assert record["stdin"]["pin"]["new"]["version"] == "v1.4.2"
    assert record["env"] == {
        "CP_SERVICE": "checkout",
        "CP_REVISION": "12",
        "CP_STATE": "STALE",
        "CP_EXPIRED": "0",
        "CP_CHANGED_FLAGS": "limit,new-ui",
        "CP_SHEDDING_CHANGED": "1",
        "CP_SHED_TIER": "SHEDDABLE",
        "CP_SHED_PERCENT": "30",
        "CP_PIN_CHANGED": "1",
        "CP_PIN_VERSION": "v1.4.2",
        "CP_STATE_FILE": "/s",
    }


def pid_written(path: Path) -> int:
    wait_until(lambda: path.exists() and path.read_text().strip() != "", what="the hook's pid")
    return int(path.read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def sleeper(pid_file: Path) -> str:
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    return "exec " + shlex.join([sys.executable, "-c", code, str(pid_file)])


def test_a_hook_over_its_timeout_is_killed_and_counts_as_failed(
    tmp_path: Path, runners: list[HookRunner], caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "pid"
    # Long enough for the hook's interpreter to start (and write its pid) when loaded.
    runner = HookRunner(sleeper(pid_file), service="checkout", timeout=2.0, attempts=1)
    runner.start()
    runners.append(runner)
    runner.submit(change(3, a=(None, True)))
    pid = pid_written(pid_file)
    assert runner.wait_idle(WAIT)
    assert gone(pid)
    assert runner.status()["last"]["result"] == "gave_up"
    assert any("timed out after 2s" in r.getMessage() for r in caplog.records)


def test_stopping_lets_a_running_hook_finish_for_a_grace_then_kills_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "pid"
    runner = HookRunner(sleeper(pid_file), service="checkout")
    runner.start()
    runner.submit(change(3, a=(None, True)))
    pid = pid_written(pid_file)
    runner.submit(change(4, a=(True, False)))  # queued: dropped by the stop
    started = time.monotonic()
    runner.stop(grace=0.3)
    assert time.monotonic() - started < WAIT
    assert gone(pid)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("hook_dropped hook=on_change revision=4") for m in messages)
    assert any(m.startswith("hook_killed") for m in messages)
    assert runner.runs == 1


def test_the_sidecar_runs_its_hooks_once_per_change_and_records_them(tmp_path: Path) -> None:
    out, pins, state = tmp_path / "changes.jsonl", tmp_path / "pins.jsonl", tmp_path / "s.json"
    agent = static()
    sidecar = sidecar_for(
        agent,
        state_file=state,
        on_change=recorder_command(out),
        on_pin_change=recorder_command(pins),
        version="v1.5.0",
    )
    with sidecar:
        steps: list[Callable[[], None]] = [
            lambda: agent.set_flag("new-ui", False),
            lambda: agent.set_shedding("SHEDDABLE", 10),
            lambda: agent.pin("v1.4.1", "rollback"),
        ]
        for step in steps:
            step()
            assert all(hook.wait_idle(WAIT) for hook in sidecar.hooks)
    assert [r["stdin"]["revision"] for r in lines(out)] == [2, 3, 4]
    assert [r["env"]["CP_PIN_VERSION"] for r in lines(pins)] == ["v1.4.1"]
    hooks = (read_state(state) or {})["hooks"]
    assert hooks["on_change"]["last"] == {"revision": 4, "result": "ok", "attempts": 1}
    assert hooks["on_pin_change"]["last"]["version"] == "v1.4.1"
