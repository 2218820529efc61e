"""``cpctl``: change and inspect mitigations from a terminal or a runbook.

Layout: parsing of user input (values; durations and times come from ``_durations``, shared
with the server) and the exit-code table first, then
``App`` (the server list, failover and the calls), then the click commands. A command
parses its arguments, builds one request, calls ``App.call`` and hands the plain response
to ``_respond`` with a renderer from ``_cli_format``; adding a command means adding those
few lines. gRPC and the generated stubs are imported inside the functions that call, so
``cpctl --help`` does not pay for them.

Errors::

    click.ClickException
     +-- click.UsageError            exit 2: bad syntax, missing --reason, ...
     +-- CliError                    carries a status-like code name and an ExitCode:
                                     client-side invalid input (3), RPC failures mapped
                                     from their gRPC status (exit_code_for_status), and
                                     unexpected failures (1)

``main`` prints every error to stderr, as ``error: ...`` or, with ``--json``, as
``{"error": {"code": ..., "message": ..., "exit_code": ...}}``; stdout only ever carries
the command's result.
"""

from __future__ import annotations

import enum
import functools
import getpass
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from controlplane import __version__
from controlplane import _cli_format as fmt
from controlplane._durations import DURATION_FORMS, TIME_FORMS, parse_duration, parse_time

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
    ExitCode.USAGE: "usage error (bad option or argument, missing --reason)",
    ExitCode.INVALID: "invalid input (INVALID_ARGUMENT, OUT_OF_RANGE, or caught before sending)",
    ExitCode.CONFLICT: "conflict: --expect-revision did not match (ABORTED, ALREADY_EXISTS)",
    ExitCode.NOT_FOUND: "not found (NOT_FOUND)",
    ExitCode.UNAVAILABLE: "server or its etcd unavailable, or too slow (UNAVAILABLE, "
    "DEADLINE_EXCEEDED)",
    ExitCode.PERMISSION_DENIED: "permission denied (PERMISSION_DENIED, UNAUTHENTICATED)",
    ExitCode.WAIT_TIMEOUT: "--wait timed out with the change only partly applied",
    ExitCode.WAIT_NO_INSTANCES: "--wait with no connected instance",
    ExitCode.REJECTED: "an instance rejected the change",
    ExitCode.FAILED_PRECONDITION: "failed precondition, e.g. nothing to roll back to",
    ExitCode.UNIMPLEMENTED: "not implemented by the server yet (UNIMPLEMENTED)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); a write may or may not have been applied",
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


class _DurationType(_ParamType):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            duration = parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if duration <= timedelta(0):
            self.fail(f"{value!r} must be longer than zero", param, ctx)
        return duration


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


DURATION = _DurationType()
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
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)
    _last_good: str | None = None

    def call(self, rpc: str, request: Message) -> dict[str, Any]:
        """Call MitigationService.<rpc> and return the response in plain form.

        Tries the servers in order, starting with the one that last answered, and moves on
        to the next only when a server could not be reached at all (see
        ``_never_reached``): an error a server answered is final, so a write that may have
        been applied is never sent a second time. Each attempt has its own deadline
        (--timeout).

        Raises:
            CliError: the call failed; the exit code follows ``exit_code_for_status``.
        """
        import grpc

        from controlplane.api.v1 import mitigation_pb2_grpc

        order = self.servers
        if self._last_good is not None:
            order = [self._last_good, *(s for s in self.servers if s != self._last_good)]
        write = _is_write(request)
        # The generated stub is untyped; responses go straight to fmt.to_plain.
        stub_class: Any = mitigation_pb2_grpc.MitigationServiceStub
        failures: list[str] = []
        for target in order:
            stub = stub_class(self._channel(target))
            try:
                response = getattr(stub, rpc)(request, timeout=self.timeout.total_seconds())
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.UNAVAILABLE and _never_reached(details, write=write):
                    failures.append(f"{target}: {details or code.name}")
                    continue
                raise _call_error(target, code, details, write=write) from e
            self._last_good = target
            return fmt.to_plain(response)
        raise CliError(
            "UNAVAILABLE",
            f"no server reachable ({'; '.join(failures)})",
            ExitCode.UNAVAILABLE,
        )

    def _channel(self, target: str) -> grpc.Channel:
        import grpc

        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.insecure_channel(target)
        return channel

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


def _call_error(target: str, code: grpc.StatusCode, details: str, *, write: bool) -> CliError:
    """The error for a failed call that is not tried on another server."""
    message = details or code.name
    hint: str | None = None
    if code.name == "UNAVAILABLE":
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


# ---- the command line ----


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _shape_lines(name: str, keys: Sequence[str], width: int = 78) -> list[str]:
    lines, line = [], f"  {name:<11} {{"
    for i, key in enumerate(keys):
        item = key + (", " if i < len(keys) - 1 else "}")
        if len(line) + len(item) > width:
            lines.append(line.rstrip())
            line = " " * 15
        line += item
    return [*lines, line]


