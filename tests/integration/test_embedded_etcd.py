"""EmbeddedEtcd against the real etcd binary: start, health, stop, restart, faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.embedded_etcd import (
    EmbeddedEtcd,
    EmbeddedEtcdError,
    EtcdPortInUseError,
    EtcdStartError,
)
from tests.helpers.raw_etcd import RawEtcd, delete_prefix_blocking


def _health(server: EmbeddedEtcd, timeout: float = 5.0) -> dict[str, object]:
    url = f"{server.client_url}/health"
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        body: dict[str, object] = json.loads(response.read())
    return body


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_session_etcd_is_healthy(etcd: EmbeddedEtcd) -> None:
    assert etcd.running
    assert _health(etcd)["health"] == "true"
    assert etcd.healthy()
    assert etcd.endpoint == f"127.0.0.1:{etcd.client_port}"


async def test_prefix_fixture_isolates_keys(raw_etcd: RawEtcd, prefix: str) -> None:
    assert prefix.startswith("/cp-test/")
    assert prefix.endswith("/")
    assert await raw_etcd.get_prefix(prefix) == {}
    revision = await raw_etcd.put(f"{prefix}a", b"1")
    assert await raw_etcd.get(f"{prefix}a") == (b"1", revision)
    assert await raw_etcd.revision() >= revision


async def test_prefix_cleanup_deletes_only_under_the_prefix(
    etcd: EmbeddedEtcd, raw_etcd: RawEtcd, prefix: str
) -> None:
    await raw_etcd.put(f"{prefix}x/1", b"a")
    await raw_etcd.put(f"{prefix}x/2", b"b")
    await raw_etcd.put(f"{prefix}x0", b"neighbour")
    assert delete_prefix_blocking(etcd.endpoint, f"{prefix}x/") == 2
    assert await raw_etcd.get_prefix(prefix) == {f"{prefix}x0": b"neighbour"}


def test_stop_is_idempotent_and_ends_the_process(fresh_etcd: EmbeddedEtcd) -> None:
    pid = fresh_etcd.pid
    assert pid is not None
    assert _process_exists(pid)
    fresh_etcd.stop()
    assert not fresh_etcd.running
    assert fresh_etcd.pid is None
    assert not _process_exists(pid)
    assert not fresh_etcd.healthy(timeout=0.5)
    fresh_etcd.stop()
    assert not fresh_etcd.running


def test_start_twice_is_an_error(fresh_etcd: EmbeddedEtcd) -> None:
    with pytest.raises(EmbeddedEtcdError, match="restart"):
        fresh_etcd.start()
    assert fresh_etcd.healthy()


async def test_data_survives_restart(fresh_etcd: EmbeddedEtcd) -> None:
    port = fresh_etcd.client_port
    async with RawEtcd(fresh_etcd.endpoint) as raw:
        revision = await raw.put("/restart/key", b"kept")
    fresh_etcd.restart()
    assert fresh_etcd.client_port == port
    assert _health(fresh_etcd)["health"] == "true"
    async with RawEtcd(fresh_etcd.endpoint) as raw:
        assert await raw.get("/restart/key") == (b"kept", revision)
        assert await raw.revision() >= revision


async def test_data_survives_kill(fresh_etcd: EmbeddedEtcd) -> None:
    async with RawEtcd(fresh_etcd.endpoint) as raw:
        revision = await raw.put("/kill/key", b"synced")
    pid = fresh_etcd.pid
    assert pid is not None
    fresh_etcd.kill()
    assert not fresh_etcd.running
    assert not _process_exists(pid)
    fresh_etcd.restart()
    assert fresh_etcd.pid != pid
    async with RawEtcd(fresh_etcd.endpoint) as raw:
        assert await raw.get("/kill/key") == (b"synced", revision)


def test_pause_stops_answers_until_resume(fresh_etcd: EmbeddedEtcd) -> None:
    fresh_etcd.pause()
    assert fresh_etcd.running
    assert not fresh_etcd.healthy(timeout=0.5)
    fresh_etcd.resume()
    assert _health(fresh_etcd)["health"] == "true"


def test_stop_while_paused_ends_the_process(fresh_etcd: EmbeddedEtcd) -> None:
    pid = fresh_etcd.pid
    assert pid is not None
    fresh_etcd.pause()
    fresh_etcd.stop(timeout=10)
    assert not fresh_etcd.running
    assert not _process_exists(pid)


def test_context_manager_starts_and_stops(tmp_path: Path) -> None:
    with EmbeddedEtcd(tmp_path / "data") as server:
        pid = server.pid
        assert pid is not None
        assert _health(server)["health"] == "true"
    assert not server.running
    assert not _process_exists(pid)
    assert server.log_path.exists()
    assert not server.log_path.is_relative_to(server.data_dir)


@pytest.mark.parametrize("role", ["client", "peer"])
def test_fixed_port_in_use_fails_before_launching(tmp_path: Path, role: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedEtcd(tmp_path / "data", **{f"{role}_port": port})
        with pytest.raises(EtcdPortInUseError) as excinfo:
            server.start(timeout=30)
    assert excinfo.value.port == port
    message = str(excinfo.value)
    assert f"127.0.0.1:{port} ({role} port" in message
    assert "another process listens there" in message
    assert "Choose another port or stop it" in message
    assert not server.running
    # etcd was never launched, so it wrote no log.
    assert not server.log_path.exists()


async def test_second_etcd_on_the_same_client_port_fails_and_the_first_keeps_working(
    fresh_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    second = EmbeddedEtcd(tmp_path / "second", client_port=fresh_etcd.client_port)
    with pytest.raises(EtcdStartError) as excinfo:
        second.start(timeout=30)
    message = str(excinfo.value)
    assert f"127.0.0.1:{fresh_etcd.client_port} (client port" in message
    assert "an etcd already answers there" in message
    assert "Another etcd?" in message
    assert not second.running
    assert not (tmp_path / "second").exists()
    assert fresh_etcd.running
    async with RawEtcd(fresh_etcd.endpoint) as raw:
        revision = await raw.put("/shared-port/key", b"first")
        assert await raw.get("/shared-port/key") == (b"first", revision)


async def test_auto_ports_taken_before_start_are_picked_again(tmp_path: Path) -> None:
    server = EmbeddedEtcd(tmp_path / "data")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", server.client_port))
        taken.listen()
        picked = server.client_port
        try:
            server.start(timeout=30)
            assert server.client_port != picked
            async with RawEtcd(server.endpoint) as raw:
                revision = await raw.put("/auto-port/key", b"v")
                assert await raw.get("/auto-port/key") == (b"v", revision)
        finally:
            server.stop()


def test_etcd_exiting_during_start_up_fails_with_log_tail(tmp_path: Path) -> None:
    server = EmbeddedEtcd(tmp_path / "data", extra_args=["--no-such-flag"])
    with pytest.raises(EtcdStartError) as excinfo:
        server.start(timeout=30)
    assert not isinstance(excinfo.value, EtcdPortInUseError)
    assert "exited" in str(excinfo.value)
    assert "no-such-flag" in excinfo.value.log_tail
    assert "no-such-flag" in str(excinfo.value)
    assert not server.running


def test_start_timeout_stops_the_process(tmp_path: Path) -> None:
    server = EmbeddedEtcd(tmp_path / "data")
    with pytest.raises(EtcdStartError, match="not healthy within"):
        server.start(timeout=0.0)
    assert not server.running
    assert server.pid is None


def test_quota_and_extra_args_reach_etcd(tmp_path: Path) -> None:
    quota = 64 * 1024 * 1024
    with EmbeddedEtcd(
        tmp_path / "data",
        quota_backend_bytes=quota,
        extra_args=["--max-txn-ops", "7"],
    ) as server:
        assert server.pid is not None
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        with urllib.request.urlopen(f"{server.client_url}/metrics", timeout=5) as response:  # noqa: S310
            metrics = response.read().decode()
    # etcd reports the quota it enforces (3.4 and 3.5 alike).
    quota_samples = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "etcd_server_quota_backend_bytes"
    ]
    assert quota_samples == [quota]
    assert cmdline[cmdline.index(b"--max-txn-ops") + 1] == b"7"


def test_interpreter_exit_stops_running_instances(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from controlplane.embedded_etcd import EmbeddedEtcd
        server = EmbeddedEtcd({str(tmp_path / "data")!r})
        server.start()
        print(server.pid, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    pid = int(result.stdout.strip())
    survived = _process_exists(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    assert not survived
