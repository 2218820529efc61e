"""The cp-agent sidecar as a process of its own against a real control server.

The server runs on the test's loop (the ``server`` fixture): the sidecar runs as
an asyncio subprocess and blocking HTTP calls go through ``asyncio.to_thread``.
The sidecar's endpoint, state file and hook output files belong to another
process: they are polled with timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from tests.helpers.agent_process import ROOT
from tests.integration.conftest import server_config

Stub = mitigation_pb2_grpc.MitigationServiceStub
Body = dict[str, Any]
WAIT = 15.0


def options() -> t.WriteOptions:
    return t.WriteOptions(reason="sidecar test", actor="oncall")


async def set_flag(stub: Stub, name: str, value: bool | str) -> int:
    flag = (
        t.FlagValue(bool_value=value)
        if isinstance(value, bool)
        else t.FlagValue(string_value=value)
    )
    response = await stub.SetFlag(
        m.SetFlagRequest(scope="checkout", name=name, value=flag, options=options())
    )
    assert response.result.changed
    revision: int = response.result.revision
    return revision


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Body]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        # Always http://127.0.0.1:<port>/... of a sidecar the test started.
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
        with opener.open(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def recorder_command(out: Path) -> str:
    """A hook that appends its stdin and CP_* environment to ``out`` as one JSON line."""
    code = (
        "import json, os, sys; "
        "rec = {'stdin': json.load(sys.stdin), "
        "'env': {k: v for k, v in os.environ.items() if k.startswith('CP_')}}; "
        "open(sys.argv[1], 'a').write(json.dumps(rec) + '\\n')"
    )
    return shlex.join([sys.executable, "-c", code, str(out)])


def records(path: Path) -> list[Body]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_json(path: Path) -> Body | None:
    try:
        doc: Body = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return doc


async def poll(check: Callable[[], Any], what: str, within: float = WAIT) -> Any:
    """Poll ``check`` (a file another process writes) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


