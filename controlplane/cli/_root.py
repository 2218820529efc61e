"""``cpctl``: change and inspect mitigations from a terminal or a runbook.

Layout: parsing of user input (values; durations and times come from ``_durations``, shared
with the server) and the exit-code table first, then
``App`` (the server list, failover, the calls and the one stream; TLS and the token from
``controlplane.transport``, the token's metadata sent with every call), then the write and
--wait options, then the click commands. A command parses its arguments, builds one
request, calls ``App.call`` and hands the plain response to ``_respond`` with a renderer
from ``_cli_format``; a write goes through ``_write`` instead, which also does --wait
(``WaitApplied`` for each service the write concerns). Adding a command means adding those
few lines. gRPC and the generated stubs are imported inside the functions that call, so
``cpctl --help`` does not pay for them.

Errors::

    click.ClickException
     +-- click.UsageError            exit 2: bad syntax, missing --reason, a connection
                                     setting (``setting_error``: a TransportConfigError
                                     naming the option or variable used), ...
     +-- CliError                    carries a status-like code name and an ExitCode:
                                     client-side invalid input (3), RPC failures mapped
                                     from their gRPC status (exit_code_for_status),
                                     --wait outcomes (8, 9, 10: the write itself was
                                     made and its result printed), and unexpected
                                     failures (1)

``main`` prints every error to stderr, as ``error: ...`` or, with ``--json``, as
``{"error": {"code": ..., "message": ..., "exit_code": ...}}``; stdout only ever carries
the command's result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import getpass
import json
import math
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from controlplane import __version__
from controlplane._duration_param import DurationParam
from controlplane._durations import DURATION_FORMS, TIME_FORMS, parse_duration, parse_time
from controlplane.cli import _output as fmt
from controlplane.transport import ClientSecurity, TransportConfigError, path_or_none

if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message

    from controlplane.api.v1 import types_pb2

__all__ = [
    "ExitCode",
    "FlagValue",
    "cli",
    "exit_code_for_status",
    "main",
    "parse_duration",
    "parse_flag_value",
    "parse_percent",
    "parse_since",
    "parse_time",
]


class ExitCode(enum.IntEnum):
    """Exit codes of ``cpctl``; documented in ``cpctl --help``."""

    OK = 0
    ERROR = 1
    USAGE = 2
    INVALID = 3
    CONFLICT = 4
    NOT_FOUND = 5
    UNAVAILABLE = 6
    PERMISSION_DENIED = 7
    WAIT_TIMEOUT = 8
    WAIT_NO_INSTANCES = 9
    REJECTED = 10
    FAILED_PRECONDITION = 11
    UNIMPLEMENTED = 12
    INTERRUPTED = 130


_EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "ok (also a write that changed nothing: runbooks can be re-run)",
    ExitCode.ERROR: "internal or unknown error",
    ExitCode.USAGE: "usage error (bad option or argument, missing --reason; a connection "
    "setting: an unreadable TLS or token file, plaintext to a server off loopback)",
    ExitCode.INVALID: "invalid input (INVALID_ARGUMENT, OUT_OF_RANGE, or caught before "
    "sending, e.g. a bad bundle file)",
    ExitCode.CONFLICT: "conflict (ABORTED, ALREADY_EXISTS): --expect-revision did not match, "
    "or a bundle's keys changed since it was applied (see bundle revert --force)",
    ExitCode.NOT_FOUND: "not found (NOT_FOUND)",
    ExitCode.UNAVAILABLE: "server or its etcd unavailable, or too slow (UNAVAILABLE, "
    "DEADLINE_EXCEEDED)",
    ExitCode.PERMISSION_DENIED: "permission denied (PERMISSION_DENIED, UNAUTHENTICATED): no "
    "token, a token the server refused, or one whose role does not allow the call",
    ExitCode.WAIT_TIMEOUT: "--wait timed out with the change only partly applied (the pending "
    "instances are listed); the change is written",
    ExitCode.WAIT_NO_INSTANCES: "--wait found no connected instance of the service (a "
    "mistyped service name?); the change is written",
    ExitCode.REJECTED: "--wait: an instance rejected the change (instance and reason are "
    "listed); the change is written",
    ExitCode.FAILED_PRECONDITION: "failed precondition, e.g. nothing to roll back to, or an "
    "expired bundle reverted without --force",
    ExitCode.UNIMPLEMENTED: "not implemented by the server yet (UNIMPLEMENTED)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); a write may or may not have been applied "
    "(`watch` stops this way)",
}

_EXIT_BY_STATUS: dict[str, ExitCode] = {
    "INVALID_ARGUMENT": ExitCode.INVALID,
    "OUT_OF_RANGE": ExitCode.INVALID,
    "ABORTED": ExitCode.CONFLICT,
    "ALREADY_EXISTS": ExitCode.CONFLICT,
    "NOT_FOUND": ExitCode.NOT_FOUND,
    "UNAVAILABLE": ExitCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": ExitCode.UNAVAILABLE,
    "PERMISSION_DENIED": ExitCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": ExitCode.PERMISSION_DENIED,
    "FAILED_PRECONDITION": ExitCode.FAILED_PRECONDITION,
    "UNIMPLEMENTED": ExitCode.UNIMPLEMENTED,
}

# Shown under the error line (not in --json output), unless the error carries its own hint.
_HINTS: dict[str, str] = {
    "ABORTED": "the record changed since it was read: look at it with `get` and retry with "
    "its current revision in --expect-revision",
    "UNAVAILABLE": "is the server running? check --server / CPCTL_SERVER",
    "DEADLINE_EXCEEDED": "the server did not answer in time (--timeout)",
    "UNIMPLEMENTED": "this server does not support that yet",
    "PERMISSION_DENIED": "your credentials do not allow this",
    "UNAUTHENTICATED": "your credentials do not allow this",
}
ANONYMOUS_HINT = (
    "no token was sent: set CPCTL_TOKEN or --token-file (CPCTL_TOKEN_FILE) to a token the "
    "server knows"
)
REFUSED_HINT = (
    "the server did not accept your token (unknown, expired or revoked?): check CPCTL_TOKEN "
    "or --token-file (CPCTL_TOKEN_FILE)"
)
ROLE_HINT = (
    "your token's role does not allow this (the message says what it takes): use a token "
    "with that role, via CPCTL_TOKEN or --token-file (CPCTL_TOKEN_FILE)"
)


def exit_code_for_status(code: grpc.StatusCode) -> ExitCode:
    """The exit code for a gRPC status; codes without their own exit code give ERROR (1)."""
    return _EXIT_BY_STATUS.get(code.name, ExitCode.ERROR)


class CliError(click.ClickException):
    """An error with a status-like code name (``ABORTED``, ``INVALID_ARGUMENT``, ...)."""

    def __init__(
        self, code: str, message: str, exit_code: ExitCode, *, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        # Shown under the error line instead of the code's entry in _HINTS.
        self.hint = hint
        # click declares exit_code per class; ours varies per instance and click reads it
        # from the instance.
        self.exit_code = int(exit_code)  # type: ignore[misc]
        self.ctx: click.Context | None = None


def _invalid(message: str) -> CliError:
    return CliError("INVALID_ARGUMENT", message, ExitCode.INVALID)


# ---- parsing user input ----

FlagValue = bool | int | float | str | dict[str, Any]
"""A flag value as the CLI handles it (an int is sent as a number)."""

_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INT_RE = re.compile(r"-?\d+")
# Numbers are doubles on the wire: larger integers would silently change.
_MAX_EXACT_INT = 2**53

VALUE_FORMS = (
    "true/false (any case) -> bool; an int or float literal -> number; @PATH (or @- for "
    "stdin) -> the JSON object in that file; text starting with '{' -> a JSON object; "
    "anything else -> a string (--string forces a string)"
)


def parse_flag_value(text: str, *, force_string: bool = False) -> FlagValue:
    """Parse a flag VALUE argument (see ``VALUE_FORMS``).

    Raises:
        ValueError: the text looks like JSON or a number but is not a valid one, or the
            @file cannot be read; the message says what is wrong.
    """
    if force_string:
        return text
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _NUMBER_RE.fullmatch(text):
        return _parse_number(text)
    if text.startswith("@"):
        return _json_object(_read_value_file(text[1:]), f"file {text[1:]}")
    if text.startswith("{"):
        return _json_object(text, "VALUE")
    return text


def _parse_number(text: str) -> int | float:
    if _INT_RE.fullmatch(text):
        number = int(text)
        if abs(number) > _MAX_EXACT_INT:
            raise ValueError(
                f"number {text} is too large to store exactly (limit ±2^53); "
                "use --string to store it as text"
            )
        return number
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _read_value_file(path: str) -> str:
    if not path:
        raise ValueError("'@' needs a file name: @PATH reads a JSON object from PATH, @- stdin")
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {path}: not UTF-8 text ({e.reason})") from e


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
            "(use --string to store the text as a string)"
        ) from e
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{where} must hold a JSON object ({{...}}), not {type(value).__name__}")
    return value


def parse_percent(text: str) -> float:
    """Parse a shedding PERCENT (0 to 100; a trailing ``%`` is allowed).

    Raises:
        ValueError: not a number, or outside 0..100.
    """
    raw = text.removesuffix("%")
    if not _NUMBER_RE.fullmatch(raw):
        raise ValueError(f"PERCENT must be a number from 0 to 100, got {text!r}")
    percent = float(raw)
    if not 0 <= percent <= 100:
        raise ValueError(f"PERCENT must be between 0 and 100, got {text}")
    return percent


def parse_since(text: str, now: datetime) -> datetime:
    """A point in time given as a duration back from ``now`` (``2h``) or an ISO 8601 time."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    except OverflowError:
        raise ValueError(f"{text!r} is too long ago") from None
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration back from now ({DURATION_FORMS}) "
            f"nor a time ({TIME_FORMS})"
        ) from None


