"""The cp-agent sidecar over a StaticAgent: the HTTP answers, the state file, the hook runners.

Hook runners are tested with a fake executor where only their logic is at stake
(retries, merging, never twice), and with real commands where the process is
(stdin and environment, timeouts, stops).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agents import Criticality, PinnedVersion, SheddingLevel, StateChange
from agents.sidecar import (
    HookResult,
    HookRunner,
    PinHookRunner,
    Sidecar,
    SidecarOptions,
    main,
    merge_changes,
    retry_delay,
)
from agents.testing import StaticAgent

WAIT = 5.0
OK = HookResult(True, "exit status 0")
FAIL = HookResult(False, "exit status 1", "boom")


class SwitchableAgent(StaticAgent):
    """A StaticAgent whose state (READY, STALE, CONNECTING) the test sets."""

    def __init__(self, *args: Any, state: str = "READY", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current = state

    @property
    def state(self) -> str:
        return self.current


def static(**kwargs: Any) -> SwitchableAgent:
    return SwitchableAgent(
        {"new-ui": True, "mode": "read-only", "limit": 3},
        service="checkout",
        shedding=("SHEDDABLE_PLUS", 100),
        pinned_version="v1.4.2",
        **kwargs,
    )


def sidecar_for(agent: StaticAgent, **options: Any) -> Sidecar:
    return Sidecar(SidecarOptions(service="checkout", listen="127.0.0.1:0", **options), agent=agent)


def body(sidecar: Sidecar, target: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    response = sidecar.handle(method, target)
    # What goes on the wire is JSON.
    return response.status, json.loads(response.encode())


def change(revision: int, **flags: tuple[Any, Any]) -> StateChange:
    return StateChange(revision=revision, flags=flags)


def pinned(version: str, reason: str = "known good") -> PinnedVersion:
    return PinnedVersion(version=version, reason=reason, since=None)


def pin_change(revision: int, old: PinnedVersion | None, new: PinnedVersion | None) -> StateChange:
    return StateChange(revision=revision, flags={}, pin=(old, new))


def wait_until(check: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``check`` (a file another thread writes) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(0.005)


# ---------------------------------------------------------------- HTTP answers


def test_the_state_document_holds_the_whole_effective_state() -> None:
    sidecar = sidecar_for(static(), version="v1.5.0")
    status, doc = body(sidecar, "/v1/state")
    assert status == 200
    assert doc["service"] == "checkout"
    assert (doc["state"], doc["revision"]) == ("READY", 1)
    assert doc["flags"] == {"new-ui": True, "mode": "read-only", "limit": 3.0}
    assert doc["flag_scopes"] == {"new-ui": "checkout", "mode": "checkout", "limit": "checkout"}
    assert doc["shedding"]["tier"] == "SHEDDABLE_PLUS"
    assert doc["shedding"]["percent"] == 100.0
    assert doc["pin"]["version"] == "v1.4.2"
    assert doc["running_version"] == "v1.5.0"
    assert doc["hooks"] == {}


def test_a_flag_is_served_with_its_record_and_a_missing_one_is_a_json_404() -> None:
    agent = static()
    sidecar = sidecar_for(agent)
    status, doc = body(sidecar, "/v1/flags/mode")
    assert status == 200
    assert (doc["name"], doc["value"], doc["type"], doc["scope"]) == (
        "mode",
        "read-only",
        "string",
        "checkout",
    )
    assert doc["reason"] == "set by a test"
    assert doc["revision"] == 1
    assert body(sidecar, "/v1/flags/limit")[1]["type"] == "number"

    status, doc = body(sidecar, "/v1/flags/new-checkout")
    assert status == 404
    assert doc["error"] == "flag_not_found"
    assert doc["name"] == "new-checkout"
    assert doc["state"] == "READY"

    agent.set_flag("new-checkout", False)
    status, doc = body(sidecar, "/v1/flags/new-checkout")
    assert (status, doc["value"], doc["type"], doc["revision"]) == (200, False, "bool", 2)
    # Names are URL-decoded.
    assert body(sidecar, "/v1/flags/new%2Dcheckout")[1]["value"] is False


def test_shed_decisions_follow_the_level_and_a_key_gives_a_stable_one() -> None:
    agent = static()  # SHEDDABLE_PLUS at 100 %
    sidecar = sidecar_for(agent)
    assert body(sidecar, "/v1/shed?criticality=SHEDDABLE")[1]["shed"] is True
    assert body(sidecar, "/v1/shed?criticality=sheddable-plus")[1]["shed"] is True
    _, doc = body(sidecar, "/v1/shed?criticality=CRITICAL")
    assert (doc["shed"], doc["criticality"]) == (False, "CRITICAL")
    # Missing or unknown: CRITICAL, the default of a request.
    assert body(sidecar, "/v1/shed")[1]["criticality"] == "CRITICAL"
    assert body(sidecar, "/v1/shed?criticality=urgent")[1] | {"shedding": None} == {
        "shed": False,
        "criticality": "CRITICAL",
        "key": None,
        "shedding": None,
        "state": "READY",
        "revision": 1,
    }

    agent.set_shedding("SHEDDABLE", 50)
    decisions = {
        key: body(sidecar, f"/v1/shed?criticality=SHEDDABLE&key={key}")[1]["shed"]
        for key in (f"user-{i}" for i in range(200))
    }
    assert decisions == {key: agent.should_shed("SHEDDABLE", key=key) for key in decisions}
    assert 0 < sum(decisions.values()) < 200
    again = body(sidecar, "/v1/shed?criticality=SHEDDABLE&key=user-7")[1]
    assert again["shed"] is decisions["user-7"]
    assert again["key"] == "user-7"


def test_the_pin_is_served_with_the_drift_from_the_running_version() -> None:
    agent = static()
    _, doc = body(sidecar_for(agent, version="v1.5.0"), "/v1/pin")
    assert doc["pin"]["version"] == "v1.4.2"
    assert (doc["running_version"], doc["drift"]) == ("v1.5.0", True)
    assert body(sidecar_for(agent, version="v1.4.2"), "/v1/pin")[1]["drift"] is False
    agent.unpin()
    _, doc = body(sidecar_for(agent, version="v1.5.0"), "/v1/pin")
    assert (doc["pin"], doc["drift"]) == (None, None)


@pytest.mark.parametrize(
    ("state", "status", "serving"),
    [("READY", 200, True), ("STALE", 503, True), ("CONNECTING", 503, False)],
)
def test_health_is_200_only_when_ready_and_says_whether_state_is_served(
    state: str, status: int, serving: bool
) -> None:
    got, doc = body(sidecar_for(static(state=state)), "/healthz")
    assert (got, doc["state"], doc["serving"]) == (status, state, serving)
    if state == "STALE":
        assert "serving the last known state (revision 1)" in doc["message"]


def test_unknown_paths_are_404_and_other_methods_405() -> None:
    sidecar = sidecar_for(static())
    status, doc = body(sidecar, "/v2/everything")
    assert (status, doc["error"]) == (404, "not_found")
    assert "/v1/state" in doc["endpoints"]
    response = sidecar.handle("POST", "/v1/flags/new-ui")
    assert response.status == 405
    assert ("Allow", "GET, HEAD") in response.headers


def _client() -> urllib.request.OpenerDirector:
    # No proxy from the environment for loopback requests.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    data = b"x" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 (loopback http)
    try:
        with _client().open(request, timeout=WAIT) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_endpoint_answers_over_http_and_follows_changes() -> None:
    agent = static()
    with sidecar_for(agent) as sidecar:
        base = f"http://{sidecar.address}"
        status, headers, data = http(f"{base}/v1/flags/new-ui")
        assert (status, json.loads(data)["value"]) == (200, True)
        assert headers["Content-Type"] == "application/json"
        agent.set_flag("new-ui", False)
        assert json.loads(http(f"{base}/v1/flags/new-ui")[2])["value"] is False
        status, headers, data = http(f"{base}/v1/flags/new-ui", "POST")
        assert (status, headers["Allow"], json.loads(data)["error"]) == (
            405,
            "GET, HEAD",
            "method_not_allowed",
        )
        status, headers, data = http(f"{base}/healthz", "HEAD")
        assert (status, data) == (200, b"")
        assert int(headers["Content-Length"]) > 0
    # Stopped: nothing listens any more.
    with pytest.raises(urllib.error.URLError):
        http(f"{base}/healthz")


class BrokenAgent(SwitchableAgent):
    @property
    def state(self) -> str:
        raise RuntimeError("broken")


def test_a_failure_to_answer_is_a_json_500_and_the_endpoint_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with sidecar_for(BrokenAgent()) as sidecar:
        for _ in range(2):
            status, _, data = http(f"http://{sidecar.address}/healthz")
            assert (status, json.loads(data)["error"]) == (500, "internal")
    assert any(r.getMessage().startswith("http_error") for r in caplog.records)


def test_an_address_in_use_fails_start() -> None:
    with sidecar_for(static()) as first:
        second = Sidecar(SidecarOptions(service="checkout", listen=first.address), agent=static())
        with pytest.raises(OSError, match="in use"):
            second.start()
        second.stop()


# ---------------------------------------------------------------- the state file


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return doc


def test_the_state_file_is_rewritten_atomically_on_every_change(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.json"
    agent = static()
    with sidecar_for(agent, state_file=path):
        wait_until(lambda: read_state(path) is not None, what="first write")
        first = read_state(path)
        assert first is not None and first["revision"] == 1
        assert first["flags"]["new-ui"] is True
        assert stat.S_IMODE(path.stat().st_mode) == 0o644

        agent.set_flag("new-ui", False)
        wait_until(lambda: (read_state(path) or {}).get("revision") == 2, what="revision 2")
        assert (read_state(path) or {})["flags"]["new-ui"] is False

        # No change callback reports the agent state: the writer notices it too.
        agent.current = "STALE"
        wait_until(lambda: (read_state(path) or {}).get("state") == "STALE", what="STALE")
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]  # no temp files
    assert (read_state(path) or {})["state"] == "STALE"


def test_a_state_file_that_cannot_be_written_is_logged_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = blocker / "state.json"
    caplog.set_level(logging.ERROR, logger="agents.sidecar")
    with sidecar_for(static(), state_file=path):
        wait_until(
            lambda: any("state_file_write_failed" in r.getMessage() for r in caplog.records),
            what="the failure logged",
        )
    failures = [r for r in caplog.records if "state_file_write_failed" in r.getMessage()]
    assert len(failures) == 1  # once per kind of failure, not once per try


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
    runner = HookRunner(sleeper(pid_file), service="checkout", timeout=0.5, attempts=1)
    runner.start()
    runners.append(runner)
    runner.submit(change(3, a=(None, True)))
    pid = pid_written(pid_file)
    assert runner.wait_idle(WAIT)
    assert gone(pid)
    assert runner.status()["last"]["result"] == "gave_up"
    assert any("timed out after 0.5s" in r.getMessage() for r in caplog.records)


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


# ---------------------------------------------------------------- the command line


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    code = exited.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def test_the_command_line_rejects_bad_settings_with_status_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CONTROLPLANE_SERVICE", "CONTROLPLANE_SERVERS", "CP_AGENT_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    code, err = run_main(["--servers", "127.0.0.1:1"], capsys)
    assert code == 2 and "--service" in err
    code, err = run_main(["--service", "Check_Out", "--servers", "127.0.0.1:1"], capsys)
    assert code == 2 and "DNS label" in err
    code, err = run_main(["--service", "checkout", "--servers", "nohostport"], capsys)
    assert code == 2 and "host:port" in err
    # The environment counts as the option.
    monkeypatch.setenv("CONTROLPLANE_SERVICE", "checkout")
    monkeypatch.setenv("CONTROLPLANE_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("CP_AGENT_LISTEN", "no-port")
    code, err = run_main([], capsys)
    assert code == 2 and "no-port" in err


def test_the_help_names_every_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for name in (
        "CONTROLPLANE_SERVICE",
        "CONTROLPLANE_SERVERS",
        "CONTROLPLANE_VERSION",
        "CONTROLPLANE_CACHE_PATH",
        "CP_AGENT_LISTEN",
        "CP_AGENT_STATE_FILE",
        "CP_AGENT_ON_CHANGE",
        "CP_AGENT_ON_PIN_CHANGE",
    ):
        assert name in text


def test_state_and_health_say_when_a_break_glass_override_is_active() -> None:
    from datetime import UTC, datetime, timedelta

    from agents._override import parse_override

    class OverriddenAgent(SwitchableAgent):
        _file_override: Any = None

        @property
        def override_active(self) -> bool:
            return True

        @property
        def override(self) -> Any:
            return self._file_override

    agent = OverriddenAgent({"new-ui": True}, service="checkout")
    until = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = json.dumps(
        {"reason": "control plane down", "actor": "sre", "expires_at": until,
         "flags": {"new-ui": False}}
    )  # fmt: skip
    agent._file_override = parse_override(text.encode(), now=datetime.now(UTC))
    sidecar = sidecar_for(agent)
    status, doc = body(sidecar, "/v1/state")
    assert status == 200
    assert doc["override"]["reason"] == "control plane down"
    assert doc["override"]["content"] == {"flags": {"new-ui": False}}
    status, health = body(sidecar, "/healthz")
    assert health["override_active"] is True
    _, plain = body(sidecar_for(static()), "/v1/state")
    assert plain["override"] is None


# ---------------------------------------------------------------- connection security

SECURITY_VARIABLES = (
    "CONTROLPLANE_TOKEN",
    "CONTROLPLANE_TOKEN_FILE",
    "CONTROLPLANE_TLS",
    "CONTROLPLANE_TLS_CA",
    "CONTROLPLANE_TLS_CLIENT_CERT",
    "CONTROLPLANE_TLS_CLIENT_KEY",
    "CONTROLPLANE_TLS_SERVER_NAME",
    "CONTROLPLANE_INSECURE",
)


@pytest.fixture
def clean_security_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*SECURITY_VARIABLES, "CONTROLPLANE_SERVICE", "CONTROLPLANE_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_command_line_refuses_bad_connection_settings_with_status_2(
    capsys: pytest.CaptureFixture[str], clean_security_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.helpers.certs import TestCA

    pki = TestCA(tmp_path / "pki")
    client = pki.issue("client")
    base = ["--service", "checkout", "--listen", "127.0.0.1:0"]
    remote = [*base, "--servers", "10.0.0.5:50051"]
    local = [*base, "--servers", "127.0.0.1:1"]
    cases: list[tuple[list[str], str]] = [
        (remote, "server 10.0.0.5:50051 is not on loopback"),
        (remote, "--insecure/CONTROLPLANE_INSECURE"),
        (remote, "--tls-ca/CONTROLPLANE_TLS_CA"),
        ([*local, "--tls-cert", str(client.cert)],
         "--tls-cert/CONTROLPLANE_TLS_CLIENT_CERT (a client certificate) needs its "
         "--tls-key/CONTROLPLANE_TLS_CLIENT_KEY"),
        ([*local, "--tls-ca", str(tmp_path / "nope.pem")],
         f"cannot read --tls-ca/CONTROLPLANE_TLS_CA {tmp_path / 'nope.pem'}"),
        ([*remote, "--insecure", "--tls"],
         "--insecure/CONTROLPLANE_INSECURE (plaintext) contradicts --tls/CONTROLPLANE_TLS"),
        ([*local, "--token-file", str(tmp_path / "none")],
         "cannot read --token-file/CONTROLPLANE_TOKEN_FILE"),
        ([*local, "--tls-server-name", "cp.internal"], "applies to TLS only"),
    ]  # fmt: skip
    for argv, message in cases:
        code, err = run_main(argv, capsys)
        assert code == 2 and message in err, (argv, err)
    # The environment counts as the option; a token from the environment is checked too.
    clean_security_env.setenv("CONTROLPLANE_TOKEN", "has a space")
    code, err = run_main(local, capsys)
    assert code == 2 and "CONTROLPLANE_TOKEN must be visible ASCII" in err
    assert "has a space" not in err
    clean_security_env.delenv("CONTROLPLANE_TOKEN")
    clean_security_env.setenv("CONTROLPLANE_TLS_CLIENT_KEY", str(client.key))
    code, err = run_main(local, capsys)
    assert code == 2 and "needs its certificate: --tls-cert" in err


def test_the_connection_settings_reach_the_agent(
    clean_security_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.helpers.certs import TestCA

    pki = TestCA(tmp_path / "pki")
    client = pki.issue("client")
    token_file = tmp_path / "token"
    token_file.write_text("sidecar-token-0123456789\n")
    options = SidecarOptions(
        service="checkout",
        servers=("cp.internal:443",),
        listen="127.0.0.1:0",
        token_file=token_file,
        tls_ca=pki.cert,
        tls_cert=client.cert,
        tls_key=client.key,
        tls_server_name="cp.example",
    )
    sidecar = Sidecar(options)
    security = sidecar.agent._client.config.security  # type: ignore[attr-defined]
    assert (security.token_file, security.ca, security.cert, security.key) == (
        token_file,
        pki.cert,
        client.cert,
        client.key,
    )
    assert security.server_name == "cp.example"
    assert security.metadata() == (("authorization", "Bearer sidecar-token-0123456789"),)
    sidecar.agent.close()  # never started: nothing to stop
    # The token itself, given programmatically, is not in the options' repr.
    secret = SidecarOptions(service="checkout", token="sidecar-secret-42")
    assert "sidecar-secret-42" not in repr(secret)


def test_the_help_names_the_connection_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in (*SECURITY_VARIABLES[1:], "--token-file", "--tls-ca", "--insecure"):
        assert name in text, name
    joined = " ".join(text.split())
    assert "Or put the token in CONTROLPLANE_TOKEN; there is no --token option" in joined
