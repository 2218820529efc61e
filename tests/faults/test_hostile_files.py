"""Files that grant power, changed by another local user: each test is the attack.

The attacker is ``nobody`` on the host: they can write a file someone left writable, or
put one of their own (or a symlink) where a file is expected. Changing a file's owner
needs root, as CI runs: elsewhere these tests are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from agents import AsyncAgent, Criticality
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server.auth import hash_token
from tests.helpers.agent_log import AgentLog
from tests.helpers.server_process import ServerProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks change owners: root only")

NOBODY = 65534
OPERATOR = "operator-token-0123456789"
INTRUDER = "intruder-token-0123456789"


def _evil_override() -> str:
    return json.dumps(
        {
            "reason": "nothing to see",
            "actor": "nobody",
            "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "flags": {"new-ui": True},
            "shedding": {"tier": "CRITICAL_PLUS", "percent": 100},
            "pin": "v0.0.1-evil",
        }
    )


@pytest.fixture
def server(etcd: EmbeddedEtcd, prefix: str) -> Iterator[ServerProcess]:
    process = ServerProcess(etcd.endpoint, prefix)
    yield process
    process.stop()


@pytest.mark.parametrize("how", ["writable by others", "nobody's in a sticky directory", "a link"])
async def test_an_override_file_someone_else_can_change_is_never_applied(
    server: ServerProcess, tmp_path: Path, agent_log: AgentLog, how: str
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    path = cache / "checkout.override.json"
    agent = AsyncAgent("checkout", [server.address], override_path=path)
    await agent.start()
    try:
        assert await agent.wait_ready(10)
        if how == "writable by others":
            path.write_text("{}")
            path.chmod(0o666)
            path.write_text(_evil_override())  # as nobody: the file lets them
            expected = f"it is writable by others (owner root, mode 0666): chmod 600 {path}"
        elif how == "nobody's in a sticky directory":
            cache.chmod(0o1777)
            path.write_text(_evil_override())
            os.chown(path, NOBODY, NOBODY)
            expected = "it is owned by nobody, not by root"
        else:
            theirs = tmp_path / "elsewhere.json"
            theirs.write_text(_evil_override())
            os.chown(theirs, NOBODY, NOBODY)
            path.symlink_to(theirs)
            expected = "it is a symbolic link"
        record = await agent_log.wait("agent_override_rejected", str(path), within=10)
        assert record.levelno == logging.ERROR
        assert expected in record.getMessage()
        assert agent.override_active is False
        assert agent.enabled("new-ui") is False
        assert agent.should_shed(Criticality.CRITICAL_PLUS) is False
        assert agent.pinned_version is None
    finally:
        await agent.close()


def _auth_document(*entries: tuple[str, str, str]) -> str:
    return json.dumps(
        {
            "identities": [
                {"name": name, "role": role, "token_sha256": hash_token(token)}
                for name, role, token in entries
            ]
        }
    )


def _call(address: str, token: str, *, admin: bool) -> grpc.StatusCode:
    """An operator's write (a flag), or an admin's (a known-good mark), with ``token``."""
    options = t.WriteOptions(reason="attack")
    with grpc.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        call, request = (
            (stub.MarkKnownGood, m.MarkKnownGoodRequest(service="checkout", version="v9"))
            if admin
            else (
                stub.SetFlag,
                m.SetFlagRequest(scope="checkout", name="x", value=t.FlagValue(bool_value=True)),
            )
        )
        request.options.CopyFrom(options)
        try:
            call(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def test_an_auth_file_others_can_write_is_neither_loaded_nor_reloaded(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(_auth_document(("oncall", "operator", OPERATOR)))
    auth.chmod(0o600)
    server = ServerProcess(etcd.endpoint, prefix, extra_args=["--auth-file", str(auth)])
    try:
        assert _call(server.address, OPERATOR, admin=False) is grpc.StatusCode.OK
        # The attack: the file was left writable; nobody adds an admin and waits for a reload.
        auth.chmod(0o666)
        auth.write_text(
            _auth_document(("oncall", "operator", OPERATOR), ("intruder", "admin", INTRUDER))
        )
        start = len(server.output)
        os.kill(server.proc.pid, signal.SIGHUP)
        failed = server.wait_output("auth_reload_failed", start=start)
        assert "is writable by others (owner root, mode 0666)" in failed.string
        assert f"chmod 600 {auth}" in failed.string
        assert _call(server.address, INTRUDER, admin=True) is grpc.StatusCode.UNAUTHENTICATED
        assert _call(server.address, OPERATOR, admin=False) is grpc.StatusCode.OK  # the old file
    finally:
        server.stop()
    # Nor does a server start on it.
    with pytest.raises(AssertionError, match="writable by others"):
        ServerProcess(etcd.endpoint, prefix, extra_args=["--auth-file", str(auth)])


async def test_an_explicit_choice_reads_an_unsafe_override_file_with_a_warning(
    server: ServerProcess, tmp_path: Path, agent_log: AgentLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host where the override file must live in a group-writable volume: the operator
    # says so, and every read says it again.
    monkeypatch.setenv("CONTROLPLANE_OVERRIDE_INSECURE_PERMISSIONS", "1")
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o775)
    path = cache / "checkout.override.json"
    agent = AsyncAgent("checkout", [server.address], override_path=path)
    await agent.start()
    try:
        assert await agent.wait_ready(10)
        path.write_text(_evil_override())
        path.chmod(0o664)
        record = await agent_log.wait("agent_override_insecure", str(path), within=10)
        assert record.levelno == logging.WARNING
        assert "is writable by its group" in record.getMessage()
        await agent_log.wait("agent_override_applied", str(path), within=10)
        assert agent.override_active is True
        assert agent.pinned_version is not None and agent.pinned_version.version == "v0.0.1-evil"
    finally:
        await agent.close()
