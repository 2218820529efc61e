"""What the fuzz tests check: a server process, an etcd probe and the oracle of each call.

:func:`check_call` makes one call and checks what must hold (``test_fuzz``'s docstring
lists it): an answer in time, a documented refusal, etcd unchanged by a refusal, a read
or a dry run, and an accepted write read back as sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import grpc
from aetcd import rpc
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory, text_format, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import currently_in_test_context, event

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import types_pb2 as t
from tests.faults.fuzz_strategies import CALL_TIMEOUT, DOCUMENTED_CODES, READS
from tests.helpers.raw_etcd import prefix_range_end
from tests.helpers.server_process import ServerProcess

# ---------------------------------------------------------------- etcd, servers, calls


class EtcdProbe:
    """Blocking reads of the session etcd, independent of the server under test."""

    def __init__(self, endpoint: str) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self._kv: Any = rpc.KVStub(self._channel)

    def revision(self) -> int:
        response = self._kv.Range(rpc.RangeRequest(key=b"\0", count_only=True), timeout=10)
        return int(response.header.revision)

    def keys(self, prefix: str, revision: int = 0) -> dict[bytes, int]:
        """The keys under ``prefix`` (at ``revision``; 0: now) with their mod revisions."""
        raw = prefix.encode()
        response = self._kv.Range(
            rpc.RangeRequest(
                key=raw, range_end=prefix_range_end(raw), keys_only=True, revision=revision
            ),
            timeout=10,
        )
        return {bytes(kv.key): int(kv.mod_revision) for kv in response.kvs}

    def close(self) -> None:
        self._channel.close()


def _identity(raw: bytes) -> bytes:
    return raw


@dataclass
class Reply:
    """What one call answered."""

    code: grpc.StatusCode
    details: str
    response: Any = None


@dataclass
class Target:
    """The server process under test, its channel and the etcd beside it."""

    server: ServerProcess
    channel: grpc.Channel
    etcd: EtcdProbe
    prefix: str
    stub: Any = None

    @property
    def prefixes(self) -> tuple[str, str]:
        return self.prefix, self.prefix.rstrip("/") + "-presence/"

    def alive(self) -> None:
        assert self.server.proc.poll() is None, (
            f"the server process died (exit {self.server.proc.returncode}):\n"
            + "".join(self.server.output[-40:])
        )

    def invoke(self, method: pbd.MethodDescriptor, payload: bytes) -> Reply:
        """Call ``method`` with ``payload`` as the request's bytes; a stream's first answer."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        decode = message_factory.GetMessageClass(method.output_type).FromString
        try:
            if not method.server_streaming:
                call = self.channel.unary_unary(
                    path, request_serializer=_identity, response_deserializer=decode
                )
                return Reply(grpc.StatusCode.OK, "", call(payload, timeout=CALL_TIMEOUT))
            stream: Any = self.channel.unary_stream(
                path, request_serializer=_identity, response_deserializer=decode
            )(payload, timeout=CALL_TIMEOUT)
            try:
                first = next(stream)
            except StopIteration:
                return Reply(stream.code(), stream.details() or "", None)
            finally:
                stream.cancel()
            return Reply(grpc.StatusCode.OK, "", first)
        except grpc.RpcError as exc:
            call_exc = cast(grpc.Call, exc)
            return Reply(call_exc.code(), call_exc.details() or "")

    def unchanged(self, before: int, after: int, what: str) -> None:
        """etcd holds what it held at ``before``, as far as this server can write."""
        if after == before:
            return
        # Something moved the revision: another process of the session, or this server.
        # The keys of its prefixes tell which.
        moved = {
            key.decode(errors="replace"): (old.get(key), new.get(key))
            for prefix in self.prefixes
            for old, new in [(self.etcd.keys(prefix, before), self.etcd.keys(prefix, after))]
            for key in old.keys() | new.keys()
            if old.get(key) != new.get(key)
        }
        assert not moved, f"{what}: etcd changed (mod revision before, after): {moved}"

    def get(self, rpc_name: str, request: Message) -> Any:
        """A read-back call; None for NOT_FOUND."""
        try:
            return getattr(self.stub, rpc_name)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if cast(grpc.Call, exc).code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise


def show_request(request: Message | bytes | None) -> str:
    if request is None:
        return "-"
    text = (
        repr(request[:120])
        if isinstance(request, bytes)
        else text_format.MessageToString(request, as_one_line=True)
    )
    return text if len(text) <= 400 else text[:400] + f"... ({len(text)} characters)"


def parse_request(method: pbd.MethodDescriptor, payload: bytes) -> Message | None:
    """The request as the server's deserializer reads ``payload``; None if it cannot."""
    try:
        return message_factory.GetMessageClass(method.input_type).FromString(payload)
    except DecodeError:
        return None


# ---------------------------------------------------------------- the oracle


def _note_outcome(method: str, reply: Reply) -> None:
    """Count outcomes in hypothesis' statistics (``--hypothesis-show-statistics``)."""
    if not currently_in_test_context():
        return
    outcome = reply.code.name
    result = getattr(reply.response, "result", None)
    if result is not None:
        outcome = "OK written" if result.changed else "OK dry run" if result.dry_run else "OK same"
    event(f"{method}: {outcome}")


def check_call(
    target: Target, method: pbd.MethodDescriptor, payload: bytes, request: Message | None
) -> Reply:
    """Call ``method`` with ``payload`` and check everything that must hold (module doc).

    ``request`` is ``payload`` as the server decodes it (None: it does not decode).
    """
    what = f"{method.name}({show_request(request if request is not None else payload)})"
    target.alive()
    before = target.etcd.revision()
    reply = target.invoke(method, payload)
    after = target.etcd.revision()
    target.alive()
    assert reply.code is not grpc.StatusCode.DEADLINE_EXCEEDED, (
        f"{what}: no answer within {CALL_TIMEOUT}s: the server hung"
    )
    _note_outcome(method.name, reply)
    if reply.code is grpc.StatusCode.OK:
        assert request is not None, f"{what}: the server accepted bytes that do not decode"
        assert reply.response is not None, f"{what}: the stream ended without a response"
        _check_accepted(target, method.name, request, reply.response, before, after, what)
        return reply
    if request is None:
        # grpc.aio's answer to bytes its request deserializer cannot read (see module doc).
        assert reply.code is grpc.StatusCode.UNKNOWN, f"{what}: {reply.code} {reply.details!r}"
        assert "Error parsing message" in reply.details, f"{what}: {reply.details!r}"
    else:
        assert reply.code in DOCUMENTED_CODES, (
            f"{what}: refused with {reply.code.name}, not a documented code: {reply.details!r}"
        )
        assert reply.details.strip(), f"{what}: {reply.code.name} without details"
        assert "Traceback" not in reply.details, f"{what}: a traceback: {reply.details!r}"
        assert not reply.details.startswith("Unexpected <class"), f"{what}: {reply.details!r}"
    target.unchanged(before, after, f"{what} refused with {reply.code.name}")
    return reply


def _check_accepted(
    target: Target, method: str, request: Any, response: Any, before: int, after: int, what: str
) -> None:
    if method in READS:
        target.unchanged(before, after, f"{what} (a read)")
        if method == "WatchChanges":
            assert not response.changes, f"{what}: the first response carries changes"
            assert 0 < response.revision <= after, f"{what}: starts after {response.revision}"
        return
    if method not in READBACKS:
        return  # a new RPC: test_every_rpc_has_an_oracle fails until it has one
    # A message of another type decodes with unknown fields; the server ignores them.
    request = type(request).FromString(request.SerializeToString())
    request.DiscardUnknownFields()
    result = response.result
    if result.dry_run or not result.changed:
        assert not (result.dry_run and result.changed), f"{what}: a dry run says it changed"
        assert result.revision == 0, f"{what}: nothing written, yet revision {result.revision}"
        target.unchanged(before, after, f"{what} (dry run or unchanged)")
    else:
        assert before < result.revision <= after, (
            f"{what}: written at {result.revision}, outside ({before}, {after}]"
        )
    READBACKS[method](target, request, response, what)