class SidecarProcess:
    """``python -m agents.sidecar`` for service ``checkout``; its log lines collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[str] = []
        self._logged = asyncio.Event()
        self.address = ""
        self._listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, server: str, *args: str, env: dict[str, str] | None = None
    ) -> SidecarProcess:
        """Start one; ``env``: variables of its own (the test's CONTROLPLANE_* are not)."""
        given = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTROLPLANE_", "CP_"))}
        env.update(given, PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "agents.sidecar", "--service", "checkout"),
            *("--servers", server, "--listen", "127.0.0.1:0", *args),
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        car = cls(proc)
        try:
            car.address = await asyncio.wait_for(asyncio.shield(car._listening), 30)
        except (TimeoutError, EOFError):
            await car.kill()
            raise AssertionError("the sidecar did not start:\n" + car.output) from None
        return car

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.log.append(line)
            self._logged.set()
            match = re.search(r"sidecar_listening address=(\S+)", line)
            if match and not self._listening.done():
                self._listening.set_result(match.group(1))
        if not self._listening.done():
            self._listening.set_exception(EOFError())

    @property
    def output(self) -> str:
        return "".join(self.log[-60:])

    async def wait_log(self, pattern: str, within: float = WAIT) -> str:
        """The first log line matching ``pattern``, as it arrives."""
        seen = 0
        try:
            async with asyncio.timeout(within):
                while True:
                    self._logged.clear()
                    for line in self.log[seen:]:
                        if re.search(pattern, line):
                            return line
                    seen = len(self.log)
                    await self._logged.wait()
        except TimeoutError:
            raise AssertionError(f"no log line matching {pattern!r}:\n{self.output}") from None

    async def get(self, path: str) -> tuple[int, Body]:
        return await asyncio.to_thread(http_get, f"http://{self.address}{path}")

    async def wait_http(
        self, path: str, check: Callable[[int, Body], bool], within: float = WAIT
    ) -> Body:
        """Poll ``GET path`` until ``check(status, body)``; the body."""
        deadline = time.monotonic() + within
        while True:
            status, body = await self.get(path)
            if check(status, body):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"GET {path}: last {status} {body} after {within}s\n{self.output}"
                )
            await asyncio.sleep(0.01)

    async def stop(self) -> int:
        """SIGTERM; the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        with contextlib.suppress(Exception):
            await self._reader


class Sidecars:
    def __init__(self) -> None:
        self.started: list[SidecarProcess] = []

    async def start(self, server: str, *args: str) -> SidecarProcess:
        car = await SidecarProcess.start(server, *args)
        self.started.append(car)
        return car


@pytest.fixture
async def sidecars() -> AsyncIterator[Sidecars]:
    made = Sidecars()
    yield made
    for car in made.started:
        await car.kill()


def revisions(path: Path) -> list[int]:
    return [r["stdin"]["revision"] for r in records(path)]


async def test_a_set_flag_reaches_the_endpoint_within_a_second_then_the_file_and_the_hook(
    server: ControlServer, stub: Stub, sidecars: Sidecars, tmp_path: Path
) -> None:
    state_file, changes = tmp_path / "run" / "checkout.json", tmp_path / "changes.jsonl"
    car = await sidecars.start(
        server.address, "--state-file", str(state_file), "--on-change", recorder_command(changes)
    )
    await car.wait_http("/healthz", lambda status, _: status == 200)
    assert (await car.get("/v1/flags/new-ui"))[0] == 404

    started = time.monotonic()
    first = await set_flag(stub, "new-ui", False)
    doc = await car.wait_http(
        "/v1/flags/new-ui", lambda status, body: status == 200 and body["value"] is False
    )
    assert time.monotonic() - started < 1.0
    assert (doc["revision"], doc["scope"], doc["reason"]) == (first, "checkout", "sidecar test")

    state = await poll(
        lambda: (doc := read_json(state_file)) and doc["revision"] == first and doc,
        "the state file at the first revision",
    )
    assert (state["state"], state["flags"]) == ("READY", {"new-ui": False})
    await poll(lambda: first in revisions(changes), "the hook's run for the first flip")

    second = await set_flag(stub, "mode", "read-only")
    await poll(lambda: second in revisions(changes), "the hook's run for the second flip")
    await poll(
        lambda: (
            (read_json(state_file) or {}).get("flags") == {"new-ui": False, "mode": "read-only"}
        ),
        "the state file rewritten",
    )
    _, whole = await car.get("/v1/state")
    assert (whole["revision"], whole["state"]) == (second, "READY")
    assert whole["server"] == server.address

    assert await car.stop() == 0, car.output
    assert "sidecar_stopped" in car.output
    # Once per revision, in order, each with its own change.
    runs = records(changes)
    assert [r["stdin"]["revision"] for r in runs] == [first, second]
    assert runs[0]["stdin"]["flags"] == {"new-ui": {"old": None, "new": False}}
    assert runs[0]["env"]["CP_REVISION"] == str(first)
    assert runs[0]["env"]["CP_CHANGED_FLAGS"] == "new-ui"
    assert runs[0]["env"]["CP_STATE_FILE"] == str(state_file)
    assert runs[1]["stdin"]["flags"] == {"mode": {"old": None, "new": "read-only"}}
    last = read_json(state_file)
    assert last is not None
    assert last["state"] == "STALE"  # the agent is closed: the last state, kept
    assert last["hooks"]["on_change"]["last"] == {"revision": second, "result": "ok", "attempts": 1}
    assert sorted(p.name for p in state_file.parent.iterdir()) == ["checkout.json"]


async def test_the_pin_hook_runs_on_a_pin_and_a_restart_runs_no_hook_again(
    server: ControlServer, stub: Stub, sidecars: Sidecars, tmp_path: Path
) -> None:
    changes, pins = tmp_path / "changes.jsonl", tmp_path / "pins.jsonl"
    args = (
        *("--state-file", str(tmp_path / "state.json"), "--cache", str(tmp_path / "cache.json")),
        *("--version", "v1.5.0"),
        *("--on-change", recorder_command(changes), "--on-pin-change", recorder_command(pins)),
    )
    car = await sidecars.start(server.address, *args)
    await car.wait_http("/healthz", lambda status, _: status == 200)
    pinned = await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1.4.2", options=options())
    )
    pin_revision = pinned.result.revision
    [run] = await poll(lambda: records(pins), "the pin hook's run")
    assert run["env"]["CP_PIN_VERSION"] == "v1.4.2"
    assert run["env"]["CP_PREVIOUS_PIN_VERSION"] == ""
    assert run["env"]["CP_RUNNING_VERSION"] == "v1.5.0"
    assert run["env"]["CP_REVISION"] == str(pin_revision)
    assert run["stdin"]["pin"]["version"] == "v1.4.2"
    assert run["stdin"]["pin"]["reason"] == "sidecar test"
    await poll(lambda: pin_revision in revisions(changes), "the change hook's run for the pin")
    assert records(changes)[0]["env"]["CP_PIN_CHANGED"] == "1"
    _, pin = await car.get("/v1/pin")
    assert (pin["pin"]["version"], pin["running_version"], pin["drift"]) == (
        "v1.4.2",
        "v1.5.0",
        True,
    )
    assert await car.stop() == 0, car.output

    # Restarted: the cache brings the pinned state back, already handed over.
    again = await sidecars.start(server.address, *args)
    await again.wait_http("/healthz", lambda status, _: status == 200)
    flip = await set_flag(stub, "new-ui", False)
    await poll(lambda: flip in revisions(changes), "the change hook's run after the restart")
    assert await again.stop() == 0, again.output
    assert revisions(changes) == [pin_revision, flip]
    # The run after the restart is the flip alone, not the whole state anew.
    after = records(changes)[1]["stdin"]
    assert (after["flags"], after["pin"]) == ({"new-ui": {"old": None, "new": False}}, None)
    assert revisions(pins) == [pin_revision]  # no second redeploy
    assert "hook_skipped hook=on_change" in again.output


async def test_a_sidecar_that_loses_its_server_keeps_serving_and_says_stale(
    server: ControlServer, stub: Stub, sidecars: Sidecars, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.json"
    revision = await set_flag(stub, "mode", "read-only")
    car = await sidecars.start(server.address, "--state-file", str(state_file))
    await car.wait_http("/v1/flags/mode", lambda status, body: body.get("revision", 0) >= revision)
    await poll(
        lambda: (read_json(state_file) or {}).get("state") == "READY", "the state file says READY"
    )

    await server.stop(grace=0)
    # The agent state wakes the writer: the file follows at once, no look every so often.
    await poll(
        lambda: (read_json(state_file) or {}).get("state") == "STALE",
        "the state file says STALE",
        within=2.0,
    )
    health = await car.wait_http("/healthz", lambda status, body: body["state"] == "STALE")
    assert (await car.get("/healthz"))[0] == 503
    assert health["serving"] is True
    assert f"serving the last known state (revision {revision})" in health["message"]
    status, flag = await car.get("/v1/flags/mode")
    assert (status, flag["value"], flag["state"]) == (200, "read-only", "STALE")
    assert await car.stop() == 0, car.output


async def test_a_new_revision_that_changes_no_value_reaches_the_state_file(
    server: ControlServer, stub: Stub, sidecars: Sidecars, tmp_path: Path
) -> None:
    state_file, changes = tmp_path / "state.json", tmp_path / "changes.jsonl"
    car = await sidecars.start(
        server.address, "--state-file", str(state_file), "--on-change", recorder_command(changes)
    )

    async def time_boxed(hours: int) -> int:
        opts = options()
        opts.ttl.CopyFrom(duration_pb2.Duration(seconds=hours * 3600))
        response = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False), options=opts
            )
        )
        assert response.result.changed
        revision: int = response.result.revision
        return revision

    first = await time_boxed(1)
    await poll(lambda: first in revisions(changes), "the hook's run for the flag")
    await poll(
        lambda: (read_json(state_file) or {}).get("revision") == first, "the file at the flag"
    )
    _, before = await car.get("/v1/flags/new-ui")
    # Extended: the same value, a new revision, which no change callback hears of.
    extended = await time_boxed(2)
    doc = await poll(
        lambda: (d := read_json(state_file)) and d["revision"] == extended and d,
        "the file at the extension",
    )
    assert (doc["state"], doc["flags"]) == ("READY", {"new-ui": False})
    _, after = await car.get("/v1/flags/new-ui")
    assert (after["revision"], after["value"]) == (extended, False)
    assert after["expires_at"] > before["expires_at"]
    assert await car.stop() == 0, car.output
    assert revisions(changes) == [first]  # the hook is not run for it


async def test_a_sigterm_right_after_start_stops_the_sidecar_at_once(
    server: ControlServer,
) -> None:
    # The kernel may hand a process's SIGTERM to any of its threads: the main thread,
    # blocked reading its signal pipe, must wake all the same (it did not, 1 time in 8
    # on a loaded machine, until the pipe became the interpreter's wakeup fd).
    for _ in range(5):
        car = await SidecarProcess.start(server.address)
        assert car.proc.returncode is None
        car.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.shield(car.proc.wait()), 5)
        finally:
            await car.kill()
        assert code == 0, car.output


def metrics_of(address: str) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """``GET /metrics`` of a sidecar: its content type and every sample, by name and labels."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    # Always http://127.0.0.1:<port>/metrics of a sidecar the test started.
    with opener.open(f"http://{address}/metrics", timeout=5) as answer:
        content_type, text = answer.headers["Content-Type"], answer.read().decode()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return content_type, samples