if TYPE_CHECKING:
    _ParamType = click.ParamType[Any]
else:  # click < 8.4 has no generic ParamType
    _ParamType = click.ParamType


class _TimeType(_ParamType):
    """An ISO 8601 time, or with ``past_durations`` also a duration back from now."""

    name = "time"

    def __init__(self, *, past_durations: bool = False) -> None:
        self.past_durations = past_durations

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            if self.past_durations:
                return parse_since(str(value), datetime.now(UTC))
            return parse_time(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = DurationParam(positive=True)
TIME = _TimeType()
SINCE = _TimeType(past_durations=True)


# ---- the connection ----


@dataclass
class App:
    """What the global options configure; the servers to call, in order."""

    servers: list[str]
    actor: str
    json_output: bool
    timeout: timedelta
    security: ClientSecurity = field(default_factory=ClientSecurity)
    """TLS, client certificate and token of every call (the global options)."""
    setting_names: Mapping[str, str] = field(default_factory=dict)
    """What a TransportConfigError calls each setting (the option or variable used)."""
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)
    _last_good: str | None = None

    def call(self, rpc: str, request: Message, *, timeout: float | None = None) -> dict[str, Any]:
        """Call MitigationService.<rpc> and return the response in plain form.

        Tries the servers in order, starting with the one that last answered, and moves on
        to the next only when a server could not be reached at all (see
        ``_never_reached``): an error a server answered is final, so a write that may have
        been applied is never sent a second time. Each attempt has its own deadline
        (``timeout`` seconds, else --timeout).

        Raises:
            CliError: the call failed; the exit code follows ``exit_code_for_status``.
        """
        import grpc

        write = _is_write(request)
        deadline = self.timeout.total_seconds() if timeout is None else timeout
        failures: list[str] = []
        for target in self._order():
            stub = self._stub(target)
            metadata = self._metadata()
            try:
                response = getattr(stub, rpc)(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.UNAVAILABLE and _never_reached(details, write=write):
                    failures.append(f"{target}: {details or code.name}")
                    continue
                raise _call_error(target, code, details, write=write, token=bool(metadata)) from e
            self._last_good = target
            return fmt.to_plain(response)
        raise _no_server(failures, self.security)

    def stream(self, rpc: str, request: Message) -> Generator[dict[str, Any], None, None]:
        """Call the server-streaming MitigationService.<rpc>; yield each response, plain.

        Fails over like ``call`` until a server sends the first response; no deadline,
        since a stream lasts until it is stopped. The stream is cancelled when the
        generator is closed.

        Raises:
            CliError: the call failed, before or after its first response.
        """
        import grpc

        failures: list[str] = []
        for target in self._order():
            stub = self._stub(target)
            metadata = self._metadata()
            token = bool(metadata)
            responses: Any = getattr(stub, rpc)(request, metadata=metadata)
            try:
                first = next(responses)
            except StopIteration:
                raise CliError(
                    "UNAVAILABLE", f"{target}: the server ended the stream", ExitCode.UNAVAILABLE
                ) from None
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.UNAVAILABLE and _never_reached(details, write=False):
                    failures.append(f"{target}: {details or code.name}")
                    continue
                raise _call_error(target, code, details, write=False, token=token) from e
            self._last_good = target
            try:
                yield fmt.to_plain(first)
                for response in responses:
                    yield fmt.to_plain(response)
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                raise _call_error(target, code, details, write=False, token=token) from e
            finally:
                responses.cancel()
            raise CliError(
                "UNAVAILABLE", f"{target}: the server ended the stream", ExitCode.UNAVAILABLE
            )
        raise _no_server(failures, self.security)

    def _order(self) -> list[str]:
        """The servers to try: the one that last answered first, then the rest in order."""
        if self._last_good is None:
            return list(self.servers)
        return [self._last_good, *(s for s in self.servers if s != self._last_good)]

    def _stub(self, target: str) -> Any:
        from controlplane.api.v1 import mitigation_pb2_grpc

        # The generated stub is untyped; responses go straight to fmt.to_plain.
        stub_class: Any = mitigation_pb2_grpc.MitigationServiceStub
        return stub_class(self._channel(target))

    def _channel(self, target: str) -> grpc.Channel:
        channel = self._channels.get(target)
        if channel is None:
            try:
                channel = self.security.channel(target)
            except TransportConfigError as e:
                raise setting_error(e, self.setting_names) from None
            self._channels[target] = channel
        return channel

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The token's metadata, the token file read now (it may have been rotated)."""
        try:
            return self.security.metadata()
        except TransportConfigError as e:
            raise setting_error(e, self.setting_names) from None

    def close(self) -> None:
        """Close every channel opened; idempotent."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.close()


# UNAVAILABLE details our server sends (controlplane.store): it was reached and answered,
# but its etcd did not; a write may have been committed all the same.
_SERVER_UNAVAILABLE_PREFIXES = ("etcd is unreachable", "etcd refused")
# gRPC's own details (lowercased) when it had no connection to send the call on: the server
# never saw it. Anything else from gRPC (a connection lost mid-call) may come after it did.
_NOT_CONNECTED_MARKERS = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "name resolution",
)
OUTCOME_UNKNOWN = (
    "the write may or may not have been applied: check with `get` or `history` before retrying"
)


# In gRPC's details of a failed TLS connection (lowercased), never in a host name.
_TLS_FAILURE_MARKERS = ("handshake failed", "ssl_error", "certificate_", "hostname verification")
TLS_FAILURE_HINT = (
    "the TLS handshake failed: --tls-ca must be the CA that signed the server's certificate, "
    "whose names must include the server's host (else --tls-server-name); a server that "
    "requires mutual TLS needs --tls-cert and --tls-key"
)
PLAINTEXT_CLOSED_HINT = (
    "the server closed the connection: if it requires TLS, connect with --tls-ca (or --tls)"
)
NO_CLIENT_CERT_HINT = (
    "the server closed the connection during the TLS handshake: if it requires mutual TLS, "
    "give a client certificate signed by a CA it trusts (--tls-cert and --tls-key)"
)


def _no_server(failures: Sequence[str], security: ClientSecurity | None = None) -> CliError:
    lowered = " ".join(failures).lower()
    hint: str | None = None
    if any(marker in lowered for marker in _TLS_FAILURE_MARKERS):
        hint = TLS_FAILURE_HINT
    elif security is not None and "socket closed" in lowered:
        # What a plaintext client sees of a TLS server, or a TLS client without a
        # certificate of a server that requires one.
        if not security.uses_tls:
            hint = PLAINTEXT_CLOSED_HINT
        elif security.cert is None:
            hint = NO_CLIENT_CERT_HINT
    return CliError(
        "UNAVAILABLE",
        f"no server reachable ({'; '.join(failures)})",
        ExitCode.UNAVAILABLE,
        hint=hint,
    )


def setting_error(error: TransportConfigError, names: Mapping[str, str]) -> click.UsageError:
    """A connection setting's error as a usage error (exit 2), naming the option used."""
    return click.UsageError(error.render({**CLI_SETTING_NAMES, **names}))


def _is_write(request: Message) -> bool:
    """Whether ``request`` may change something: it has WriteOptions and is no dry run."""
    field = request.DESCRIPTOR.fields_by_name.get("options")
    if field is None or field.message_type is None:
        return False
    if field.message_type.full_name != "controlplane.api.v1.WriteOptions":
        return False
    return not getattr(request, "options").dry_run  # noqa: B009


def _never_reached(details: str, *, write: bool) -> bool:
    """Whether an UNAVAILABLE call never reached a server, so the next one may be tried.

    An UNAVAILABLE our server sends (it could not use its etcd) means it was reached. Any
    other UNAVAILABLE comes from gRPC itself: for a read that is enough; a write moves on
    only when gRPC says it never had a connection, since a connection lost mid-call may
    have delivered it.
    """
    if details.startswith(_SERVER_UNAVAILABLE_PREFIXES):
        return False
    if not write:
        return True
    lowered = details.lower()
    return any(marker in lowered for marker in _NOT_CONNECTED_MARKERS)


def _call_error(
    target: str, code: grpc.StatusCode, details: str, *, write: bool, token: bool = False
) -> CliError:
    """The error for a failed call that is not tried on another server.

    ``token`` says whether the call carried a token (for the hint of a refusal).
    """
    message = details or code.name
    hint: str | None = None
    if code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        # The server's details say what was refused and which role it takes.
        message = f"{target} refused the call ({code.name}): {message}"
        if not token:
            hint = ANONYMOUS_HINT
        elif code.name == "UNAUTHENTICATED":
            hint = REFUSED_HINT
        else:
            hint = ROLE_HINT
    elif code.name == "UNAVAILABLE":
        message = f"{target}: {message}"
        if details.startswith(_SERVER_UNAVAILABLE_PREFIXES):
            hint = "the server answered but could not use its etcd: not tried on another server"
        else:
            hint = "the connection to the server was lost during the call"
        if write:
            hint += f"; {OUTCOME_UNKNOWN}"
    elif code.name == "DEADLINE_EXCEEDED":
        message = f"{target}: {message}"
        if write:
            hint = "no answer within --timeout, so not tried on another server; " + OUTCOME_UNKNOWN
    return CliError(code.name, message, exit_code_for_status(code), hint=hint)


def _respond(
    app: App,
    doc: Mapping[str, Any],
    render: Callable[[Mapping[str, Any], datetime], fmt.Rendered],
) -> None:
    """Print a command's result: one JSON document, or human lines (+ warnings on stderr)."""
    if app.json_output:
        click.echo(fmt.dumps(doc))
        return
    rendered = render(doc, datetime.now(UTC))
    for line in rendered.lines:
        click.echo(line)
    for warning in rendered.warnings:
        click.echo(warning, err=True)


# ---- write options ----

REASON_REQUIRED = (
    '--reason is required: say why you make this change, e.g. --reason "error rate 40% '
    'after the 14:02 deploy"; it goes to the audit log for the post-mortem'
)


@dataclass(frozen=True)
class WriteArgs:
    """The options every write takes."""

    reason: str
    incident: str = ""
    ttl: timedelta | None = None
    until: datetime | None = None
    expect_revision: int | None = None
    dry_run: bool = False

    def to_proto(self, actor: str) -> types_pb2.WriteOptions:
        from controlplane.api.v1 import types_pb2

        options = types_pb2.WriteOptions(
            reason=self.reason,
            incident=self.incident,
            dry_run=self.dry_run,
            actor=actor,
        )
        if self.ttl is not None:
            options.ttl.FromTimedelta(self.ttl)
        if self.until is not None:
            options.expires_at.FromDatetime(self.until)
        if self.expect_revision is not None:
            options.expected_mod_revision = self.expect_revision
        return options


_WRITE_OPTIONS = (
    click.option(
        "--reason",
        metavar="TEXT",
        help="Why you make this change. Required; recorded in the audit log.",
    ),
    click.option("--incident", default="", metavar="ID", help="Incident id, e.g. INC-42."),
    click.option(
        "--ttl",
        type=DURATION,
        help="Time-box the change (30m, 2h, 1h30m): then what it replaced applies again.",
    ),
    click.option(
        "--until",
        type=TIME,
        help="Time-box the change until this time (2026-11-26T18:00Z; UTC without offset).",
    ),
    click.option(
        "--expect-revision",
        type=click.IntRange(min=0),
        metavar="N",
        help="Compare-and-set: apply only if the record's revision is N (0: only if it "
        "does not exist); else exit 4.",
    ),
    click.option(
        "--dry-run", is_flag=True, help="Show what would change and where; write nothing."
    ),
)


def write_command(f: Callable[..., None]) -> Callable[..., None]:
    """Add the write options to a command; it receives them as ``write: WriteArgs``.

    Checks them before the command runs, so a missing --reason fails before any call.
    """

    @functools.wraps(f)
    def wrapper(
        *args: Any,
        reason: str | None,
        incident: str,
        ttl: timedelta | None,
        until: datetime | None,
        expect_revision: int | None,
        dry_run: bool,
        **kwargs: Any,
    ) -> None:
        ctx = click.get_current_context()
        if reason is None or not reason.strip():
            raise click.UsageError(REASON_REQUIRED, ctx=ctx)
        if ttl is not None and until is not None:
            raise click.UsageError(
                "--ttl and --until both set an expiry: give one of them", ctx=ctx
            )
        if until is not None and until <= datetime.now(UTC):
            raise _invalid(f"--until {fmt.iso(until)} is in the past")
        write = WriteArgs(reason.strip(), incident, ttl, until, expect_revision, dry_run)
        f(*args, write=write, **kwargs)

    for option in reversed(_WRITE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


# ---- --wait: until the instances applied a change ----

DEFAULT_WAIT_TIMEOUT = timedelta(seconds=10)
# The server's limit for one WaitApplied.
MAX_WAIT_TIMEOUT = timedelta(seconds=300)
# A later service of a multi-service wait still gets a quick look when the time is up.
_MIN_WAIT_SECONDS = 0.05

WAIT_NEEDS_SERVICE = (
    "--wait needs a service scope; for a global flag name the service with --wait-service S"
)

# Outcomes of fmt.wait_outcome: exit code and error code name.
_WAIT_EXIT: dict[str, tuple[ExitCode, str]] = {
    "applied": (ExitCode.OK, "OK"),
    "no_instances": (ExitCode.WAIT_NO_INSTANCES, "WAIT_NO_INSTANCES"),
    "timed_out": (ExitCode.WAIT_TIMEOUT, "WAIT_TIMEOUT"),
    "rejected": (ExitCode.REJECTED, "REJECTED"),
}

_WAIT_HINTS: dict[str, str] = {
    "no_instances": "the change is written (rev {revision}), but no instance is connected to "
    "apply it",
    "timed_out": "the change is written (rev {revision}); the pending instances may still "
    "apply it: `cpctl status {service}` shows each one's applied revision",
    "rejected": "the change is written (rev {revision}) and applies where it was accepted; "
    "fix the rejecting instances or undo the change",
}

# What a service name looks like (the server's rule), checked before anything is written.
_SERVICE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def wait_exit_code(outcome: str) -> ExitCode:
    """The exit code of a wait's outcome (``fmt.wait_outcome`` / ``fmt.worst_outcome``)."""
    return _WAIT_EXIT[outcome][0]


@dataclass(frozen=True)
class WaitArgs:
    """--wait and its options: wait after a changed write until its instances applied it."""

    enabled: bool = False
    timeout: timedelta = DEFAULT_WAIT_TIMEOUT
    services: tuple[str, ...] = ()


def _check_wait_services(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for service in value:
        if service == "global" or not _SERVICE_RE.fullmatch(service):
            raise click.BadParameter(
                f"{service!r} is not a service name (a DNS label: a-z, 0-9 and '-')",
                ctx=ctx,
                param=param,
            )
    return value


def wait_command(*, service_option: bool = False) -> Callable[[Callable[..., None]], Any]:
    """Add --wait and --wait-timeout (and --wait-service) to a write command.

    The command receives them as ``wait: WaitArgs``; --wait-timeout and --wait-service
    imply --wait.
    """

    def decorate(f: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(f)
        def wrapper(
            *args: Any,
            wait: bool,
            wait_timeout: timedelta | None,
            wait_service: tuple[str, ...] = (),
            **kwargs: Any,
        ) -> None:
            ctx = click.get_current_context()
            timeout = wait_timeout if wait_timeout is not None else DEFAULT_WAIT_TIMEOUT
            if timeout > MAX_WAIT_TIMEOUT:
                raise click.BadParameter(
                    f"at most {fmt.format_age(MAX_WAIT_TIMEOUT)} (the server's limit)",
                    ctx=ctx,
                    param_hint="'--wait-timeout'",
                )
            enabled = wait or wait_timeout is not None or bool(wait_service)
            f(*args, wait=WaitArgs(enabled, timeout, tuple(wait_service)), **kwargs)

        options = [
            click.option(
                "--wait",
                is_flag=True,
                help="After the change is written, wait until every connected instance "
                "applied it: exit 8 if some did not within --wait-timeout, 9 if none is "
                "connected, 10 if one rejected it.",
            ),
            click.option(
                "--wait-timeout",
                type=DURATION,
                metavar="DURATION",
                help="How long --wait waits (implies --wait; at most 5m).  [default: 10s]",
            ),
        ]
        if service_option:
            options.append(
                click.option(
                    "--wait-service",
                    multiple=True,
                    metavar="S",
                    callback=_check_wait_services,
                    help="For a global flag: a service whose instances --wait waits for "
                    "(repeatable; implies --wait).",
                )
            )
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def scope_wait_services(scope: str, wait: WaitArgs) -> tuple[str, ...]:
    """The services to wait for after a write to a flag in ``scope``.

    Raises:
        click.UsageError: a global flag without --wait-service, or --wait-service with a
            service scope (that service is the one waited for).
    """
    if not wait.enabled:
        return ()
    if scope == "global":
        if not wait.services:
            raise click.UsageError(WAIT_NEEDS_SERVICE)
        return wait.services
    if wait.services:
        raise click.UsageError(
            f"--wait-service is for a global flag; {scope} is a service: --wait waits for it"
        )
    return (scope,)


def key_services(keys: Iterable[str]) -> tuple[list[str], bool]:
    """The services a bundle's keys (``flags/checkout/new-ui``, ``pins/checkout``) concern,
    and whether any is a global flag."""
    services: set[str] = set()
    has_global = False
    for key in keys:
        parts = key.split("/")
        if len(parts) < 2 or not parts[1]:
            continue
        if parts[1] == "global":
            has_global = True
        else:
            services.add(parts[1])
    return sorted(services), has_global


def change_services(changes: Iterable[Mapping[str, Any]]) -> tuple[list[str], bool]:
    """The services a bundle's changes (``BundleChange`` documents) concern, and whether any
    is a global flag."""
    services: set[str] = set()
    has_global = False
    for change in changes:
        for body in change.values():
            if not isinstance(body, Mapping):
                continue
            scope = str(body.get("service") or body.get("scope") or "")
            if scope == "global":
                has_global = True
            elif scope:
                services.add(scope)
    return sorted(services), has_global


def _wait_applied(
    app: App, services: Sequence[str], revision: int, timeout: timedelta, started: float
) -> dict[str, Any]:
    """WaitApplied for each service, within one --wait-timeout; a ``Wait`` document."""
    from controlplane.api.v1 import mitigation_pb2

    deadline = time.monotonic() + timeout.total_seconds()
    results = []
    for service in services:
        left = max(deadline - time.monotonic(), _MIN_WAIT_SECONDS)
        request = mitigation_pb2.WaitAppliedRequest(service=service, revision=revision)
        request.timeout.FromTimedelta(timedelta(seconds=left))
        # The server answers at the end of the wait: the deadline covers it and a call.
        plain = app.call("WaitApplied", request, timeout=left + app.timeout.total_seconds())
        seconds = round(time.monotonic() - started, 3)
        results.append(
            {"service": service, "outcome": fmt.wait_outcome(plain), "seconds": seconds, **plain}
        )
    return {
        "outcome": fmt.worst_outcome(r["outcome"] for r in results),
        "revision": revision,
        "seconds": round(time.monotonic() - started, 3),
        "services": results,
    }


def _write(
    app: App,
    rpc: str,
    request: Message,
    render: Callable[[Mapping[str, Any], datetime], fmt.Rendered],
    wait: WaitArgs,
    services: Callable[[Mapping[str, Any]], Sequence[str]],
) -> None:
    """Make a write, print its result and, with --wait, wait for its instances.

    ``services(doc)`` names the services to wait for, from the response. With --json the
    document gains ``wait``: a ``Wait`` document, or null when nothing was written (an
    unchanged write or a dry run: nothing to wait for, exit 0).

    Raises:
        CliError: the write failed, or the wait did not end with every instance applying
            the change (exit 8, 9 or 10; the message names the instances).
    """
    started = time.monotonic()
    doc = app.call(rpc, request)
    if not wait.enabled:
        _respond(app, doc, render)
        return
    if not app.json_output:
        # People see the change land at once, before the wait.
        _respond(app, doc, render)
    result = doc.get("result") or {}
    revision = int(result.get("revision") or 0)
    report: dict[str, Any] | None = None
    failure: CliError | None = None
    if result.get("changed") and not result.get("dry_run") and revision > 0:
        chosen = list(services(doc))
        if chosen:
            try:
                report = _wait_applied(app, chosen, revision, wait.timeout, started)
            except CliError as e:
                e.hint = f"the change is written (rev {revision}), but --wait failed: " + (
                    e.hint or _HINTS.get(e.code, e.code)
                )
                failure = e
        elif not app.json_output:
            click.echo("note: nothing to wait for: no service's own record changed", err=True)
    if app.json_output:
        click.echo(fmt.dumps({**doc, "wait": report}))
    elif report is not None:
        for line in fmt.render_wait(report).lines:
            click.echo(line)
    if failure is not None:
        raise failure
    if report is not None and report["outcome"] != "applied":
        exit_code, code = _WAIT_EXIT[report["outcome"]]
        problems = fmt.render_wait(report).problems
        worst = next(s for s in report["services"] if s["outcome"] == report["outcome"])
        hint = _WAIT_HINTS[report["outcome"]].format(revision=revision, service=worst["service"])
        raise CliError(
            code, "\n".join(f"--wait: {problem}" for problem in problems), exit_code, hint=hint
        )


# ---- the command line ----


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


ENV_TOKEN = "CPCTL_TOKEN"  # noqa: S105  # a variable's name, not a token
"""The variable that holds the bearer token (no option does: see --token-file)."""

CLI_SETTING_NAMES: Mapping[str, str] = {
    "token": ENV_TOKEN,
    "token_file": "--token-file",
    "tls": "--tls",
    "ca": "--tls-ca",
    "cert": "--tls-cert",
    "key": "--tls-key",
    "server_name": "--tls-server-name",
    "insecure": "--insecure",
}
"""What cpctl's errors call each connection setting (``controlplane.transport``)."""

# Connection setting -> (click parameter, environment variable).
_SECURITY_PARAMS: dict[str, tuple[str, str]] = {
    "token_file": ("token_file", "CPCTL_TOKEN_FILE"),
    "tls": ("tls", "CPCTL_TLS"),
    "ca": ("tls_ca", "CPCTL_TLS_CA"),
    "cert": ("tls_cert", "CPCTL_TLS_CERT"),
    "key": ("tls_key", "CPCTL_TLS_KEY"),
    "server_name": ("tls_server_name", "CPCTL_TLS_SERVER_NAME"),
    "insecure": ("insecure", "CPCTL_INSECURE"),
}

CONNECTION_HELP = (
    "Connections: plaintext goes only to a server on loopback (127.0.0.0/8, ::1, localhost, "
    "a unix: socket); any other needs TLS (--tls-ca PATH, or --tls for the system's CA "
    "roots; --tls-cert and --tls-key add a client certificate for mutual TLS) or --insecure. "
    f"The bearer token comes from {ENV_TOKEN} or from the file in --token-file "
    "(CPCTL_TOKEN_FILE); deliberately there is no --token option: command lines show up in "
    "`ps` and in shell history. A bad combination, an unreadable file or plaintext off "
    "loopback exits 2 naming the option; a token the server refuses exits 7."
)


def _shape_lines(name: str, keys: Sequence[str], pad: int, width: int = 78) -> list[str]:
    lines, line = [], f"  {name:<{pad}} {{"
    for i, key in enumerate(keys):
        item = key + (", " if i < len(keys) - 1 else "}")
        if len(line) + len(item) > width:
            lines.append(line.rstrip())
            line = " " * (pad + 4)
        line += item
    return [*lines, line]


_EPILOG = "\n\n".join(
    [
        "\b\nExit codes:\n"
        + "\n".join(
            line
            for code, text in _EXIT_CODE_HELP.items()
            for line in textwrap.wrap(
                text, width=94, initial_indent=f"  {int(code):>3}  ", subsequent_indent=" " * 7
            )
        ),
        f"Durations: {DURATION_FORMS}.",
        f"Times: {TIME_FORMS}.",
        f"Flag values: {VALUE_FORMS}.",
        CONNECTION_HELP,
        "--json prints exactly one JSON document on stdout: the server's response with its "
        "proto field names (snake_case). Times are ISO 8601 UTC strings, revisions integers, "
        "an absent record null; a flag's value is a plain JSON value (true, 50, "
        '"read-only", {...}); an audit entry\'s before and after are the records as JSON '
        "objects. Each command's help gives its top-level keys. Errors go to "
        'stderr as {"error": {"code": "ABORTED", "message": "...", "exit_code": 4}}. '
        "`watch --json` prints JSON Lines instead: one AuditEntry per line, as changes are "
        "made.",
        '--wait adds "wait" to a write\'s document: a Wait object (null when nothing was '
        "written, so nothing was waited for) with one WaitService per service. Its outcome: "
        "applied (exit 0), no_instances (9), timed_out (8) or rejected (10); several "
        "services take the most serious, in that order.",
        "\b\nJSON objects:\n"
        + "\n".join(
            line
            for name, keys in fmt.JSON_SHAPES.items()
            for line in _shape_lines(name, keys, max(map(len, fmt.JSON_SHAPES)))
        ),
    ]
)


class _Cpctl(click.Group):
    """The root group: turns every failure into one error report and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        # In the order of an incident (flags, shedding, pins, then follow-up), not A-Z.
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as e:
            e.ctx = e.ctx or ctx
            raise
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            error = CliError("INTERNAL", f"{type(e).__name__}: {e}", ExitCode.ERROR)
            error.ctx = ctx
            raise error from e

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            code = e.exit_code
        except click.ClickException as e:
            code = _report(e, _json_wanted(e, argv))
        except click.Abort:
            interrupted = CliError("CANCELLED", "interrupted", ExitCode.INTERRUPTED)
            code = _report(interrupted, _json_wanted(interrupted, argv))
        except BrokenPipeError:
            # The reader went away (`cpctl history | head`): nothing left to say to it.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            code = ExitCode.ERROR
        else:
            code = result if isinstance(result, int) else ExitCode.OK
        sys.exit(int(code))


def _json_wanted(error: click.ClickException, argv: Sequence[str]) -> bool:
    ctx = getattr(error, "ctx", None)
    if isinstance(ctx, click.Context) and isinstance(ctx.find_root().obj, App):
        return bool(ctx.find_root().obj.json_output)
    # The global options were not parsed (the error is in them): look for --json directly.
    env = os.environ.get("CPCTL_JSON", "").strip().lower()
    return "--json" in argv or env in ("1", "true", "yes", "on", "t", "y")


def _report(error: click.ClickException, as_json: bool) -> int:
    if isinstance(error, CliError):
        code = error.code
    elif isinstance(error, click.UsageError):
        code = "USAGE"
    else:
        code = "INVALID_ARGUMENT" if error.exit_code == ExitCode.INVALID else "UNKNOWN"
    message = error.format_message()
    if as_json:
        report = {"error": {"code": code, "message": message, "exit_code": error.exit_code}}
        click.echo(json.dumps(report, ensure_ascii=False), err=True)
        return error.exit_code
    click.echo(f"error: {message}", err=True)
    if isinstance(error, click.UsageError) and error.ctx is not None:
        click.echo(f"usage: {error.ctx.get_usage().removeprefix('Usage: ')}", err=True)
        click.echo(f"see: {error.ctx.command_path} --help", err=True)
    else:
        hint = error.hint if isinstance(error, CliError) else None
        hint = hint or _HINTS.get(code)
        if hint:
            click.echo(f"hint: {hint}", err=True)
    return error.exit_code


@click.group(
    cls=_Cpctl,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--server",
    envvar="CPCTL_SERVER",
    default="127.0.0.1:50051",
    show_default=True,
    show_envvar=True,
    metavar="HOST:PORT[,...]",
    help="Control server(s); a comma-separated list is tried in order when one cannot be reached.",
)
@click.option(
    "--actor",
    envvar="CPCTL_ACTOR",
    default=_default_actor,
    show_default="your OS user",
    show_envvar=True,
    help="Who makes the change, for the audit log; a server that authenticates callers "
    "records the token's identity instead.",
)
@click.option(
    "--json",
    "json_output",
    is_flag=True,
    envvar="CPCTL_JSON",
    show_envvar=True,
    help="Print one JSON document on stdout (errors as JSON on stderr).",
)
@click.option(
    "--timeout",
    type=DURATION,
    default="10s",
    envvar="CPCTL_TIMEOUT",
    show_default=True,
    show_envvar=True,
    help="Deadline of each call to a server.",
)
@click.option(
    "--tls",
    is_flag=True,
    envvar="CPCTL_TLS",
    show_envvar=True,
    help="Connect with TLS, verifying the server against the system's CA roots (implied by "
    "--tls-ca and --tls-cert).",
)
@click.option(
    "--tls-ca",
    envvar="CPCTL_TLS_CA",
    show_envvar=True,
    metavar="PATH",
    help="CA certificates (PEM) that verify the server; turns TLS on.",
)
@click.option(
    "--tls-cert",
    envvar="CPCTL_TLS_CERT",
    show_envvar=True,
    metavar="PATH",
    help="Client certificate (PEM) for mutual TLS; needs --tls-key; turns TLS on.",
)
@click.option(
    "--tls-key",
    envvar="CPCTL_TLS_KEY",
    show_envvar=True,
    metavar="PATH",
    help="The client certificate's private key (PEM).",
)
@click.option(
    "--tls-server-name",
    envvar="CPCTL_TLS_SERVER_NAME",
    show_envvar=True,
    metavar="NAME",
    help="Verify the server's certificate for NAME instead of the host in --server.",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="CPCTL_INSECURE",
    show_envvar=True,
    help="Allow plaintext to a server that is not on loopback (the token, if any, then "
    "crosses the network readable).",
)
@click.option(
    "--token-file",
    envvar="CPCTL_TOKEN_FILE",
    show_envvar=True,
    metavar="PATH",
    help="File holding the bearer token sent with every call. Or put the token in "
    "CPCTL_TOKEN; there is no --token option, since command lines show up in `ps` and in "
    "shell history.",
)
@click.version_option(__version__, "--version", prog_name="cpctl")
@click.pass_context
def cli(
    ctx: click.Context,
    server: str,
    actor: str,
    json_output: bool,
    timeout: timedelta,
    tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_server_name: str | None,
    insecure: bool,
    token_file: str | None,
) -> None:
    """Change and inspect mitigations: kill switches and flags, load shedding, version pins.

    Every change takes --reason and is audited; it can be time-boxed (--ttl, --until),
    conditional (--expect-revision) or tried first (--dry-run). Re-running a change that is
    already in place prints "unchanged" and exits 0.

    \b
    Examples:
      cpctl flag set checkout new-ui false --reason "errors after deploy" --ttl 30m
      cpctl flag get checkout new-ui --effective
      cpctl shed set checkout 50 --tier SHEDDABLE_PLUS --reason "overload" --incident INC-42
      cpctl rollback checkout --reason "bad release" --wait
      cpctl bundle apply degrade-checkout.yaml --incident INC-42 --wait
      cpctl status checkout
      cpctl --json watch checkout
      cpctl history --service checkout --since 2h
    """
    servers = [s.strip() for s in server.split(",") if s.strip()]
    if not servers:
        raise click.BadParameter("give at least one HOST:PORT", ctx=ctx, param_hint="'--server'")
    # An error names the setting as the user gave it: the option, or its variable.
    names = {
        setting: envvar
        for setting, (param, envvar) in _SECURITY_PARAMS.items()
        if ctx.get_parameter_source(param) is click.core.ParameterSource.ENVIRONMENT
    }
    token = os.environ.get(ENV_TOKEN, "").strip() or None
    if token_file and ctx.get_parameter_source("token_file") is (
        click.core.ParameterSource.COMMANDLINE
    ):
        token = None  # the option given for this command wins over the environment
    try:
        security = ClientSecurity(
            token=token,
            token_file=path_or_none(token_file),
            tls=tls,
            ca=path_or_none(tls_ca),
            cert=path_or_none(tls_cert),
            key=path_or_none(tls_key),
            server_name=(tls_server_name or "").strip() or None,
            insecure=insecure,
        )
        for target in servers:
            security.check_target(target)
    except TransportConfigError as e:
        raise setting_error(e, names) from None
    app = App(servers, actor or _default_actor(), json_output, timeout, security, names)
    ctx.obj = app
    ctx.call_on_close(app.close)


def _value_error(e: ValueError) -> CliError:
    return _invalid(str(e))


# ---- flags ----


@cli.group()
def flag() -> None:
    """Kill switches and flag values (bool, number, string, JSON object).

    SCOPE is "global" (the default of every service) or a service name; a service's own
    value wins over the global one.
    """


@flag.command("set")
@click.argument("scope")
@click.argument("name")
@click.argument("value")
@click.option("--string", "force_string", is_flag=True, help="Store VALUE as a string, as is.")
@write_command
@wait_command(service_option=True)
@click.pass_obj
def flag_set(
    app: App,
    scope: str,
    name: str,
    value: str,
    force_string: bool,
    write: WriteArgs,
    wait: WaitArgs,
) -> None:
    """Set flag NAME in SCOPE to VALUE.

    VALUE: true/false -> bool; 50 or 0.5 -> number; @PATH -> the JSON object in a file
    (@- reads stdin); {"mode": "lite"} -> a JSON object; anything else -> a string.

    JSON: {result: WriteResult, flag: Flag, previous: Flag|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    try:
        parsed = parse_flag_value(value, force_string=force_string)
    except ValueError as e:
        raise _value_error(e) from e
    services = scope_wait_services(scope, wait)
    request = mitigation_pb2.SetFlagRequest(
        scope=scope, name=name, value=flag_value_proto(parsed), options=write.to_proto(app.actor)
    )
    _write(app, "SetFlag", request, fmt.render_flag_set, wait, lambda _: services)


@flag.command("get")
@click.argument("scope")
@click.argument("name")
@click.option(
    "--effective", is_flag=True, help="For a service: the value it sees (its own, else global)."
)
@click.pass_obj
def flag_get(app: App, scope: str, name: str, effective: bool) -> None:
    """Show flag NAME in SCOPE, who set it, why and until when.

    JSON: {flag: Flag, overridden_by: [service, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.GetFlagRequest(scope=scope, name=name, effective=effective)
    doc = app.call("GetFlag", request)
    _respond(app, doc, lambda d, now: fmt.render_flag_get(d, now, scope, name))


@flag.command("list")
@click.argument("scope", required=False, default="")
@click.option("--effective", is_flag=True, help="With a service: include the global flags it sees.")
@click.pass_obj
def flag_list(app: App, scope: str, effective: bool) -> None:
    """List flags, of every scope or of SCOPE.

    JSON: {flags: [Flag, ...], revision: N}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ListFlagsRequest(scope=scope, effective=effective)
    _respond(app, app.call("ListFlags", request), fmt.render_flag_list)


@flag.command("clear")
@click.argument("scope")
@click.argument("name")
@click.option(
    "--all-layers", is_flag=True, help="Remove every time-boxed layer, not only the top one."
)
@write_command
@wait_command(service_option=True)
@click.pass_obj
def flag_clear(
    app: App, scope: str, name: str, all_layers: bool, write: WriteArgs, wait: WaitArgs
) -> None:
    """Remove flag NAME from SCOPE (what it replaced, if time-boxed, applies again).

    JSON: {result: WriteResult, removed: Flag|null, restored: Flag|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    services = scope_wait_services(scope, wait)
    request = mitigation_pb2.ClearFlagRequest(
        scope=scope, name=name, all_layers=all_layers, options=write.to_proto(app.actor)
    )

    def render(doc: Mapping[str, Any], now: datetime) -> fmt.Rendered:
        return fmt.render_flag_clear(doc, now, scope, name)

    _write(app, "ClearFlag", request, render, wait, lambda _: services)


def flag_value_proto(value: FlagValue) -> types_pb2.FlagValue:
    """The wire form of a flag value (a JSON object is sent as compact text)."""
    from controlplane.api.v1 import types_pb2

    if isinstance(value, bool):
        return types_pb2.FlagValue(bool_value=value)
    if isinstance(value, int | float):
        return types_pb2.FlagValue(number_value=float(value))
    if isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return types_pb2.FlagValue(json_value=text)
    return types_pb2.FlagValue(string_value=value)


# ---- shedding ----

TIERS = ("SHEDDABLE", "SHEDDABLE_PLUS", "CRITICAL", "CRITICAL_PLUS")


@cli.group()
def shed() -> None:
    """Load shedding: shed every request less critical than a tier, and PERCENT of it.

    \b
    Tiers, least to most important: SHEDDABLE, SHEDDABLE_PLUS, CRITICAL, CRITICAL_PLUS.
      shed set checkout 30                        30% of SHEDDABLE
      shed set checkout 100 --tier SHEDDABLE_PLUS  all SHEDDABLE and SHEDDABLE_PLUS
      shed set checkout 20 --tier CRITICAL         all sheddable requests, 20% of CRITICAL
    """


@shed.command("set")
@click.argument("service")
@click.argument("percent", metavar="PERCENT")
@click.option(
    "--tier",
    type=click.Choice(TIERS, case_sensitive=False),
    help="The tier PERCENT applies to; every less critical request is shed.  [default: SHEDDABLE]",
)
@write_command
@wait_command()
@click.pass_obj
def shed_set(
    app: App, service: str, percent: str, tier: str | None, write: WriteArgs, wait: WaitArgs
) -> None:
    """Shed PERCENT (0 to 100) of the tier's requests of SERVICE.

    JSON: {result: WriteResult, shedding: Shedding, previous: Shedding|null}
    (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    try:
        value = parse_percent(percent)
    except ValueError as e:
        raise _value_error(e) from e
    request = mitigation_pb2.SetSheddingRequest(
        service=service,
        tier=tier.upper() if tier else "TIER_UNSPECIFIED",
        percent=value,
        options=write.to_proto(app.actor),
    )
    _write(app, "SetShedding", request, fmt.render_shed_set, wait, lambda _: (service,))


@shed.command("get")
@click.argument("service")
@click.pass_obj
def shed_get(app: App, service: str) -> None:
    """Show the shedding level of SERVICE.

    JSON: {shedding: Shedding|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("GetShedding", mitigation_pb2.GetSheddingRequest(service=service))
    _respond(app, doc, lambda d, now: fmt.render_shed_get(d, now, service))


@shed.command("list")
@click.pass_obj
def shed_list(app: App) -> None:
    """List the services that shed load.

    JSON: {shedding: [Shedding, ...], revision: N}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("ListShedding", mitigation_pb2.ListSheddingRequest())
    _respond(app, doc, fmt.render_shed_list)


@shed.command("clear")
@click.argument("service")
@click.option(
    "--all-layers", is_flag=True, help="Remove every time-boxed layer, not only the top one."
)
@write_command
@wait_command()
@click.pass_obj
def shed_clear(app: App, service: str, all_layers: bool, write: WriteArgs, wait: WaitArgs) -> None:
    """Stop shedding load on SERVICE.

    JSON: {result: WriteResult, removed: Shedding|null, restored: Shedding|null}
    (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ClearSheddingRequest(
        service=service, all_layers=all_layers, options=write.to_proto(app.actor)
    )

    def render(doc: Mapping[str, Any], now: datetime) -> fmt.Rendered:
        return fmt.render_shed_clear(doc, now, service)

    _write(app, "ClearShedding", request, render, wait, lambda _: (service,))


# ---- pins, known-good versions, rollback ----


@cli.group()
def pin() -> None:
    """Pin a service to a version (its deploy hook redeploys it)."""


@pin.command("set")
@click.argument("service")
@click.argument("version")
@write_command
@wait_command()
@click.pass_obj
def pin_set(app: App, service: str, version: str, write: WriteArgs, wait: WaitArgs) -> None:
    """Pin SERVICE to VERSION.

    JSON: {result: WriteResult, pin: Pin, previous: Pin|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.PinVersionRequest(
        service=service, version=version, options=write.to_proto(app.actor)
    )
    _write(app, "PinVersion", request, fmt.render_pin_set, wait, lambda _: (service,))


@pin.command("get")
@click.argument("service")
@click.pass_obj
def pin_get(app: App, service: str) -> None:
    """Show the pin of SERVICE.

    JSON: {pin: Pin|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("GetPin", mitigation_pb2.GetPinRequest(service=service))
    _respond(app, doc, lambda d, now: fmt.render_pin_get(d, now, service))


@pin.command("list")
@click.pass_obj
def pin_list(app: App) -> None:
    """List pinned services.

    JSON: {pins: [Pin, ...], revision: N}.
    """
    from controlplane.api.v1 import mitigation_pb2

    _respond(app, app.call("ListPins", mitigation_pb2.ListPinsRequest()), fmt.render_pin_list)


@pin.command("clear")
@click.argument("service")
@click.option(
    "--all-layers", is_flag=True, help="Remove every time-boxed layer, not only the top one."
)
@write_command
@wait_command()
@click.pass_obj
def pin_clear(app: App, service: str, all_layers: bool, write: WriteArgs, wait: WaitArgs) -> None:
    """Unpin SERVICE.

    JSON: {result: WriteResult, removed: Pin|null, restored: Pin|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.UnpinVersionRequest(
        service=service, all_layers=all_layers, options=write.to_proto(app.actor)
    )

    def render(doc: Mapping[str, Any], now: datetime) -> fmt.Rendered:
        return fmt.render_pin_clear(doc, now, service)

    _write(app, "UnpinVersion", request, render, wait, lambda _: (service,))


@cli.group("known-good")
def known_good() -> None:
    """Versions marked known-good: what `rollback` goes back to."""


@known_good.command("mark")
@click.argument("service")
@click.argument("version")
@write_command
@click.pass_obj
def known_good_mark(app: App, service: str, version: str, write: WriteArgs) -> None:
    """Mark VERSION of SERVICE known-good.

    JSON: {result: WriteResult, known_good: KnownGood}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.MarkKnownGoodRequest(
        service=service, version=version, options=write.to_proto(app.actor)
    )
    _respond(app, app.call("MarkKnownGood", request), fmt.render_known_good_mark)


@known_good.command("unmark")
@click.argument("service")
@click.argument("version")
@write_command
@click.pass_obj
def known_good_unmark(app: App, service: str, version: str, write: WriteArgs) -> None:
    """Withdraw the known-good mark of VERSION of SERVICE.

    JSON: {result: WriteResult, removed: KnownGood|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.UnmarkKnownGoodRequest(
        service=service, version=version, options=write.to_proto(app.actor)
    )
    doc = app.call("UnmarkKnownGood", request)
    _respond(app, doc, lambda d, now: fmt.render_known_good_unmark(d, now, service, version))


@known_good.command("list")
@click.argument("service")
@click.pass_obj
def known_good_list(app: App, service: str) -> None:
    """List the known-good versions of SERVICE, most recently marked first.

    JSON: {known_good: [KnownGood, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("ListKnownGood", mitigation_pb2.ListKnownGoodRequest(service=service))
    _respond(app, doc, lambda d, now: fmt.render_known_good_list(d, now, service))


@cli.command()
@click.argument("service")
@click.option(
    "--current-version",
    default="",
    metavar="V",
    help="The version SERVICE runs, when it has no pin.",
)
@write_command
@wait_command()
@click.pass_obj
def rollback(
    app: App, service: str, current_version: str, write: WriteArgs, wait: WaitArgs
) -> None:
    """Pin SERVICE to its most recently marked known-good version other than the current one.

    "Current" is the pin or, without one, --current-version. Exit 11 when there is nothing
    to roll back to.

    JSON: {result: WriteResult, pin: Pin, from_version: V} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.RollbackRequest(
        service=service, current_version=current_version, options=write.to_proto(app.actor)
    )
    _write(app, "Rollback", request, fmt.render_rollback, wait, lambda _: (service,))


# ---- bundles ----


@cli.group()
def bundle() -> None:
    """Several changes applied in one transaction from a file, and reverted as one.

    \b
    A bundle file (YAML or JSON), e.g. degrade-checkout.yaml:
      name: degrade-checkout
      reason: payment provider timeouts
      incident: INC-42
      ttl: 30m                    # or until: 2026-11-26T18:00Z; neither: permanent
      changes:
        - flag: {service: checkout, name: new-ui, value: false}
        - flag: {scope: global, name: checkout.mode, value: read-only}
        - shed: {service: checkout, percent: 30, tier: SHEDDABLE_PLUS}
        - pin: {service: checkout, version: v1.4.2}
        - clear_flag: {service: checkout, name: old-banner}
        - clear_shed: {service: search}
        - unpin: {service: payments}
    """


BUNDLE_CONFLICT_HINT = (
    "someone changed the bundle's keys after it was applied (see `cpctl bundle get {id}` "
    "and `cpctl history`); --force reverts anyway and overwrites their changes"
)


@bundle.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reason", metavar="TEXT", help="Instead of the file's reason.")
@click.option("--incident", metavar="ID", help="Instead of the file's incident, e.g. INC-42.")
@click.option("--ttl", type=DURATION, help="Instead of the file's ttl or until.")
@click.option("--until", type=TIME, help="Instead of the file's ttl or until.")
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@wait_command(service_option=True)
@click.pass_obj
def bundle_apply(
    app: App,
    file: Path,
    reason: str | None,
    incident: str | None,
    ttl: timedelta | None,
    until: datetime | None,
    dry_run: bool,
    wait: WaitArgs,
) -> None:
    """Apply the bundle in FILE (.yaml, .yml or .json) in one transaction.

    Its reason, incident and expiry come from the file; the options replace them for this
    application. Applying a bundle that is already applied and in force is "unchanged"
    (unless it has an expiry: then it is applied anew, as a new bundle, which extends it).
    --wait waits for every service the bundle changed (a global flag: --wait-service).
    A bad file exits 3 naming the change and the field.

    JSON: {result: WriteResult, bundle: Bundle|null} (+ wait: Wait|null).
    """
    from controlplane.bundles import BundleFileError, load_bundle_file

    if ttl is not None and until is not None:
        raise click.UsageError("--ttl and --until both set an expiry: give one of them")
    if reason is not None and not reason.strip():
        raise click.UsageError("--reason is empty: leave it out to keep the file's reason")
    if until is not None and until <= datetime.now(UTC):
        raise _invalid(f"--until {fmt.iso(until)} is in the past")
    try:
        spec = load_bundle_file(file)
    except BundleFileError as e:
        raise _invalid(str(e)) from e
    overrides: dict[str, Any] = {}
    if reason is not None:
        overrides["reason"] = reason.strip()
    if incident is not None:
        overrides["incident"] = incident
    if ttl is not None or until is not None:
        overrides.update(ttl=ttl, until=until)
    spec = dataclasses.replace(spec, **overrides)
    if wait.enabled:
        named, has_global = change_services(fmt.to_plain(c) for c in spec.changes)
        if not named and not wait.services:
            raise click.UsageError(
                "--wait needs a service: this bundle changes only global flags; name the "
                "service(s) with --wait-service S"
            )
        if has_global and not wait.services and not app.json_output:
            click.echo(
                f"note: --wait covers {', '.join(named)}; the bundle's global flags reach "
                "other services too (--wait-service S waits for them)",
                err=True,
            )
    request = spec.to_request(actor=app.actor, dry_run=dry_run)
    _write(app, "ApplyBundle", request, fmt.render_bundle_apply, wait, _bundle_wait(wait))


def _bundle_wait(wait: WaitArgs) -> Callable[[Mapping[str, Any]], list[str]]:
    """The services to wait for after a bundle write: those whose keys it wrote, and
    --wait-service."""

    def services(doc: Mapping[str, Any]) -> list[str]:
        named, _ = key_services((doc.get("bundle") or {}).get("keys") or [])
        return sorted({*named, *wait.services})

    return services


@bundle.command("revert")
@click.argument("bundle_id", metavar="ID")
@click.option(
    "--force",
    is_flag=True,
    help="Revert even the keys changed since by others (their changes are overwritten).",
)
@click.option(
    "--reason",
    metavar="TEXT",
    help="Why you revert it. Required; recorded in the audit log.",
)
@click.option("--incident", default="", metavar="ID", help="Incident id, e.g. INC-42.")
@click.option("--dry-run", is_flag=True, help="Show what would be restored; write nothing.")
@wait_command(service_option=True)
@click.pass_obj
def bundle_revert(
    app: App,
    bundle_id: str,
    force: bool,
    reason: str | None,
    incident: str,
    dry_run: bool,
    wait: WaitArgs,
) -> None:
    """Restore what each change of bundle ID replaced, in one transaction.

    Refused (exit 4) when someone changed one of its keys since, unless --force; a
    bundle that expired needs --force too (exit 11).

    JSON: {result: WriteResult, bundle: Bundle|null, overwritten_keys: [key, ...]}
    (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2, types_pb2

    if reason is None or not reason.strip():
        raise click.UsageError(REASON_REQUIRED)
    if wait.enabled and not wait.services:
        # Checked before anything is written: a bundle of global flags names no service.
        found = app.call("GetBundle", mitigation_pb2.GetBundleRequest(bundle_id=bundle_id))
        named, _ = key_services((found.get("bundle") or {}).get("keys") or [])
        if not named:
            raise click.UsageError(
                "--wait needs a service: this bundle changed only global flags; name the "
                "service(s) with --wait-service S"
            )
    options = types_pb2.WriteOptions(
        reason=reason.strip(), incident=incident, dry_run=dry_run, actor=app.actor
    )
    request = mitigation_pb2.RevertBundleRequest(bundle_id=bundle_id, force=force, options=options)
    try:
        _write(app, "RevertBundle", request, fmt.render_bundle_revert, wait, _bundle_wait(wait))
    except CliError as e:
        if e.code == "ABORTED":
            e.hint = BUNDLE_CONFLICT_HINT.format(id=bundle_id)
        raise


@bundle.command("list")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=2**31 - 1),
    help="At most N bundles, newest first.  [default: all]",
)
@click.pass_obj
def bundle_list(app: App, limit: int | None) -> None:
    """List bundles, newest first, with their state.

    JSON: {bundles: [Bundle, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ListBundlesRequest(limit=limit or 0)
    _respond(app, app.call("ListBundles", request), fmt.render_bundle_list)


@bundle.command("get")
@click.argument("bundle_id", metavar="ID")
@click.pass_obj
def bundle_get(app: App, bundle_id: str) -> None:
    """Show bundle ID: its state (applied, reverted, expired, partially overridden and by
    which keys), its changes, who applied it, why and when.

    JSON: {bundle: Bundle}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.GetBundleRequest(bundle_id=bundle_id)
    _respond(app, app.call("GetBundle", request), fmt.render_bundle_get)


# ---- status and watch ----


@cli.command()
@click.argument("service")
@click.pass_obj
def status(app: App, service: str) -> None:
    """What is in force for SERVICE and which of its instances applied it.

    Flags in effect and the scope each comes from, shedding, the pin, and the time left on
    time-boxed ones; then each instance: its server, whether it is connected, the revision
    it applied, its lag (changes not yet applied; ? when unknown) and the version it runs,
    with drift from the pin marked. No connected instance is reported, not an error.

    JSON: {service, revision, flags: [Flag, ...], shedding: Shedding|null, pin: Pin|null,
    instances: [Instance, ...], drift: {version: count}}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("GetStatus", mitigation_pb2.GetStatusRequest(service=service))
    _respond(app, doc, fmt.render_status)


@cli.command()
@click.argument("service", required=False, default="")
@click.pass_obj
def watch(app: App, service: str) -> None:
    """Print changes as they are made: of SERVICE (with the global ones), or of every service.

    One line per change: time, revision, action, scope/name, before -> after, who, why,
    incident. Runs until stopped: Ctrl-C exits 130. Once the watch is live, stderr says
    from which revision ("watching ... from revision N", or with --json
    {"watching": {"service": ..., "revision": N}}).

    JSON: JSON Lines, one AuditEntry per line.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.WatchChangesRequest(service=service)
    # Ctrl-C stops the watch even where SIGINT came in ignored (a background job of a
    # script without job control): `kill -INT` is how such a script ends it.
    with contextlib.suppress(ValueError):  # not the main thread (in-process tests)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    live, last = False, 0
    responses = app.stream("WatchChanges", request)
    try:
        for response in responses:
            changes = response.get("changes") or []
            if not live:
                # The first response carries no changes: the revision the watch is live from.
                live, last = True, int(response.get("revision") or 0)
                _watch_note(app, service, last)
                continue
            for entry in changes:
                click.echo(fmt.dumps_line(entry) if app.json_output else fmt.render_change(entry))
            last = max(last, int(response.get("revision") or 0))
    except KeyboardInterrupt:
        responses.close()
        raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None
    except CliError as e:
        if not live:
            raise
        raise CliError(
            e.code,
            f"the watch ended: {e.message}",
            ExitCode(e.exit_code),
            hint=f"changes after revision {last} were not shown: `cpctl history` lists them; "
            "start the watch again",
        ) from e


def _watch_note(app: App, service: str, revision: int) -> None:
    if app.json_output:
        note = {"watching": {"service": service, "revision": revision}}
        click.echo(json.dumps(note), err=True)
        return
    what = service or "every service"
    click.echo(f"watching {what} from revision {revision} (Ctrl-C to stop)", err=True)


# ---- history ----


@cli.command()
@click.option("--service", default="", help="Changes of this service (and global ones).")
@click.option("--incident", default="", metavar="ID", help="Changes made for this incident.")
@click.option("--since", type=SINCE, help="From this time, or this long ago (2h, 1d).")
@click.option("--until", type=SINCE, help="Up to this time, or this long ago.")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=2**31 - 1),
    help="At most N entries, newest first.  [default: 100]",
)
@click.pass_obj
def history(
    app: App,
    service: str,
    incident: str,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
) -> None:
    """Show the audit trail of changes, newest first.

    JSON: {entries: [AuditEntry, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ListHistoryRequest(
        service=service, incident=incident, limit=limit or 0
    )
    if since is not None:
        request.since.FromDatetime(since)
    if until is not None:
        request.until.FromDatetime(until)
    _respond(app, app.call("ListHistory", request), fmt.render_history)


@cli.command()
@click.option("--incident", required=True, metavar="ID", help="The incident (e.g. INC-42).")
@click.option(
    "--format",
    "output",
    type=click.Choice(["md", "json"]),
    default="md",
    show_default=True,
    help="Markdown for the post-mortem document, or JSON.",
)
@click.option("--limit", type=click.IntRange(min=1, max=10_000), help="At most N changes.")
@click.pass_obj
def timeline(app: App, incident: str, output: str, limit: int | None) -> None:
    """The post-mortem timeline of an incident, oldest first.

    Every change made for it (sets, clears, expiries, bundle reverts): when, who, why,
    what it changed, and when all connected instances of each service concerned had
    applied it.

    JSON (--format json or --json): {incident, entries: [TimelineEntry, ...]}; a
    TimelineEntry is {change: AuditEntry, applied: [ServiceApplied, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call(
        "GetTimeline", mitigation_pb2.GetTimelineRequest(incident=incident, limit=limit or 0)
    )
    if app.json_output or output == "json":
        click.echo(fmt.dumps(doc))
        return
    for line in fmt.render_timeline_md(doc):
        click.echo(line)


def main() -> NoReturn:
    """Console-script entry point of ``cpctl``."""
    cli.main(prog_name="cpctl")
