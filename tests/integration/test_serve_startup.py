"""`controlplane serve` starting and stopping as an on-call engineer meets it.

A port in use stops the start in one line naming the port, what holds it and the
option that moves it, whichever port it is and whether the check or the bind found
it. Ctrl-C with agents connected stops at once: their streams end with UNAVAILABLE
and they reconnect elsewhere, while unary calls in flight get the grace period.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from tests.helpers.agent_process import ROOT, AgentProcess
from tests.helpers.server_process import ServerProcess

GRACE = 5.0
"""The grace period `serve` gives calls in flight when it stops."""
PROMPT = 2.5
"""A stop with only streams open ends well within this (the grace period is 5 s)."""


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def serve_command(tmp_path: Path, **options: str) -> list[str]:
    """`controlplane serve` with every port picked free, but those in ``options``
    (``listen="127.0.0.1:1234"`` gives ``--listen 127.0.0.1:1234``)."""
    given = {
        "listen": "127.0.0.1:0",
        "embedded_etcd_port": "0",
        "metrics": "127.0.0.1:0",
        "data_dir": str(tmp_path / "data"),
        **options,
    }
    args = [sys.executable, "-m", "controlplane.server", "serve"]
    for name, value in given.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """A port of this process's: a socket listening on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def held_after_a_free_port() -> Iterator[socket.socket]:
    """A socket listening on port P+1 where P is free: P+1 is the embedded etcd's peer
    port for --embedded-etcd-port P."""
    for _ in range(50):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        if free(port_of(sock) - 1):
            with sock:
                sock.listen()
                yield sock
            return
        sock.close()
    pytest.fail("no free port below a free port in 50 tries")


# (what the line calls the port, the options that put it on the held port, the advice)
CASES: dict[str, tuple[str, Callable[[int], dict[str, str]], str]] = {
    "etcd-client": (
        "embedded etcd",
        lambda port: {"embedded_etcd_port": str(port)},
        "pick another port with --embedded-etcd-port PORT",
    ),
    "etcd-peer": (
        "embedded etcd's peer port, --embedded-etcd-port + 1",
        lambda port: {"embedded_etcd_port": str(port - 1)},
        "pick another port with --embedded-etcd-port PORT (etcd takes PORT and PORT+1",
    ),
    "grpc": (
        "gRPC",
        lambda port: {"listen": f"127.0.0.1:{port}"},
        "pick another port with --listen HOST:PORT",
    ),
    "http": (
        "HTTP",
        lambda port: {"http": f"127.0.0.1:{port}"},
        "pick another port with --http HOST:PORT, or leave --http out",
    ),
    "metrics": (
        "metrics",
        lambda port: {"metrics": f"127.0.0.1:{port}"},
        "pick another port with --metrics HOST:PORT, or --metrics off",
    ),
}