async def test_metrics_say_the_agent_s_state_revision_changes_and_reconnects(
    server: ControlServer, stub: Stub, sidecars: Sidecars, etcd: EmbeddedEtcd, prefix: str
) -> None:
    other = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await other.start()
    try:
        car = await sidecars.start(f"{server.address},{other.address}")
        await car.wait_http("/healthz", lambda status, _: status == 200)
        started = time.time()
        revision = await set_flag(stub, "new-ui", False)
        await car.wait_http("/v1/flags/new-ui", lambda status, _: status == 200)

        content_type, samples = await asyncio.to_thread(metrics_of, car.address)
        assert content_type.startswith("text/plain; version=")
        service = ("service", "checkout")

        def value(name: str, **labels: str) -> float | None:
            return samples.get((name, frozenset({service, *labels.items()})))

        assert value("controlplane_agent_state", state="READY") == 1
        assert value("controlplane_agent_state", state="STALE") == 0
        assert value("controlplane_agent_state", state="CONNECTING") == 0
        assert value("controlplane_agent_applied_revision") == revision
        # The first snapshot, then the change.
        assert value("controlplane_agent_changes_applied_total") == 2
        assert value("controlplane_agent_reconnects_total") == 0
        changed_at = value("controlplane_agent_last_change_timestamp_seconds")
        assert changed_at is not None and started - 1 <= changed_at <= time.time() + 1

        # Its server goes: the agent moves to the other one, and counts it.
        _, state = await car.get("/v1/state")
        serving = server if state["server"] == server.address else other
        await serving.stop(grace=0)
        await car.wait_http(
            "/v1/state",
            lambda _, body: (
                body["state"] == "READY" and body["server"] not in (None, state["server"])
            ),
        )
        _, samples = await asyncio.to_thread(metrics_of, car.address)
        assert value("controlplane_agent_reconnects_total") == 1
        assert value("controlplane_agent_state", state="READY") == 1
        assert await car.stop() == 0, car.output
    finally:
        await other.stop(grace=0)
