"""Exit codes and errors of ``cpctl``, and how an error is reported.

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

``report_error`` prints every error to stderr, as ``error: ...`` or, with ``--json``, as
``{"error": {"code": ..., "message": ..., "exit_code": ...}}`` (plus the error's
``details``, e.g. ``did_you_mean``); stdout only ever carries the command's result.
``report_warning`` does the same for a command that succeeds but has something to say
(``warning: ...``, or ``{"warning": {"code": ..., "message": ..., ...}}``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from controlplane.cli._output import terminal_safe

if TYPE_CHECKING:
    import grpc


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


EXIT_CODE_HELP: dict[ExitCode, str] = {
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
    "instances are listed); the change is in force",
    ExitCode.WAIT_NO_INSTANCES: "--wait found no connected instance of the service (a "
    "mistyped service name?); the change is in force",
    ExitCode.REJECTED: "--wait: an instance rejected the change (instance and reason are "
    "listed); the change is in force",
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
HINTS: dict[str, str] = {
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
        self,
        code: str,
        message: str,
        exit_code: ExitCode,
        *,
        hint: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        # Shown under the error line instead of the code's entry in HINTS.
        self.hint = hint
        # More fields of the --json error object (``did_you_mean``, ...).
        self.details: dict[str, Any] = dict(details or {})
        # click declares exit_code per class; ours varies per instance and click reads it
        # from the instance.
        self.exit_code = int(exit_code)  # type: ignore[misc]
        self.ctx: click.Context | None = None


def invalid(message: str) -> CliError:
    """Invalid input caught before sending (exit 3)."""
    return CliError("INVALID_ARGUMENT", message, ExitCode.INVALID)


def report_error(error: click.ClickException, as_json: bool) -> int:
    """Print ``error`` to stderr (as JSON with ``as_json``) and return its exit code."""
    if isinstance(error, CliError):
        code = error.code
    elif isinstance(error, click.UsageError):
        code = "USAGE"
    else:
        code = "INVALID_ARGUMENT" if error.exit_code == ExitCode.INVALID else "UNKNOWN"
    message = error.format_message()
    if as_json:
        fields: dict[str, Any] = {"code": code, "message": message, "exit_code": error.exit_code}
        if isinstance(error, CliError):
            fields.update({k: v for k, v in error.details.items() if k not in fields})
        click.echo(json.dumps({"error": fields}, ensure_ascii=False), err=True)
        return error.exit_code
    click.echo(f"error: {terminal_safe(message)}", err=True)
    if isinstance(error, click.UsageError) and error.ctx is not None:
        click.echo(f"usage: {error.ctx.get_usage().removeprefix('Usage: ')}", err=True)
        click.echo(f"see: {error.ctx.command_path} --help", err=True)
    else:
        hint = error.hint if isinstance(error, CliError) else None
        hint = hint or HINTS.get(code)
        if hint:
            click.echo(f"hint: {terminal_safe(hint)}", err=True)
    return error.exit_code


def report_warning(
    code: str,
    message: str,
    as_json: bool,
    *,
    hint: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Print a warning to stderr: ``warning: ...`` and ``hint: ...`` lines or, with
    ``as_json``, one line ``{"warning": {"code": ..., "message": ..., **details}}`` (no
    hint, as for errors); the command's result on stdout stays one JSON document."""
    if as_json:
        fields: dict[str, Any] = {"code": code, "message": message}
        fields.update({k: v for k, v in (details or {}).items() if k not in fields})
        click.echo(json.dumps({"warning": fields}, ensure_ascii=False), err=True)
        return
    click.echo(f"warning: {terminal_safe(message)}", err=True)
    if hint:
        click.echo(f"hint: {terminal_safe(hint)}", err=True)
