"""Fuzz every RPC of a real server process: it never crashes or hangs, rejects cleanly, round-trips.

What is sent (hypothesis strategies):

- **generic**: any message of each method's request type, built from its descriptor
  (:func:`messages`), so an RPC added to ``MitigationService`` is fuzzed without a change
  here: unicode, control characters, empty and huge (to 100 KB) strings, integers over the
  whole int32/int64 range, unknown enum values, doubles with NaN/inf/-0.0, nested and
  repeated messages, oneofs, Durations and Timestamps with out-of-range seconds and nanos,
  and for the JSON fields (``FlagValue.json_value``, ``Override.content_json``) deep,
  invalid and odd JSON;
- **targeted**: a valid request (valid names, reasons, values, expiries; a small pool of
  names so that writes meet each other) with at most one field, at any depth, replaced by
  a generic value: accepted input is frequent enough to check the round trip;
- **wrong types**: bytes that are not a message of the request type, and a valid message
  of another request type;
- **AgentService.Sync**: a first message (a mostly-valid Hello, or anything) and a few
  follow-up messages on a raw stream, which then half-closes as an agent that stops does.

What must hold for every call (:func:`check_call`):

- an answer within :data:`CALL_TIMEOUT` (DEADLINE_EXCEEDED means the server hung), and
  the server process is alive afterwards;
- a refusal carries a documented code (:data:`DOCUMENTED_CODES`) and details that are not
  empty and not a Python traceback; UNKNOWN or INTERNAL for a message that decodes is a
  bug. Bytes that do not decode as the request type never reach our code: grpc.aio answers
  them with UNKNOWN and ``Unexpected <class '...DecodeError'>: Error parsing message ...``
  (its own behaviour for a failing request deserializer; the servicers cannot see it);
- a refusal, a read, a dry run and an unchanged write leave etcd as it was: the etcd
  revision is compared before and after the call (when something else in the session
  moved it, the keys of the server's prefixes are compared between the two revisions);
- an accepted write is read back (GetFlag, GetShedding, GetPin, ListKnownGood,
  GetBundle): the record read equals the one the write answered, and both carry exactly
  what was sent, up to the normalisation the server does on purpose: ``reason``,
  ``incident`` and ``actor`` are stripped of surrounding whitespace and an empty actor
  becomes ``unknown``; times are kept to the microsecond (nanoseconds are floored, the
  way ``model.timestamp_to_datetime`` reads them); a ``ttl`` becomes ``expires_at`` (set
  time + ttl); a JSON value comes back canonical (keys sorted, no spaces, parsed and
  re-serialized); a number that is an integer is stored as one, so ``-0.0`` reads back
  as ``0.0``; an unspecified tier is SHEDDABLE.

What must hold for every Sync stream (:func:`sync_check`): a valid Hello gets a snapshot
(or resume) and any other first message INVALID_ARGUMENT with nothing written; no
follow-up message ends the stream; once the agent half-closes, the call ends with OK, the
instance is no longer connected, and the server logged no error.

Time-boxed records that would expire during the run are never generated (durations and
times less than an hour ahead are moved an hour further): the server's expiry loop would
delete them at a moment no call accounts for, and the revision oracle could not tell its
write from a bad one.

Budget: by default (``make test``) a few hundred examples in all, derandomized; with
``CONTROLPLANE_FAULTS=full`` (``make test-faults``) several thousand, with a random seed
(a failure prints a ``@reproduce_failure`` blob; ``--hypothesis-seed`` pins a run).
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from hypothesis import currently_in_test_context, event, given
from hypothesis import strategies as st

from controlplane import model
from controlplane.api.v1 import agent_pb2 as a
from controlplane.api.v1 import agent_pb2_grpc, mitigation_pb2_grpc
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.errors import InvalidArgumentError
from tests.conftest import TEST_KEY_ROOT
from tests.faults.fuzz_budget import TIMEOUT, budget
from tests.faults.fuzz_oracle import (
    READBACKS,
    EtcdProbe,
    Target,
    check_call,
    parse_request,
    show_request,
)
from tests.faults.fuzz_strategies import (
    CALL_TIMEOUT,
    INSTANCE_RE,
    METHODS,
    READS,
    SERVICE_RE,
    SERVICES,
    VALID_REQUESTS,
    actors,
    apply_bundle_requests,
    field_values,
    json_values,
    leaf_paths,
    messages,
    reasons,
    services,
    set_path,
    targeted,
    versions,
    wrong_payloads,
)
from tests.faults.harness import FULL
from tests.helpers.raw_etcd import delete_prefix_blocking
from tests.helpers.server_process import ServerProcess

# ---------------------------------------------------------------- budget

pytestmark = pytest.mark.timeout(TIMEOUT)


@pytest.fixture(scope="module")
def module_prefix(etcd: EmbeddedEtcd) -> Iterator[str]:
    """A key prefix for the whole module (conftest's ``prefix`` is per test)."""
    key_prefix = f"{TEST_KEY_ROOT}{uuid.uuid4().hex}/"
    yield key_prefix
    delete_prefix_blocking(etcd.endpoint, key_prefix)
    delete_prefix_blocking(etcd.endpoint, key_prefix.rstrip("/") + "-presence/")


@pytest.fixture(scope="module")
def target(etcd: EmbeddedEtcd, module_prefix: str) -> Iterator[Target]:
    """One server process for the module's mitigation fuzzing (no agent ever connects)."""
    server = ServerProcess(etcd.endpoint, module_prefix)
    channel = grpc.insecure_channel(server.address)
    probe = EtcdProbe(etcd.endpoint)
    fuzzed = Target(server, channel, probe, module_prefix)
    fuzzed.stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
    try:
        yield fuzzed
    finally:
        channel.close()
        probe.close()
        server.stop()


# ---------------------------------------------------------------- the tests: MitigationService

UNARY_AND_SERVER_STREAMING = sorted(name for name, md in METHODS.items() if not md.client_streaming)


def test_every_rpc_has_an_oracle() -> None:
    """A new RPC is fuzzed by the generic tests at once; say here whether it writes."""
    assert set(METHODS) == READS | set(READBACKS), (
        "classify the new RPCs as READS or give them a read-back in READBACKS: "
        f"{sorted(set(METHODS) ^ (READS | set(READBACKS)))}"
    )
    assert set(VALID_REQUESTS) == set(METHODS), (
        f"give the new RPCs a valid request: {sorted(set(METHODS) ^ set(VALID_REQUESTS))}"
    )


@pytest.mark.parametrize("method", UNARY_AND_SERVER_STREAMING)
@budget(quick=6, full=80)
@given(data=st.data())
def test_any_request(target: Target, method: str, data: st.DataObject) -> None:
    """Any message of the request type (generic strategy)."""
    md = METHODS[method]
    request = data.draw(messages(md.input_type), label="request")
    check_call(target, md, request.SerializeToString(), request)


@pytest.mark.parametrize("method", UNARY_AND_SERVER_STREAMING)
@budget(quick=7, full=90)
@given(data=st.data())
def test_mostly_valid_request(target: Target, method: str, data: st.DataObject) -> None:
    """A valid request with at most one field replaced (targeted strategy)."""
    md = METHODS[method]
    request = data.draw(targeted(method), label="request")
    check_call(target, md, request.SerializeToString(), request)


@budget(quick=40, full=600)
@given(method=st.sampled_from(UNARY_AND_SERVER_STREAMING), data=st.data())
def test_wrong_types(target: Target, method: str, data: st.DataObject) -> None:
    """Bytes that are not a request of the method, and requests of other methods."""
    md = METHODS[method]
    payload = data.draw(wrong_payloads(method), label="payload")
    check_call(target, md, payload, parse_request(md, payload))


def test_a_message_over_the_size_limit_is_refused(target: Target) -> None:
    """5 MiB, over the server's 4 MiB --max-message-bytes: RESOURCE_EXHAUSTED, nothing written."""
    request = m.SetFlagRequest(
        scope="global",
        name="big",
        value=t.FlagValue(string_value="x" * (5 * 1024 * 1024)),
        options=t.WriteOptions(reason="too big"),
    )
    reply = check_call(target, METHODS["SetFlag"], request.SerializeToString(), request)
    assert reply.code is grpc.StatusCode.RESOURCE_EXHAUSTED, reply


@budget(quick=6, full=60)
@given(apply=apply_bundle_requests(), revert=targeted("RevertBundle"))
def test_revert_of_an_applied_bundle(
    target: Target, apply: m.ApplyBundleRequest, revert: m.RevertBundleRequest
) -> None:
    """RevertBundle, mostly valid, of a bundle just applied (the targeted strategy alone
    names bundles that do not exist). Everything is drawn before the first call: what the
    server answers must not change what is drawn, or hypothesis cannot replay a failure."""
    apply.options.dry_run = False
    applied = check_call(target, METHODS["ApplyBundle"], apply.SerializeToString(), apply)
    if applied.code is not grpc.StatusCode.OK or not applied.response.HasField("bundle"):
        return
    request: Any = m.RevertBundleRequest.FromString(revert.SerializeToString())
    if re.fullmatch(r"[0-9]{8}-[0-9]{6}-.*-[0-9a-f]{4}", request.bundle_id):
        request.bundle_id = applied.response.bundle.id
    check_call(target, METHODS["RevertBundle"], request.SerializeToString(), request)


@budget(quick=6, full=60)
@given(
    service=services(),
    marked=st.lists(versions(), min_size=1, max_size=3, unique=True),
    rollback=targeted("Rollback"),
)
def test_rollback_to_a_marked_version(
    target: Target, service: str, marked: list[str], rollback: m.RollbackRequest
) -> None:
    """Rollback, mostly valid, of a service with known-good versions."""
    for version in marked:
        mark = m.MarkKnownGoodRequest(
            service=service, version=version, options=t.WriteOptions(reason="fuzz: known good")
        )
        reply = check_call(target, METHODS["MarkKnownGood"], mark.SerializeToString(), mark)
        assert reply.code is grpc.StatusCode.OK, reply
    request: Any = m.RollbackRequest.FromString(rollback.SerializeToString())
    if request.service in SERVICES or re.fullmatch(SERVICE_RE, request.service):
        request.service = service
    check_call(target, METHODS["Rollback"], request.SerializeToString(), request)


# ---------------------------------------------------------------- the tests: AgentService.Sync

SYNC_TIMEOUT = 10.0


@dataclass
class AgentTarget:
    """A server process of the Sync tests' own (agents connect to it; its presence writes
    would disturb the revision oracle of the module's server)."""

    server: ServerProcess
    channel: grpc.Channel
    etcd: EtcdProbe
    prefix: str
    known_revision: int
    agents: Any = None
    mitigation: Any = None

    def alive(self) -> None:
        assert self.server.proc.poll() is None, (
            f"the server process died (exit {self.server.proc.returncode}):\n"
            + "".join(self.server.output[-40:])
        )

    def connected(self, service: str) -> set[str]:
        status = self.mitigation.GetStatus(
            m.GetStatusRequest(service=service), timeout=CALL_TIMEOUT
        )
        return {i.instance_id for i in status.instances if i.connected}


@pytest.fixture
def agent_target(etcd: EmbeddedEtcd, prefix: str) -> Iterator[AgentTarget]:
    server = ServerProcess(etcd.endpoint, prefix)
    channel = grpc.insecure_channel(server.address)
    probe = EtcdProbe(etcd.endpoint)
    fuzzed = AgentTarget(server, channel, probe, prefix, 0)
    fuzzed.agents = agent_pb2_grpc.AgentServiceStub(channel)
    fuzzed.mitigation = mitigation_pb2_grpc.MitigationServiceStub(channel)
    try:
        # The revision a first agent gets: Hellos claim at most this much (see sync_check).
        hello = a.Hello(service="probe", instance_id="probe-0")
        call, outbox = open_sync(fuzzed, a.SyncRequest(hello=hello))
        fuzzed.known_revision = next(call).snapshot.revision
        half_close(call, outbox)
        yield fuzzed
    finally:
        channel.close()
        probe.close()
        server.stop()


def open_sync(
    agent: AgentTarget, first: a.SyncRequest, timeout: float = SYNC_TIMEOUT
) -> tuple[Any, queue.Queue[a.SyncRequest | None]]:
    """A Sync stream opened with ``first``; put more messages in the returned outbox, and
    ``None`` to half-close (:func:`half_close`)."""
    outbox: queue.Queue[a.SyncRequest | None] = queue.Queue()
    outbox.put(first)
    return agent.agents.Sync(iter(outbox.get, None), timeout=timeout), outbox


def half_close(call: Any, outbox: queue.Queue[a.SyncRequest | None]) -> grpc.StatusCode:
    """Close the agent's side, as an agent that stops does, and read the stream to its end:
    the status the server ends the call with."""
    outbox.put(None)
    with contextlib.suppress(grpc.RpcError):
        for _ in call:
            pass
    return cast(grpc.StatusCode, call.code())


def hello_is_valid(first: a.SyncRequest) -> bool:
    """Whether the server must accept ``first`` as the opening of a stream."""
    if first.WhichOneof("message") != "hello":
        return False
    hello = first.hello
    try:
        model.validate_service(hello.service)
    except InvalidArgumentError:
        return False
    return bool(INSTANCE_RE.fullmatch(hello.instance_id)) and hello.last_applied_revision >= 0


@st.composite
def hellos(draw: st.DrawFn) -> a.SyncRequest:
    """A valid Hello (sometimes with a valid override), most of the time with one field
    replaced; or any SyncRequest."""
    if draw(st.integers(0, 3)) == 0:
        return cast(a.SyncRequest, draw(messages(a.SyncRequest.DESCRIPTOR)))
    hello = a.Hello(
        service=draw(services()),
        instance_id=draw(st.from_regex(INSTANCE_RE, fullmatch=True)),
        running_version=draw(st.just("") | versions()),
        agent_version=draw(st.sampled_from(["", "0.1.0"])),
    )
    if draw(st.booleans()):
        hello.override.CopyFrom(
            a.Override(
                active=draw(st.booleans()),
                reason=draw(reasons()),
                actor=draw(actors()),
                content_json=draw(
                    st.builds(
                        json.dumps, st.dictionaries(st.text(max_size=5), json_values(), max_size=3)
                    )
                ),
            )
        )
    request = a.SyncRequest(hello=hello)
    if draw(st.integers(0, 3)) != 0:
        path, f = draw(st.sampled_from(leaf_paths(request)))
        set_path(request, path, f, draw(st.none() | field_values(f)))
    return request


def sync_check(agent: AgentTarget, first: a.SyncRequest, follow: list[a.SyncRequest]) -> str | None:
    """Open Sync with ``first``, send ``follow``, half-close, and check everything that must
    hold (module doc). The kind of the server's first message; None if it refused ``first``."""
    first = a.SyncRequest.FromString(first.SerializeToString())
    hello = first.hello
    # A Hello may claim a revision the server has not seen: it then waits CATCH_UP_TIMEOUT
    # (5 s) for it, by design. One test does that (test_sync_hello_ahead_of_the_server);
    # here positive revisions are folded to ones the server had when the test started.
    if first.WhichOneof("message") == "hello" and hello.last_applied_revision > 0:
        hello.last_applied_revision %= agent.known_revision + 1
    what = f"Sync({show_request(first)}; then {[show_request(f) for f in follow]})"
    valid = hello_is_valid(first)
    start = len(agent.server.output)
    agent.alive()
    before = agent.etcd.keys(agent.prefix)
    # The ack reader handles messages in order: once it audited this override (or logged
    # it dropped, over the instance's report budget) it handled the follow-ups.
    token = f"fuzz-sentinel-{uuid.uuid4().hex}"
    sentinel = a.SyncRequest(override=a.Override(active=True, reason=token, digest=token))
    call, outbox = open_sync(agent, first)
    try:
        try:
            kind: str | None = next(call).WhichOneof("message")
        except grpc.RpcError as exc:
            err = cast(grpc.Call, exc)
            code, details = err.code(), err.details() or ""
            agent.alive()
            assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: no answer: hung"
            if currently_in_test_context():
                event(f"Sync: {code.name}")
            assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {code.name} {details!r}"
            assert not valid, f"{what}: a valid Hello refused: {details!r}"
            assert details.strip() and "Traceback" not in details, f"{what}: {details!r}"
            assert agent.etcd.keys(agent.prefix) == before, f"{what}: refused, yet wrote"
            return None
        if currently_in_test_context():
            event(f"Sync: {kind}")
        assert valid, f"{what}: an invalid first message accepted, answered with {kind}"
        assert kind in ("snapshot", "resume"), f"{what}: the stream opens with {kind}"
        for message in [*follow, sentinel]:
            outbox.put(message)
        code = half_close(call, outbox)
    finally:
        call.cancel()
        outbox.put(None)
    agent.alive()
    assert code is grpc.StatusCode.OK, f"{what}: half-closed, ends with {code.name}"
    instance = re.escape(json.dumps(hello.instance_id))
    gone = rf'"instance_id": {instance}, "applied": -?\d+, "event": "agent_disconnected"'
    agent.server.wait_output(gone, timeout=CALL_TIMEOUT, start=start)
    lines = agent.server.output[start:]
    assert any(token in line for line in lines), (
        f"{what}: the stream ended on a follow-up message:\n" + "".join(lines[-20:])
    )
    errors = [line for line in lines if '"level": "error"' in line or "Traceback" in line]
    assert not errors, f"{what}: the server logged errors:\n{''.join(errors)}"
    assert hello.instance_id not in agent.connected(hello.service), (
        f"{what}: still connected after the stream ended"
    )
    return kind


@budget(quick=30, full=400)
@given(first=hellos(), follow=st.lists(messages(a.SyncRequest.DESCRIPTOR), max_size=3))
def test_sync(agent_target: AgentTarget, first: a.SyncRequest, follow: list[a.SyncRequest]) -> None:
    """Sync's first message is a Hello or INVALID_ARGUMENT; nothing after it breaks the stream."""
    sync_check(agent_target, first, follow)


@pytest.mark.skipif(not FULL, reason="waits CATCH_UP_TIMEOUT (5 s): in the full fault run only")
def test_sync_hello_ahead_of_the_server(agent_target: AgentTarget) -> None:
    """A Hello claiming a revision etcd never had gets a snapshot after the catch-up wait."""
    hello = a.Hello(service="svc-a", instance_id="ahead", last_applied_revision=2**63 - 1)
    call, outbox = open_sync(agent_target, a.SyncRequest(hello=hello))
    try:
        assert next(call).WhichOneof("message") == "snapshot"
        assert half_close(call, outbox) is grpc.StatusCode.OK
    finally:
        call.cancel()
        outbox.put(None)


# ---------------------------------------------------------------- the tests: examples found


def test_an_agent_half_closing_gets_ok_at_once(agent_target: AgentTarget) -> None:
    """An agent that closes its side after the snapshot gets OK at once, not at its deadline."""
    # Found by this fuzzer: the call stayed open until the client's deadline.
    hello = a.Hello(service="svc-a", instance_id="half-closing")
    # The status is due at once: two seconds are plenty.
    call, outbox = open_sync(agent_target, a.SyncRequest(hello=hello), timeout=2.0)
    try:
        assert next(call).WhichOneof("message") == "snapshot"
        code = half_close(call, outbox)
    finally:
        call.cancel()
        outbox.put(None)
    assert code is grpc.StatusCode.OK, f"{code.name}: {call.details()!r}"
    assert hello.instance_id not in agent_target.connected("svc-a")


_BAD_OVERRIDES = {
    "expires_at": a.Override(active=True, expires_at=timestamp_pb2.Timestamp(seconds=10**15)),
    "deep_json": a.Override(active=True, content_json="[" * 100_000),
    "surrogate": a.Override(active=True, content_json='{"a": "\\ud800"}'),
}


@pytest.mark.parametrize("case", sorted(_BAD_OVERRIDES))
def test_a_bad_override_is_audited_and_the_stream_goes_on(
    agent_target: AgentTarget, case: str
) -> None:
    """An override with a time out of range, JSON nested too deep or a lone surrogate escape,
    in the Hello and again after it: a snapshot, audited once, and a clean end at the
    half-close."""
    # Found by this fuzzer: the stream failed with UNKNOWN and the instance stayed connected.
    bad = _BAD_OVERRIDES[case]
    again = a.Override(digest="sent-again")
    again.MergeFrom(bad)
    hello = a.Hello(service="svc-a", instance_id=f"bad-override-{case}", override=bad)
    start = len(agent_target.server.output)
    kind = sync_check(agent_target, a.SyncRequest(hello=hello), [a.SyncRequest(override=again)])
    assert kind == "snapshot", kind
    audited = [
        line
        for line in agent_target.server.output[start:]
        if '"event": "override_reported"' in line and hello.instance_id in line
    ]
    # The Hello's override (sent again after it with another digest: the server's digest
    # is of what it audits, so once) and sync_check's own.
    assert len(audited) == 2, "".join(agent_target.server.output[start:])


_FAR = timestamp_pb2.Timestamp(seconds=2**62)  # beyond datetime on any platform
_FOREVER = duration_pb2.Duration(seconds=10**15)  # beyond timedelta
_SURROGATE = t.FlagValue(json_value='{"a": "\\ud800"}')


def _set_flag(value: t.FlagValue, **options: Any) -> m.SetFlagRequest:
    return m.SetFlagRequest(
        scope="global", name="unheld", value=value, options=t.WriteOptions(reason="r", **options)
    )


# What no record can hold: (method, request, the field the refusal names).
_UNHELD: dict[str, tuple[str, Message, str]] = {
    "ttl": ("SetFlag", _set_flag(t.FlagValue(bool_value=True), ttl=_FOREVER), "options.ttl"),
    "expires_at": (
        "SetFlag",
        _set_flag(t.FlagValue(bool_value=True), expires_at=_FAR),
        "options.expires_at",
    ),
    "json": ("SetFlag", _set_flag(_SURROGATE), "value"),
    "bundle_json": (
        "ApplyBundle",
        m.ApplyBundleRequest(
            name="unheld",
            changes=[
                m.BundleChange(
                    set_flag=m.SetFlagRequest(scope="global", name="unheld", value=_SURROGATE)
                )
            ],
            options=t.WriteOptions(reason="r"),
        ),
        "changes[0].set_flag.value",
    ),
    "since": ("ListHistory", m.ListHistoryRequest(since=_FAR), "since"),
    "until": ("ListHistory", m.ListHistoryRequest(until=_FAR), "until"),
    "timeout": (
        "WaitApplied",
        m.WaitAppliedRequest(service="a", revision=1, timeout=_FOREVER),
        "timeout",
    ),
}


@pytest.mark.parametrize("case", sorted(_UNHELD))
def test_a_value_no_record_can_hold_is_invalid_argument(target: Target, case: str) -> None:
    """A duration or time beyond what datetime holds, JSON with a lone surrogate escape:
    INVALID_ARGUMENT naming the field, and nothing written (check_call reads etcd)."""
    # Found by this fuzzer: each failed with INTERNAL.
    method, request, field_name = _UNHELD[case]
    reply = check_call(target, METHODS[method], request.SerializeToString(), request)
    assert reply.code is grpc.StatusCode.INVALID_ARGUMENT, reply
    assert reply.details.startswith(f"{field_name}: "), reply.details


def test_a_bundle_clearing_a_time_boxed_layer_is_applied_and_reverts(target: Target) -> None:
    """A bundle whose clear brings back the record under a time-boxed layer reads back
    APPLIED, and reverting it puts the layer back."""
    # Found by this fuzzer: it read PARTIALLY_OVERRIDDEN at once and reverting was ABORTED.
    get = m.GetFlagRequest(scope="global", name="layered")
    for value, opts in (
        (True, t.WriteOptions(reason="base")),
        (False, t.WriteOptions(reason="layer", ttl=duration_pb2.Duration(seconds=7200))),
    ):
        target.stub.SetFlag(
            m.SetFlagRequest(
                scope=get.scope, name=get.name, value=t.FlagValue(bool_value=value), options=opts
            ),
            timeout=CALL_TIMEOUT,
        )
    clear = m.BundleChange(clear_flag=m.ClearFlagRequest(scope=get.scope, name=get.name))
    apply = m.ApplyBundleRequest(
        name="layered", changes=[clear], options=t.WriteOptions(reason="r")
    )
    applied = check_call(target, METHODS["ApplyBundle"], apply.SerializeToString(), apply)
    assert applied.code is grpc.StatusCode.OK, applied
    read = target.get("GetBundle", m.GetBundleRequest(bundle_id=applied.response.bundle.id))
    assert read.bundle.state == m.APPLIED, read.bundle
    assert target.get("GetFlag", get).flag.value.bool_value is True
    revert = m.RevertBundleRequest(
        bundle_id=applied.response.bundle.id, options=t.WriteOptions(reason="r")
    )
    reverted = check_call(target, METHODS["RevertBundle"], revert.SerializeToString(), revert)
    assert reverted.code is grpc.StatusCode.OK, reverted
    assert reverted.response.bundle.state == m.REVERTED, reverted
    layer = target.get("GetFlag", get).flag
    assert (layer.value.bool_value, layer.meta.reason) == (False, "layer"), layer
