"""`controlplane serve` as a process, as `make run` starts it: embedded etcd, signals, options."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import etcd_version, find_etcd_binary
from controlplane.store import DEFAULT_PREFIX
from tests.helpers.raw_etcd import prefix_range_end


def read_until(
    proc: subprocess.Popen[str],
    pattern: str,
    timeout: float = 60.0,
    seen: list[str] | None = None,
) -> re.Match[str]:
    """Read the process's stderr line by line until ``pattern`` matches (lines go to ``seen``)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = [] if seen is None else seen
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"process ended before {pattern!r}; output:\n{''.join(seen)}")
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no {pattern!r} within {timeout}s; output:\n{''.join(seen)}")


def port_open(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


@dataclass
class Serve:
    """A running `controlplane serve` process and what its start-up output told."""

    proc: subprocess.Popen[str]
    etcd_endpoint: str
    address: str
    prefix: str
    event_loop: str
    startup: list[str]  # the log lines up to "listening on"


def keys_under(endpoint: str, prefix: str) -> set[str]:
    """Read the keys under ``prefix`` straight from etcd, over a blocking channel."""
    raw = prefix.encode()
    with grpc.insecure_channel(endpoint) as channel:
        kv: Any = rpc.KVStub(channel)
        response = kv.Range(
            rpc.RangeRequest(key=raw, range_end=prefix_range_end(raw), keys_only=True), timeout=10
        )
    return {bytes(item.key).decode() for item in response.kvs}


class ServeLauncher:
    """Starts `controlplane serve` processes with an embedded etcd on free ports."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, env: dict[str, str] | None = None, name: str = "data") -> Serve:
        """Start one and read its start-up output; ``name`` is its data directory."""
        # The test's own CONTROLPLANE_* settings only: none leak in from the caller.
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
        child_env.update(env or {}, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane.server",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--embedded-etcd-port",
                "0",
                "--metrics",
                "127.0.0.1:0",
                "--data-dir",
                str(self._tmp_path / name),
                "--log-format",
                "json",
                *args,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=child_env,
        )
        self._procs.append(proc)
        startup: list[str] = []
        started = read_until(proc, r'"event": "embedded_etcd_started"', seen=startup)
        server_started = read_until(proc, r'"event": "server_started"', seen=startup)
        listening = read_until(
            proc, r"listening on (127\.0\.0\.1:\d+) .*; prefix (\S+);", seen=startup
        )
        return Serve(
            proc=proc,
            etcd_endpoint=json.loads(started.string)["endpoint"],
            address=listening.group(1),
            prefix=listening.group(2),
            event_loop=json.loads(server_started.string)["event_loop"],
            startup=startup,
        )

    def close(self) -> None:
        """Stop whatever still runs: SIGTERM first, so the server stops its etcd too."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeLauncher]:
    launcher = ServeLauncher(tmp_path)
    yield launcher
    launcher.close()


def wait_serving(channel: grpc.Channel, timeout: float = 10.0) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.SERVING


def set_flag(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        wait_serving(channel)
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        resp = stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout",
                name="new-ui",
                value=t.FlagValue(bool_value=False),
                options=t.WriteOptions(reason="errors on /pay", incident="INC-42"),
            ),
            timeout=10,
        )
        assert resp.result.changed


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_with_embedded_etcd_answers_and_stops_cleanly_on_signal(
    serve: ServeLauncher, tmp_path: Path, signum: signal.Signals
) -> None:
    server = serve.start()
    assert server.prefix == DEFAULT_PREFIX
    assert server.event_loop == "uvloop"
    set_flag(server.address)
    assert f"{DEFAULT_PREFIX}flags/checkout/new-ui" in keys_under(
        server.etcd_endpoint, DEFAULT_PREFIX
    )
    assert port_open(server.etcd_endpoint)
    # The etcd version is logged; the embedded etcd is for development: never a warning,
    # whatever its release.
    events = [json.loads(line) for line in server.startup if line.startswith("{")]
    versions = [(e["endpoint"], e["version"]) for e in events if e["event"] == "etcd_version"]
    expected = "{}.{}.{}".format(*etcd_version(find_etcd_binary()))
    assert versions == [(server.etcd_endpoint, expected)]
    assert not any(e["event"] == "etcd_version_unsafe" for e in events)

    server.proc.send_signal(signum)
    assert server.proc.wait(timeout=20) == 0
    # The embedded etcd went with it.
    assert not port_open(server.etcd_endpoint)
    assert (tmp_path / "data" / "etcd" / "member").is_dir()


def test_serve_keeps_asyncios_loop_when_told(serve: ServeLauncher) -> None:
    server = serve.start(env={"CONTROLPLANE_EVENT_LOOP": "asyncio"})
    assert server.event_loop == "asyncio"
    set_flag(server.address)


def test_serve_prefix_comes_from_argument_then_environment_then_default(
    serve: ServeLauncher,
) -> None:
    # The default is checked by the signal test above; here the environment, then both.
    from_env = serve.start(env={"CONTROLPLANE_PREFIX": "/from-env/"}, name="env")
    assert from_env.prefix == "/from-env/"
    set_flag(from_env.address)
    assert "/from-env/flags/checkout/new-ui" in keys_under(from_env.etcd_endpoint, "/from-env/")
    assert keys_under(from_env.etcd_endpoint, DEFAULT_PREFIX) == set()

    from_arg = serve.start(
        "--prefix", "/from-arg/", env={"CONTROLPLANE_PREFIX": "/from-env/"}, name="arg"
    )
    assert from_arg.prefix == "/from-arg/"
    set_flag(from_arg.address)
    assert "/from-arg/flags/checkout/new-ui" in keys_under(from_arg.etcd_endpoint, "/from-arg/")
    assert keys_under(from_arg.etcd_endpoint, "/from-env/") == set()
