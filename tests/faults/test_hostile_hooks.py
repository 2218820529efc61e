"""A sidecar's hooks must not hand its secrets on: the attack is a hook that prints them.

Whoever writes a hook (or a script it calls) should not learn the sidecar's token, nor
read it in the sidecar's log when the hook fails.
"""

from __future__ import annotations

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
from tests.integration.test_sidecar import SidecarProcess

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
