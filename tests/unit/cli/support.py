"""What the cpctl unit tests share: a real in-process server and the responses they use.

The servers are real ``grpc.server`` instances on port 0 serving a hand-written
MitigationService (our own API), so what the CLI sends and how it reacts to each status code
go over the wire; nothing is patched.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.v1 import mitigation_pb2, mitigation_pb2_grpc, types_pb2
from controlplane.cli import cli

NOW = datetime(2026, 11, 26, 17, 30, tzinfo=UTC)


# The CLI must not pick up the settings of whoever runs the tests.
CLEAN_ENV: Mapping[str, str | None] = {
    "CPCTL_SERVER": None,
    "CPCTL_ACTOR": None,
    "CPCTL_JSON": None,
    "CPCTL_TIMEOUT": None,
    "CPCTL_TLS": None,
    "CPCTL_TLS_CA": None,
    "CPCTL_TLS_CERT": None,
    "CPCTL_TLS_KEY": None,
    "CPCTL_TLS_SERVER_NAME": None,
    "CPCTL_INSECURE": None,
    "CPCTL_TOKEN": None,
    "CPCTL_TOKEN_FILE": None,
}


def ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def run(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None) -> Result:
    environment = {**CLEAN_ENV, **(env or {})}
    return CliRunner().invoke(cli, list(args), input=stdin, env=environment, prog_name="cpctl")


def flag_message(value: types_pb2.FlagValue, **meta: Any) -> types_pb2.Flag:
    return types_pb2.Flag(scope="checkout", name="new-ui", value=value, meta=types_pb2.Meta(**meta))


def set_flag_response(
    *,
    changed: bool = True,
    dry_run: bool = False,
    would_change: bool = False,
    expiring: bool = False,
) -> mitigation_pb2.SetFlagResponse:
    previous = flag_message(
        types_pb2.FlagValue(bool_value=True),
        actor="deploy-bot",
        actor_authenticated=True,
        reason="launch",
        set_at=ts(NOW - timedelta(days=14)),
        mod_revision=700,
    )
    flag = flag_message(
        types_pb2.FlagValue(bool_value=False),
        actor="sre-1",
        reason="errors after deploy",
        incident="INC-42",
        set_at=ts(NOW),
        mod_revision=812,
    )
    if expiring:
        flag.meta.expires_at.CopyFrom(ts(NOW + timedelta(minutes=30)))
        flag.replaced.CopyFrom(previous)
    return mitigation_pb2.SetFlagResponse(
        result=types_pb2.WriteResult(
            changed=changed,
            dry_run=dry_run,
            revision=812 if changed else 0,
            mod_revision=812,
            overridden_by=["billing", "search"],
            audit_id="audit-1",
            summary="flag new-ui = false (was true)",
            would_change=would_change,
        ),
        flag=flag,
        previous=previous,
    )


class FakeMitigation(mitigation_pb2_grpc.MitigationServiceServicer):
    """MitigationService with GetFlag and SetFlag over a dict, WaitApplied answering
    ``waits[service]`` (every instance applied, by default), WatchChanges sending
    ``watched`` after its live response, then ending, and GetBundle over ``bundles``;
    everything else UNIMPLEMENTED.

    ``fail[method]`` makes that method answer with a status instead; a method in ``hang``
    signals ``entered`` and then blocks until ``release`` is set (or 10 seconds pass).
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.set_requests: list[mitigation_pb2.SetFlagRequest] = []
        self.flags: dict[tuple[str, str], types_pb2.Flag] = {}
        self.revision = 812
        self.fail: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.hang: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.waits: dict[str, mitigation_pb2.WaitAppliedResponse] = {}
        self.wait_requests: list[mitigation_pb2.WaitAppliedRequest] = []
        self.watched: list[types_pb2.AuditEntry] = []
        self.bundles: dict[str, mitigation_pb2.Bundle] = {}
        self.metadata: list[tuple[str, dict[str, str]]] = []
        """Each call's method and metadata, in order."""

    def GetBundle(
        self, request: mitigation_pb2.GetBundleRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.GetBundleResponse:
        self._misbehave("GetBundle", context)
        if request.bundle_id not in self.bundles:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no bundle {request.bundle_id}")
        return mitigation_pb2.GetBundleResponse(bundle=self.bundles[request.bundle_id])

    def WaitApplied(
        self, request: mitigation_pb2.WaitAppliedRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.WaitAppliedResponse:
        self._misbehave("WaitApplied", context)
        self.wait_requests.append(request)
        default = mitigation_pb2.WaitAppliedResponse(all_applied=True, connected=3, applied=3)
        return self.waits.get(request.service, default)

    def WatchChanges(
        self, request: mitigation_pb2.WatchChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[mitigation_pb2.WatchChangesResponse]:
        self._misbehave("WatchChanges", context)
        yield mitigation_pb2.WatchChangesResponse(revision=self.revision)
        for entry in self.watched:
            yield mitigation_pb2.WatchChangesResponse(revision=entry.revision, changes=[entry])

    def _misbehave(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append(method)
        sent = {str(key): str(value) for key, value in context.invocation_metadata()}
        self.metadata.append((method, sent))
        if method in self.hang:
            self.entered.set()
            self.release.wait(10)
        if method in self.fail:
            context.abort(*self.fail[method])

    def GetFlag(
        self, request: mitigation_pb2.GetFlagRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.GetFlagResponse:
        self._misbehave("GetFlag", context)
        flag = self.flags.get((request.scope, request.name))
        if flag is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"flag {request.scope}/{request.name}: none")
        return mitigation_pb2.GetFlagResponse(flag=flag)

    def SetFlag(
        self, request: mitigation_pb2.SetFlagRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.SetFlagResponse:
        self._misbehave("SetFlag", context)
        self.set_requests.append(request)
        key = (request.scope, request.name)
        previous = self.flags.get(key)
        current = previous.meta.mod_revision if previous is not None else 0
        options = request.options
        if options.HasField("expected_mod_revision") and options.expected_mod_revision != current:
            context.abort(
                grpc.StatusCode.ABORTED,
                f"expected mod revision {options.expected_mod_revision}, current {current}",
            )
        changed = previous is None or previous.value != request.value
        flag = types_pb2.Flag(
            scope=request.scope,
            name=request.name,
            value=request.value,
            meta=types_pb2.Meta(actor=options.actor, reason=options.reason, mod_revision=current),
        )
        result = types_pb2.WriteResult(
            dry_run=options.dry_run, would_change=options.dry_run and changed, mod_revision=current
        )
        if changed and not options.dry_run:
            self.revision += 1
            flag.meta.mod_revision = result.revision = result.mod_revision = self.revision
            result.changed = True
            self.flags[key] = flag
        return mitigation_pb2.SetFlagResponse(result=result, flag=flag, previous=previous)


@dataclass
class Server:
    address: str
    servicer: FakeMitigation
    grpc_server: grpc.Server


def closed_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def instance_message(instance_id: str, **fields: Any) -> types_pb2.Instance:
    return types_pb2.Instance(service="checkout", instance_id=instance_id, **fields)