_EPILOG = "\n\n".join(
    [
        "\b\nExit codes:\n"
        + "\n".join(f"  {int(code):>3}  {text}" for code, text in _EXIT_CODE_HELP.items()),
        f"Durations: {DURATION_FORMS}.",
        f"Times: {TIME_FORMS}.",
        f"Flag values: {VALUE_FORMS}.",
        "--json prints exactly one JSON document on stdout: the server's response with its "
        "proto field names (snake_case). Times are ISO 8601 UTC strings, revisions integers, "
        "an absent record null; a flag's value is a plain JSON value (true, 50, "
        '"read-only", {...}); an audit entry\'s before and after are the records as JSON '
        "objects. Each command's help gives its top-level keys. Errors go to "
        'stderr as {"error": {"code": "ABORTED", "message": "...", "exit_code": 4}}.',
        "\b\nJSON objects:\n"
        + "\n".join(
            line for name, keys in fmt.JSON_SHAPES.items() for line in _shape_lines(name, keys)
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
    help="Who makes the change, for the audit log (until the server authenticates callers).",
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
@click.version_option(__version__, "--version", prog_name="cpctl")
@click.pass_context
def cli(ctx: click.Context, server: str, actor: str, json_output: bool, timeout: timedelta) -> None:
    """Change and inspect mitigations: kill switches and flags, load shedding, version pins.

    Every change takes --reason and is audited; it can be time-boxed (--ttl, --until),
    conditional (--expect-revision) or tried first (--dry-run). Re-running a change that is
    already in place prints "unchanged" and exits 0.

    \b
    Examples:
      cpctl flag set checkout new-ui false --reason "errors after deploy" --ttl 30m
      cpctl flag get checkout new-ui --effective
      cpctl shed set checkout 50 --tier SHEDDABLE_PLUS --reason "overload" --incident INC-42
      cpctl rollback checkout --reason "bad release"
      cpctl history --service checkout --since 2h
    """
    servers = [s.strip() for s in server.split(",") if s.strip()]
    if not servers:
        raise click.BadParameter("give at least one HOST:PORT", ctx=ctx, param_hint="'--server'")
    app = App(servers, actor or _default_actor(), json_output, timeout)
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
@click.pass_obj
def flag_set(
    app: App, scope: str, name: str, value: str, force_string: bool, write: WriteArgs
) -> None:
    """Set flag NAME in SCOPE to VALUE.

    VALUE: true/false -> bool; 50 or 0.5 -> number; @PATH -> the JSON object in a file
    (@- reads stdin); {"mode": "lite"} -> a JSON object; anything else -> a string.

    JSON: {result: WriteResult, flag: Flag, previous: Flag|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    try:
        parsed = parse_flag_value(value, force_string=force_string)
    except ValueError as e:
        raise _value_error(e) from e
    request = mitigation_pb2.SetFlagRequest(
        scope=scope, name=name, value=flag_value_proto(parsed), options=write.to_proto(app.actor)
    )
    _respond(app, app.call("SetFlag", request), fmt.render_flag_set)


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
@click.pass_obj
def flag_clear(app: App, scope: str, name: str, all_layers: bool, write: WriteArgs) -> None:
    """Remove flag NAME from SCOPE (what it replaced, if time-boxed, applies again).

    JSON: {result: WriteResult, removed: Flag|null, restored: Flag|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ClearFlagRequest(
        scope=scope, name=name, all_layers=all_layers, options=write.to_proto(app.actor)
    )
    doc = app.call("ClearFlag", request)
    _respond(app, doc, lambda d, now: fmt.render_flag_clear(d, now, scope, name))


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
@click.pass_obj
def shed_set(app: App, service: str, percent: str, tier: str | None, write: WriteArgs) -> None:
    """Shed PERCENT (0 to 100) of the tier's requests of SERVICE.

    JSON: {result: WriteResult, shedding: Shedding, previous: Shedding|null}.
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
    _respond(app, app.call("SetShedding", request), fmt.render_shed_set)


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
@click.pass_obj
def shed_clear(app: App, service: str, all_layers: bool, write: WriteArgs) -> None:
    """Stop shedding load on SERVICE.

    JSON: {result: WriteResult, removed: Shedding|null, restored: Shedding|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ClearSheddingRequest(
        service=service, all_layers=all_layers, options=write.to_proto(app.actor)
    )
    doc = app.call("ClearShedding", request)
    _respond(app, doc, lambda d, now: fmt.render_shed_clear(d, now, service))


# ---- pins, known-good versions, rollback ----


@cli.group()
def pin() -> None:
    """Pin a service to a version (its deploy hook redeploys it)."""


@pin.command("set")
@click.argument("service")
@click.argument("version")
@write_command
@click.pass_obj
def pin_set(app: App, service: str, version: str, write: WriteArgs) -> None:
    """Pin SERVICE to VERSION.

    JSON: {result: WriteResult, pin: Pin, previous: Pin|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.PinVersionRequest(
        service=service, version=version, options=write.to_proto(app.actor)
    )
    _respond(app, app.call("PinVersion", request), fmt.render_pin_set)


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
@click.pass_obj
def pin_clear(app: App, service: str, all_layers: bool, write: WriteArgs) -> None:
    """Unpin SERVICE.

    JSON: {result: WriteResult, removed: Pin|null, restored: Pin|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.UnpinVersionRequest(
        service=service, all_layers=all_layers, options=write.to_proto(app.actor)
    )
    doc = app.call("UnpinVersion", request)
    _respond(app, doc, lambda d, now: fmt.render_pin_clear(d, now, service))


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
@click.pass_obj
def rollback(app: App, service: str, current_version: str, write: WriteArgs) -> None:
    """Pin SERVICE to its most recently marked known-good version other than the current one.

    "Current" is the pin or, without one, --current-version. Exit 11 when there is nothing
    to roll back to.

    JSON: {result: WriteResult, pin: Pin, from_version: V}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.RollbackRequest(
        service=service, current_version=current_version, options=write.to_proto(app.actor)
    )
    _respond(app, app.call("Rollback", request), fmt.render_rollback)


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


def main() -> NoReturn:
    """Console-script entry point of ``cpctl``."""
    cli.main(prog_name="cpctl")
