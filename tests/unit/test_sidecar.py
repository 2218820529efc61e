"""The cp-agent sidecar over a StaticAgent: the HTTP answers and the state file."""

from __future__ import annotations

import http.client as http_client
import json
import logging
import stat
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import agents.sidecar._state_file
from agents._atomic import write_atomic
from agents._override import parse_override
from agents.sidecar import (
    Sidecar,
    SidecarOptions,
)
from tests.helpers.agent_sidecar import (
    WAIT,
    SwitchableAgent,
    body,
    read_state,
    sidecar_for,
    static,
    wait_until,
)
from tests.helpers.threads import HAS_PROC, wakes_while_idle

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

        # The agent state comes to the writer through its own callback.
        agent.set_state("STALE")
        wait_until(lambda: (read_state(path) or {}).get("state") == "STALE", what="STALE")
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]  # no temp files
    assert (read_state(path) or {})["state"] == "STALE"


def test_a_state_file_that_cannot_be_written_is_logged_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = blocker / "state.json"
    attempts: list[Path] = []

    def counted(target: Path, data: bytes, mode: int) -> None:
        attempts.append(target)
        write_atomic(target, data, mode=mode)

    monkeypatch.setattr(agents.sidecar._state_file, "write_atomic", counted)
    caplog.set_level(logging.INFO, logger="agents.sidecar")
    with sidecar_for(static(), state_file=path):
        # Retried with nothing changing (0.1 s, then 0.2 s ...).
        wait_until(lambda: len(attempts) >= 3, what="three attempts")
        failures = [r for r in caplog.records if "state_file_write_failed" in r.getMessage()]
        assert len(failures) == 1  # once per kind of failure, not once per try
        # Removing the file is the whole fix: the writer makes the missing
        # folder itself on its next try.
        blocker.unlink()
        wait_until(lambda: read_state(path) is not None, what="written once it can be")
        assert (read_state(path) or {})["revision"] == 1
    assert any("state_file_written" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc")
def test_an_idle_sidecar_wakes_for_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    agent = static()
    with sidecar_for(agent, state_file=path, on_change="true") as sidecar:
        assert sidecar._writer is not None
        threads = [sidecar._http_thread, sidecar._writer._thread]
        threads += [hook._thread for hook in sidecar.hooks]
        wait_until(lambda: read_state(path) is not None, what="first write")
        assert wakes_while_idle(threads) == [0] * len(threads)
        # Asleep, not stuck: a request and a change are served at once.
        status, _, data = http(f"http://{sidecar.address}/v1/flags/new-ui")
        assert (status, json.loads(data)["value"]) == (200, True)
        agent.set_flag("new-ui", False)
        wait_until(lambda: (read_state(path) or {}).get("revision") == 2, what="revision 2")


def test_stop_is_prompt_and_lets_the_address_go() -> None:
    sidecar = sidecar_for(static())
    sidecar.start()
    host, port = sidecar.address.rsplit(":", 1)
    # A client keeping its connection open does not hold the stop.
    kept = http_client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        kept.request("GET", "/healthz")
        assert kept.getresponse().read()
        started = time.monotonic()
        sidecar.stop()
        # Held by the connection, it would wait for the client's timeout (WAIT).
        assert time.monotonic() - started < 2.0
    finally:
        kept.close()
    with pytest.raises(urllib.error.URLError):
        http(f"http://{sidecar.address}/healthz")
    sidecar.stop()  # idempotent


def test_state_and_health_say_when_a_break_glass_override_is_active() -> None:
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