@pytest.mark.parametrize("workers", ["1", "2"], ids=["single", "workers"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_port_in_use_stops_the_start_in_one_line_naming_it_its_holder_and_option(
    case: str, workers: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    role, options, advice = CASES[case]
    holder: socket.socket = request.getfixturevalue(
        "held_after_a_free_port" if case == "etcd-peer" else "held"
    )
    port = port_of(holder)
    result = subprocess.run(
        serve_command(tmp_path, workers=workers, **options(port)),
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"Error: 127.0.0.1:{port} ({role}) is in use by pid {os.getpid()} (")
    assert f"): stop it or {advice}" in line
    # Found before anything started: no etcd ran, no data directory was made.
    assert not (tmp_path / "data" / "etcd").exists()


def test_several_ports_in_use_are_said_at_once_one_line_each(
    tmp_path: Path, held: socket.socket
) -> None:
    """A second `make run` finds every port taken: the engineer learns it in one go."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        grpc_at, metrics_at = port_of(held), port_of(other)
        command = serve_command(
            tmp_path, listen=f"127.0.0.1:{grpc_at}", metrics=f"127.0.0.1:{metrics_at}"
        )
        result = subprocess.run(
            command,
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert [line.split(" is in use")[0] for line in lines] == [
        f"Error: 127.0.0.1:{grpc_at} (gRPC)",
        f"Error: 127.0.0.1:{metrics_at} (metrics)",
    ], result.stderr


@pytest.mark.etcd_fault
def test_a_grpc_port_taken_after_the_check_fails_the_same_way_without_grpc_noise(
    fresh_etcd: EmbeddedEtcd, prefix: str
) -> None:
    """The race: the port was free when checked and taken before gRPC bound it.

    The server checks its ports, serves metrics, then talks to etcd before it binds
    gRPC: with etcd paused it waits there, and the port is taken meanwhile.
    """
    grpc_at = free_port()
    fresh_etcd.pause()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.server", "serve", "--listen", f"127.0.0.1:{grpc_at}",
         "--etcd", fresh_etcd.endpoint, "--prefix", prefix, "--metrics", "127.0.0.1:0",
         "--etcd-timeout", "30s"],
        cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if '"event": "metrics_listening"' in line:
                break
        else:
            pytest.fail("the server ended before serving metrics:\n" + "".join(seen))
        with socket.socket() as taker:
            taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taker.bind(("127.0.0.1", grpc_at))
            taker.listen()
            fresh_etcd.resume()
            rest = proc.stderr.read()
            code = proc.wait(timeout=30)
    finally:
        fresh_etcd.resume()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen) + rest
    assert code == 1, output
    assert "Traceback" not in output
    assert "add_port" not in output and "Failed to add port" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: 127.0.0.1:{grpc_at} (gRPC) is in use by pid {os.getpid()} ("
        f"{_command(os.getpid())}): stop it or pick another port with --listen HOST:PORT"
    ], output
    # It went past the check: the bind itself found the port taken.
    assert '"event": "etcd_version"' in output


def _command(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


# -- stopping ---------------------------------------------------------------------------


class Serve:
    """`controlplane serve` with its embedded etcd, as `make run` starts it."""

    def __init__(self, tmp_path: Path) -> None:
        self.proc = subprocess.Popen(
            serve_command(tmp_path, log_format="json"),
            cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.output: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.output.append(line)
            match = re.search(r"listening on (127\.0\.0\.1:\d+) \(etcd (127\.0\.0\.1:\d+)", line)
            if match:
                self.address, self.etcd = match.groups()
                self.listening = line
                break
        else:
            raise AssertionError("serve did not start:\n" + "".join(self.output))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.output.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Serve]:
    serve = Serve(tmp_path)
    yield serve
    serve.close()


def accepts(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


def test_the_start_line_says_where_the_embedded_etcd_keeps_its_data_and_how_big(
    served: Serve, tmp_path: Path
) -> None:
    data = (tmp_path / "data" / "etcd").resolve()
    match = re.search(
        rf"embedded, data in {re.escape(str(data))}: (\d+) MiB now, at most ~2\.5 GiB; ",
        served.listening,
    )
    assert match, served.listening
    on_disk = sum(p.stat().st_blocks * 512 for p in data.rglob("*") if p.is_file())
    # Rounded up, as du -h; etcd may have written a little since.
    assert 0 <= -(-on_disk // 2**20) - int(match.group(1)) <= 1, (on_disk, served.listening)
    assert on_disk >= 64_000_000  # at least the write-ahead log segment etcd allocates


def test_ctrl_c_with_an_agent_connected_stops_well_before_the_grace_period(
    served: Serve, tmp_path: Path
) -> None:
    agent = AgentProcess("checkout", [served.address], ["new-ui"])
    try:
        agent.wait_for(lambda line: line.get("state") == "READY", what="READY")
        mark = agent.mark()
        started = time.monotonic()
        served.proc.send_signal(signal.SIGINT)
        code = served.proc.wait(timeout=GRACE + 10)
        took = time.monotonic() - started
        assert code == 0
        assert took < PROMPT, f"stopped in {took:.2f}s"
        # The agent serves what it had, and keeps trying to reconnect.
        stale = agent.wait_for(lambda line: line.get("state") == "STALE", start=mark)
        assert stale["revision"] > 0
        assert not accepts(served.etcd)  # the embedded etcd went with it
    finally:
        agent.close()
    assert "Traceback" not in "".join(served.output)
    ended = [line for line in served.output if '"event": "streams_ended"' in line]
    assert len(ended) == 1 and '"code": "UNAVAILABLE"' in ended[0], served.output
    said = "".join(agent.stderr)
    assert "UNAVAILABLE: the server is shutting down" in said, said
    assert " ERROR " not in said and "Traceback" not in said, said


def test_agents_move_to_another_server_at_once_when_theirs_stops(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    first = ServerProcess(etcd.endpoint, prefix)
    second = ServerProcess(etcd.endpoint, prefix)
    agent: AgentProcess | None = None
    try:
        agent = AgentProcess("checkout", [first.address, second.address], ["new-ui"])
        ready = agent.wait_for(lambda line: line.get("state") == "READY", what="READY")
        assert ready["server"] == first.address
        mark = agent.mark()
        started = time.monotonic()
        first.proc.send_signal(signal.SIGINT)
        moved = agent.wait_for(
            lambda line: line.get("state") == "READY" and line.get("server") == second.address,
            timeout=GRACE + 5,
            what="READY on the second server",
            start=mark,
        )
        took = time.monotonic() - started
        assert took < PROMPT, f"on the second server after {took:.2f}s"
        assert moved["revision"] >= ready["revision"]
        assert first.proc.wait(timeout=GRACE + 10) == 0
        agent.close()
        said = "".join(agent.stderr)
        # One warning for the lost stream, and no error.
        assert said.count("agent_disconnected") == 1, said
        assert " ERROR " not in said and "Traceback" not in said, said
    finally:
        if agent is not None:
            agent.close()
        first.stop()
        second.stop()


@pytest.mark.etcd_fault
def test_a_unary_call_in_flight_still_completes_while_streams_end_at_once(
    fresh_etcd: EmbeddedEtcd, prefix: str
) -> None:
    """A write waits for a paused etcd when Ctrl-C comes: the agent's stream ends at
    once, the write gets the grace period and completes when etcd answers again."""
    server = ServerProcess(fresh_etcd.endpoint, prefix, extra_args=["--etcd-timeout", "30s"])
    agent = AgentProcess("checkout", [server.address], ["new-ui"])
    try:
        agent.wait_for(lambda line: line.get("state") == "READY", what="READY")
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
            fresh_etcd.pause()
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            call = stub.SetFlag.future(
                m.SetFlagRequest(
                    scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False),
                    options=t.WriteOptions(reason="errors on /pay", incident="INC-42"),
                ),
                timeout=30,
            )  # fmt: skip
            # Calls on one connection reach the server in order: once a later one is
            # answered, the write is in its handler (waiting for etcd).
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            mark = agent.mark()
            server.proc.send_signal(signal.SIGINT)
            agent.wait_for(
                lambda line: line.get("state") == "STALE", timeout=PROMPT, start=mark,
                what="STALE: the stream ended at once",
            )  # fmt: skip
            assert server.proc.poll() is None, "the server did not wait for the write"
            assert not call.done()
            fresh_etcd.resume()
            response = call.result(timeout=GRACE)
        assert response.result.changed
        assert server.proc.wait(timeout=GRACE + 10) == 0
    finally:
        fresh_etcd.resume()
        agent.close()
        server.stop()
    rpcs = [line for line in server.output if '"method": "Sync"' in line]
    assert rpcs and '"code": "UNAVAILABLE"' in rpcs[-1], server.output
