"""`controlplane serve` as a process, as `make run` starts it: embedded etcd, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 60.0) -> re.Match[str]:
    """Read the process's stderr line by line until ``pattern`` matches."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
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


def test_serve_with_embedded_etcd_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
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
            str(tmp_path / "data"),
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        started = read_until(proc, r'"event": "embedded_etcd_started"')
        etcd_endpoint = json.loads(started.string)["endpoint"]
        listening = read_until(proc, r"listening on (127\.0\.0\.1:\d+)")
        address = listening.group(1)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while True:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
                    break
            assert status == health_pb2.HealthCheckResponse.SERVING
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
        assert port_open(etcd_endpoint)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        # The embedded etcd went with it.
        assert not port_open(etcd_endpoint)
        assert (tmp_path / "data" / "etcd" / "member").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