# -- read-backs: what the server answered and what it reads back agree with what was sent


def _us(ts: timestamp_pb2.Timestamp) -> int:
    """A time in microseconds, floored as the server reads it."""
    return int(ts.seconds) * 10**6 + int(ts.nanos) // 1000


def _canonical_json(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _same_value(sent: t.FlagValue, got: t.FlagValue, what: str) -> None:
    kind = sent.WhichOneof("kind")
    assert got.WhichOneof("kind") == kind, f"{what}: sent a {kind}, read {got}"
    if kind == "json_value":
        assert got.json_value == _canonical_json(sent.json_value), f"{what}: {got.json_value!r}"
    elif kind == "number_value":
        # == on purpose: -0.0 is stored as the integer 0 (module doc).
        assert got.number_value == sent.number_value, f"{what}: {got.number_value!r}"
    else:
        assert getattr(got, kind) == getattr(sent, kind), f"{what}: {got}"


def _without_negative_zero(record: Any) -> Any:
    """A copy of a Flag with a number value of -0.0 made 0.0 (stored as the integer 0)."""
    copy = type(record)()
    copy.CopyFrom(record)
    node = copy
    while node is not None:
        value = getattr(node, "value", None)
        if value is not None and value.WhichOneof("kind") == "number_value":
            value.number_value += 0.0
        node = node.replaced if node.HasField("replaced") else None
    return copy


def _same_record(answered: Any, read: Any, what: str) -> None:
    """The record a write answered is the one read back, field for field."""
    assert read is not None, f"{what}: answered {show_request(answered)}, reads back nothing"
    if isinstance(answered, t.Flag):
        answered = _without_negative_zero(answered)
    assert read == answered, (
        f"{what}: answered {show_request(answered)}, reads {show_request(read)}"
    )


def _same_meta(opts: t.WriteOptions, meta: t.Meta, what: str, *, bundle_id: str = "") -> None:
    assert meta.reason == opts.reason.strip(), f"{what}: reason {meta.reason!r}"
    assert meta.incident == opts.incident.strip(), f"{what}: incident {meta.incident!r}"
    assert meta.actor == (opts.actor.strip() or "unknown"), f"{what}: actor {meta.actor!r}"
    assert not meta.actor_authenticated, f"{what}: authenticated without authentication"
    assert meta.bundle_id == bundle_id, f"{what}: bundle {meta.bundle_id!r}"
    if opts.HasField("expires_at"):
        assert _us(meta.expires_at) == _us(opts.expires_at), f"{what}: {meta.expires_at}"
    elif opts.HasField("ttl"):
        ttl_us = opts.ttl.ToTimedelta() // timedelta(microseconds=1)
        # expires_at = the time the options were read + ttl; set_at is a little later.
        lag = ttl_us - (_us(meta.expires_at) - _us(meta.set_at))
        assert 0 <= lag < 5 * 10**6, f"{what}: ttl {ttl_us} us, record {meta}"
    else:
        assert not meta.HasField("expires_at"), f"{what}: expires without an expiry sent"


def _new_record(result: t.WriteResult) -> bool:
    """Whether the answered record is the one the request made (else the one in force)."""
    return result.changed or (result.dry_run and result.would_change)


def _readback_set_flag(target: Target, req: Any, resp: Any, what: str) -> None:
    if _new_record(resp.result):
        _same_value(req.value, resp.flag.value, what)
        _same_meta(req.options, resp.flag.meta, what)
        assert (resp.flag.scope, resp.flag.name) == (req.scope, req.name), what
    if resp.result.dry_run:
        return
    read = target.get("GetFlag", m.GetFlagRequest(scope=req.scope, name=req.name))
    assert read is not None, f"{what}: the flag reads back as not set"
    # Unchanged: the value was in force already (the record is the earlier write's).
    _same_value(req.value, read.flag.value, what)
    if resp.result.changed:
        _same_record(resp.flag, read.flag, what)


def _readback_cleared(get: str, make: Callable[[Any], Message], field_name: str) -> Any:
    def readback(target: Target, req: Any, resp: Any, what: str) -> None:
        if not resp.result.changed:
            return
        read = target.get(get, make(req))
        if resp.HasField("restored"):
            _same_record(resp.restored, getattr(read, field_name, None), what)
        else:
            assert read is None, f"{what}: cleared, yet reads {show_request(read)}"

    return readback


def _readback_set_shedding(target: Target, req: Any, resp: Any, what: str) -> None:
    tier = req.tier or t.SHEDDABLE
    if _new_record(resp.result):
        assert (resp.shedding.tier, resp.shedding.percent) == (tier, req.percent), what
        _same_meta(req.options, resp.shedding.meta, what)
    if resp.result.dry_run:
        return
    read = target.get("GetShedding", m.GetSheddingRequest(service=req.service))
    assert read is not None, f"{what}: the shedding level reads back as not set"
    assert (read.shedding.tier, read.shedding.percent) == (tier, req.percent), (
        f"{what}: reads {show_request(read.shedding)}"
    )
    if resp.result.changed:
        _same_record(resp.shedding, read.shedding, what)


def _readback_pin(target: Target, req: Any, resp: Any, what: str) -> None:
    pinned = req.version if isinstance(req, m.PinVersionRequest) else resp.pin.version
    if isinstance(req, m.RollbackRequest):
        assert resp.from_version, f"{what}: a rollback from no version"
        assert pinned and pinned != resp.from_version, f"{what}: {show_request(resp)}"
    if _new_record(resp.result):
        assert resp.pin.version == pinned, what
        _same_meta(req.options, resp.pin.meta, what)
    if resp.result.dry_run:
        return
    read = target.get("GetPin", m.GetPinRequest(service=req.service))
    assert read is not None, f"{what}: the pin reads back as not set"
    assert read.pin.version == pinned, f"{what}: reads {show_request(read.pin)}"
    if resp.result.changed:
        _same_record(resp.pin, read.pin, what)


def _known_good(target: Target, service: str) -> dict[str, t.KnownGood]:
    read = target.get("ListKnownGood", m.ListKnownGoodRequest(service=service))
    return {k.version: k for k in read.known_good}


def _readback_mark(target: Target, req: Any, resp: Any, what: str) -> None:
    marks = _known_good(target, req.service)
    if resp.result.dry_run:
        return
    assert req.version in marks, f"{what}: not among {sorted(marks)}"
    if resp.result.changed:
        _same_meta(req.options, resp.known_good.meta, what)
        _same_record(resp.known_good, marks[req.version], what)


def _readback_unmark(target: Target, req: Any, resp: Any, what: str) -> None:
    if resp.result.dry_run:
        return
    assert req.version not in _known_good(target, req.service), f"{what}: still marked"


def _readback_apply_bundle(target: Target, req: Any, resp: Any, what: str) -> None:
    if not resp.result.changed:
        return  # unchanged: no bundle, or the applied twin (its own options)
    bundle = resp.bundle
    assert list(bundle.changes) == list(req.changes), (
        f"{what}: the bundle answers other changes: {show_request(bundle)}"
    )
    assert bundle.name == req.name, what
    _same_meta(req.options, bundle.meta, what, bundle_id=bundle.id)
    if resp.result.dry_run:
        return
    read = target.get("GetBundle", m.GetBundleRequest(bundle_id=bundle.id))
    assert read is not None, f"{what}: bundle {bundle.id} reads back as absent"
    assert read.bundle.state == m.APPLIED, f"{what}: {show_request(read.bundle)}"
    _same_record(bundle, read.bundle, what)
    for change in req.changes:
        if change.HasField("set_flag"):
            sf = change.set_flag
            if f"flags/{sf.scope}/{sf.name}" in bundle.keys:
                flag = target.get("GetFlag", m.GetFlagRequest(scope=sf.scope, name=sf.name))
                assert flag is not None, f"{what}: {sf.scope}/{sf.name} not set"
                _same_value(sf.value, flag.flag.value, what)
                _same_meta(req.options, flag.flag.meta, what, bundle_id=bundle.id)


def _readback_revert(target: Target, req: Any, resp: Any, what: str) -> None:
    if not resp.result.changed:
        return
    read = target.get("GetBundle", m.GetBundleRequest(bundle_id=req.bundle_id))
    assert read is not None, f"{what}: the bundle reads back as absent"
    assert read.bundle.state == m.REVERTED, f"{what}: {show_request(read.bundle)}"
    assert read.bundle.reverted.reason == req.options.reason.strip(), what
    _same_record(resp.bundle, read.bundle, what)


def _readback_set_trigger(target: Target, req: Any, resp: Any, what: str) -> None:
    if resp.result.dry_run:
        return
    read = target.get("GetTrigger", m.GetTriggerRequest(name=req.trigger.name))
    assert read is not None, f"{what}: the trigger reads back as absent"
    got, sent = read.trigger, req.trigger
    assert list(got.matchers) == list(sent.matchers), f"{what}: {show_request(got)}"
    assert got.bundle_name == sent.bundle_name, what
    assert list(got.changes) == list(sent.changes), f"{what}: {show_request(got)}"
    assert got.revert_on_resolve == sent.revert_on_resolve, what
    assert got.dry_run == sent.dry_run, what
    assert got.meta.reason == req.options.reason.strip(), what


def _readback_delete_trigger(target: Target, req: Any, resp: Any, what: str) -> None:
    if resp.result.dry_run:
        return
    read = target.get("GetTrigger", m.GetTriggerRequest(name=req.name))
    assert read is None, f"{what}: still there: {show_request(read.trigger)}"


def _readback_trigger_enabled(target: Target, req: Any, resp: Any, what: str) -> None:
    if resp.result.dry_run:
        return
    read = target.get("GetTrigger", m.GetTriggerRequest(name=req.name))
    assert read is not None and read.trigger.enabled == req.enabled, what


def _readback_firing(target: Target, req: Any, resp: Any, what: str) -> None:
    if resp.outcome in (m.TRIGGER_FIRED, m.TRIGGER_REVERTED):
        read = target.get("GetBundle", m.GetBundleRequest(bundle_id=resp.bundle_id))
        assert read is not None, f"{what}: bundle {resp.bundle_id} reads back as absent"
        state = m.APPLIED if resp.outcome == m.TRIGGER_FIRED else m.REVERTED
        assert read.bundle.state in (state, m.PARTIALLY_OVERRIDDEN, m.EXPIRED), what
    else:
        assert resp.outcome != m.TRIGGER_OUTCOME_UNSPECIFIED, f"{what}: no outcome"
        assert resp.message, f"{what}: an outcome without a word"


READBACKS: dict[str, Callable[[Target, Any, Any, str], None]] = {
    "SetFlag": _readback_set_flag,
    "ClearFlag": _readback_cleared(
        "GetFlag", lambda r: m.GetFlagRequest(scope=r.scope, name=r.name), "flag"
    ),
    "SetShedding": _readback_set_shedding,
    "ClearShedding": _readback_cleared(
        "GetShedding", lambda r: m.GetSheddingRequest(service=r.service), "shedding"
    ),
    "PinVersion": _readback_pin,
    "UnpinVersion": _readback_cleared(
        "GetPin", lambda r: m.GetPinRequest(service=r.service), "pin"
    ),
    "MarkKnownGood": _readback_mark,
    "UnmarkKnownGood": _readback_unmark,
    "Rollback": _readback_pin,
    "ApplyBundle": _readback_apply_bundle,
    "RevertBundle": _readback_revert,
    "SetTrigger": _readback_set_trigger,
    "DeleteTrigger": _readback_delete_trigger,
    "SetTriggerEnabled": _readback_trigger_enabled,
    "FireTrigger": _readback_firing,
    "ResolveTrigger": _readback_firing,
}
