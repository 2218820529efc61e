"""A careless (or hostile) operator's text: each test is the attempt, asserting the refusal.

A reason goes to the audit trail and to every terminal that reads it: it must show
what it says. The metrics endpoint has no authentication: off loopback, the server
says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server.auth import hash_token
from tests.helpers.raw_etcd import RawEtcd
from tests.helpers.server_process import ServerProcess

CPCTL = Path(sys.executable).parent / "cpctl"


@pytest.fixture
def server(etcd: EmbeddedEtcd, prefix: str) -> Iterator[ServerProcess]:
    process = ServerProcess(etcd.endpoint, prefix)
    yield process
    process.stop()


@pytest.mark.parametrize(
    ("reason", "refusal"),
    [
        ("\u200b", "shows nothing (only spaces or invisible characters)"),
        ("\u2060\ufeff", "shows nothing (only spaces or invisible characters)"),
        ("rollback \u202eesaeler", "bidirectional control characters (found U+202E)"),
        ("db \x1b[2Jdown", "control characters (found U+001B)"),
        ("db \x9b2Jdown", "control characters (found U+009B)"),
    ],
)
async def test_a_reason_that_hides_or_reorders_text_is_refused_and_nothing_written(
    server: ServerProcess, raw_etcd: RawEtcd, prefix: str, reason: str, refusal: str
) -> None:
    before = await raw_etcd.revision()
    with grpc.insecure_channel(server.address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.SetFlag(
                m.SetFlagRequest(
                    scope="checkout",
                    name="new-ui",
                    value=t.FlagValue(bool_value=False),
                    options=t.WriteOptions(reason=reason),
                ),
                timeout=10,
            )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal in str(info.value.details())
    assert await raw_etcd.revision() == before
    assert await raw_etcd.get_prefix(prefix) == {}


def test_metrics_off_loopback_start_with_a_warning(etcd: EmbeddedEtcd, prefix: str) -> None:
    process = ServerProcess(etcd.endpoint, prefix, extra_args=["--metrics", "0.0.0.0:0"])
    try:
        warned = process.wait_output("metrics_not_loopback")
        assert "no authentication" in warned.string
    finally:
        process.stop()


def test_a_token_file_others_can_read_works_with_a_warning(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    token = "oncall-token-0123456789"
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps(
            {
                "identities": [
                    {"name": "oncall", "role": "viewer", "token_sha256": hash_token(token)}
                ]
            }
        )
    )
    auth.chmod(0o600)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o644)  # anyone on the host can read it, and act as oncall
    server = ServerProcess(etcd.endpoint, prefix, extra_args=["--auth-file", str(auth)])
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
        result = subprocess.run(
            [str(CPCTL), "--server", server.address, "--token-file", str(token_file), "flag",
             "list"],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert (
        f"the token file {token_file} is readable by others (mode 0644): chmod 600 {token_file}"
        in result.stderr
    )
    token_file.chmod(0o600)
