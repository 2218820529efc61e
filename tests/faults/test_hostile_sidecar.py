"""Attacks on the cp-agent sidecar from the host: each test is the attack.

Whoever writes a hook (or a script it calls) should not learn the sidecar's token, nor
read it in the sidecar's log when the hook fails; a web page in the host's browser
should not read the sidecar's endpoint through a name of its own (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from tests.helpers.server_process import ServerProcess
from tests.integration.test_sidecar import SidecarProcess, http_get

TOKEN = "sidecar-secret-token-0123456789"


@pytest.fixture
def server(etcd: EmbeddedEtcd, prefix: str) -> Iterator[ServerProcess]:
    process = ServerProcess(etcd.endpoint, prefix)
    yield process
    process.stop()


@pytest.mark.parametrize("given", ["CONTROLPLANE_TOKEN", "CONTROLPLANE_TOKEN_FILE"])
async def test_a_hook_never_sees_nor_leaks_the_sidecars_token(
    server: ServerProcess, tmp_path: Path, given: str
) -> None:
    seen = tmp_path / "env.json"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    # The hook records its environment, then prints the token (as a script that found it
    # would) and fails.
    code = (
        "import json, os, sys; "
        "json.dump(dict(os.environ), open(sys.argv[1], 'w')); "
        f"print('token:', os.environ.get('CONTROLPLANE_TOKEN'), {TOKEN!r}); sys.exit(1)"
    )
    hook = shlex.join([sys.executable, "-c", code, str(seen)])
    car = await SidecarProcess.start(
        server.address,
        "--on-change",
        hook,
        "--hook-attempts",
        "1",
        env={
            given: TOKEN if given == "CONTROLPLANE_TOKEN" else str(token_file),
            "CONTROLPLANE_INSTANCE_ID": "web-1",
            "KEEP_ME": "yes",
        },
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            mitigation_pb2_grpc.MitigationServiceStub(channel).SetFlag(
                m.SetFlagRequest(
                    scope="checkout",
                    name="new-ui",
                    value=t.FlagValue(bool_value=False),
                    options=t.WriteOptions(reason="a change for the hook"),
                ),
                timeout=10,
            )
        given_up = await car.wait_log("hook_given_up")
    finally:
        await car.stop()
    env = json.loads(seen.read_text())
    assert not [k for k in env if k.startswith(("CONTROLPLANE_", "CPCTL_"))]
    assert env["KEEP_ME"] == "yes"  # the rest of the environment is the hook's
    assert env["CP_SERVICE"] == "checkout"
    assert TOKEN not in given_up and TOKEN not in car.output
    assert "token: None <redacted>" in given_up


def _get(address: str, host: str) -> tuple[int, dict[str, object]]:
    return http_get(f"http://{address}/v1/state", {"Host": host})


async def test_a_page_in_the_hosts_browser_cannot_read_the_endpoint_by_another_name(
    server: ServerProcess,
) -> None:
    car = await SidecarProcess.start(server.address)
    try:
        port = car.address.rpartition(":")[2]
        # The attack: evil.example resolves to 127.0.0.1 now; the browser sends its name.
        status, body = await asyncio.to_thread(_get, car.address, f"evil.example:{port}")
        assert status == 421
        assert body["error"] == "misdirected"
        assert "Host 'evil.example:" in str(body["message"])
        for name in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            status, _ = await asyncio.to_thread(_get, car.address, name)
            assert status in (200, 503), name  # answered (503 until READY)
    finally:
        await car.stop()


async def test_a_sidecar_listening_off_loopback_says_anyone_can_read_it(
    server: ServerProcess,
) -> None:
    car = await SidecarProcess.start(server.address, "--listen", "0.0.0.0:0")
    try:
        warned = await car.wait_log("sidecar_not_loopback")
        assert "the endpoint has no authentication" in warned
    finally:
        await car.stop()
