"""The connection: ``App`` (the server list, failover, the calls and the one stream) and
printing a command's result.

TLS and the token come from ``controlplane.transport``; the token's metadata goes with
every call. gRPC and the generated stubs are imported inside the methods that call, so
``cpctl --help`` does not pay for them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from controlplane.cli._errors import (
    ANONYMOUS_HINT,
    REFUSED_HINT,
    ROLE_HINT,
    CliError,
    ExitCode,
    exit_code_for_status,
)
from controlplane.cli._output import Rendered, dumps, terminal_safe, to_plain
from controlplane.transport import ClientSecurity, TransportConfigError

if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message


ENV_TOKEN = "CPCTL_TOKEN"  # noqa: S105  # a variable's name, not a token

_CHANNEL_OPTIONS = (
    # A timeline of 10,000 entries is larger than gRPC's default of 4 MiB; the server
    # bounds what each answer shows (about 4 MiB of records plus the entries).
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
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
            return to_plain(response)
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
                yield to_plain(first)
                for response in responses:
                    yield to_plain(response)
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

        # The generated stub is untyped; responses go straight to to_plain.
        stub_class: Any = mitigation_pb2_grpc.MitigationServiceStub
        return stub_class(self._channel(target))

    def _channel(self, target: str) -> grpc.Channel:
        channel = self._channels.get(target)
        if channel is None:
            try:
                channel = self.security.channel(target, options=_CHANNEL_OPTIONS)
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


def respond(
    app: App,
    doc: Mapping[str, Any],
    render: Callable[[Mapping[str, Any], datetime], Rendered],
) -> None:
    """Print a command's result: one JSON document, or human lines (+ warnings on stderr)."""
    if app.json_output:
        click.echo(dumps(doc))
        return
    rendered = render(doc, datetime.now(UTC))
    for line in rendered.lines:
        click.echo(terminal_safe(line))
    for warning in rendered.warnings:
        click.echo(terminal_safe(warning), err=True)
