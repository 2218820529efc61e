"""The options of every write, and --wait: until the instances applied a change.

A write command parses its arguments, builds one request and hands it to
``write_and_wait``, which makes the call, prints the result and, with --wait, calls
``WaitApplied`` for each service the write concerns.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from controlplane._durations import in_the_past
from controlplane.cli._app import App, respond
from controlplane.cli._errors import HINTS, CliError, ExitCode, invalid
from controlplane.cli._output import (
    Rendered,
    dumps,
    format_age,
    one_line,
    terminal_safe,
)
from controlplane.cli._params import DURATION, TIME

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from controlplane.api.v1 import types_pb2


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


def check_until(until: datetime | None) -> None:
    """Refuse an --until that has gone by, showing the time now and offering --ttl.

    Raises:
        CliError: ``until`` is not in the future (exit 3).
    """
    if until is None:
        return
    now = datetime.now(UTC)
    if until <= now:
        raise invalid(
            f"--until {in_the_past(until, now)}; give a later time (one without an offset "
            "is UTC), or a duration from now with --ttl instead, e.g. --ttl 30m"
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
        check_until(until)
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


# Outcomes of wait_outcome: exit code and error code name.
_WAIT_EXIT: dict[str, tuple[ExitCode, str]] = {
    "applied": (ExitCode.OK, "OK"),
    "no_instances": (ExitCode.WAIT_NO_INSTANCES, "WAIT_NO_INSTANCES"),
    "timed_out": (ExitCode.WAIT_TIMEOUT, "WAIT_TIMEOUT"),
    "rejected": (ExitCode.REJECTED, "REJECTED"),
}

_WAIT_HINTS: dict[str, str] = {
    "no_instances": "{state}, but no instance is connected to apply it",
    "timed_out": "{state}; the pending instances may still "
    "apply it: `cpctl status {service}` shows each one's applied revision",
    "rejected": "{state} and applies where it was accepted; "
    "fix the rejecting instances or undo the change",
}

# What a service name looks like (the server's rule), checked before anything is written.
_SERVICE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def wait_exit_code(outcome: str) -> ExitCode:
    """The exit code of a wait's outcome (``wait_outcome`` / ``worst_outcome``)."""
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
                    f"at most {format_age(MAX_WAIT_TIMEOUT)} (the server's limit)",
                    ctx=ctx,
                    param_hint="'--wait-timeout'",
                )
            enabled = wait or wait_timeout is not None or bool(wait_service)
            f(*args, wait=WaitArgs(enabled, timeout, tuple(wait_service)), **kwargs)

        options = [
            click.option(
                "--wait",
                is_flag=True,
                help="After the write (an unchanged one too), wait until every connected "
                "instance applied what it asked for: exit 8 if some did not within "
                "--wait-timeout, 9 if none is connected, 10 if one rejected it.",
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


def _wait_applied(
    app: App, revisions: Mapping[str, int], timeout: timedelta, started: float
) -> dict[str, Any]:
    """WaitApplied for each service at its revision, within one --wait-timeout; a ``Wait``
    document."""
    from controlplane.api.v1 import mitigation_pb2

    deadline = time.monotonic() + timeout.total_seconds()
    results = []
    for service, revision in revisions.items():
        left = max(deadline - time.monotonic(), _MIN_WAIT_SECONDS)
        request = mitigation_pb2.WaitAppliedRequest(service=service, revision=revision)
        request.timeout.FromTimedelta(timedelta(seconds=left))
        # The server answers at the end of the wait: the deadline covers it and a call.
        plain = app.call("WaitApplied", request, timeout=left + app.timeout.total_seconds())
        seconds = round(time.monotonic() - started, 3)
        results.append(
            {
                "service": service,
                "outcome": wait_outcome(plain),
                "revision": revision,
                "seconds": seconds,
                **plain,
            }
        )
    return {
        "outcome": worst_outcome(r["outcome"] for r in results),
        "revision": max(revisions.values(), default=0),
        "seconds": round(time.monotonic() - started, 3),
        "services": results,
    }


def _wait_revisions(result: Mapping[str, Any], services: Sequence[str]) -> dict[str, int]:
    """The revision each service's instances must have applied for the write to be applied
    everywhere: the write's own, or, when it changed nothing, the revision from which what
    it asked for is in force for that service (its keys' and global's newest; 0: none of
    its keys is set)."""
    if result.get("changed"):
        return dict.fromkeys(services, int(result.get("revision") or 0))
    since = {str(k): int(v) for k, v in (result.get("in_force_since") or {}).items()}
    if not since:
        return dict.fromkeys(services, int(result.get("mod_revision") or 0))
    return {s: max(since.get(s, 0), since.get("global", 0)) for s in services}


def write_and_wait(
    app: App,
    rpc: str,
    request: Message,
    render: Callable[[Mapping[str, Any], datetime], Rendered],
    wait: WaitArgs,
    services: Callable[[Mapping[str, Any]], Sequence[str]],
) -> Mapping[str, Any]:
    """Make a write, print its result and, with --wait, wait for its instances; return
    the write's answer (plain), for what a command says after it.

    ``services(doc)`` names the services to wait for, from the response. An unchanged
    write waits too: the question is whether what is in force is applied everywhere
    (it waits for the key's mod revision; for a key that is not set, that a connected
    instance of each service is there). With --json the document gains ``wait``: a
    ``Wait`` document, or null on a dry run (nothing written, exit 0).

    The services the write concerns that no agent has reported are named on stderr
    (``unknown_services`` in the result), with the closest known names.

    Raises:
        CliError: the write failed, or the wait did not end with every instance applying
            the change (exit 8, 9 or 10; the message names the instances).
    """
    started = time.monotonic()
    doc = app.call(rpc, request)
    render = _with_notices(render)
    if not wait.enabled:
        respond(app, doc, render)
        return doc
    if not app.json_output:
        # People see the change land at once, before the wait.
        respond(app, doc, render)
    result = doc.get("result") or {}
    revision = int(result.get("revision") or 0)
    state = f"the change is written (rev {revision})"
    report: dict[str, Any] | None = None
    failure: CliError | None = None
    chosen = [] if result.get("dry_run") else list(services(doc))
    if chosen:
        revisions = _wait_revisions(result, chosen)
        revision = max(revisions.values())
        if not result.get("changed"):
            state = (
                f"the change is in force (rev {revision})"
                if revision
                else "nothing is set there, so there is nothing to apply"
            )
        # Nothing set for a service: its instances have nothing to apply, but --wait still
        # says whether any is connected (each applied a snapshot at least).
        revisions = {service: max(rev, 1) for service, rev in revisions.items()}
        try:
            report = _wait_applied(app, revisions, wait.timeout, started)
        except CliError as e:
            e.hint = f"{state}, but --wait failed: " + (e.hint or HINTS.get(e.code, e.code))
            failure = e
    elif not result.get("dry_run") and not app.json_output:
        click.echo("note: nothing to wait for: no service's own record changed", err=True)
    if app.json_output:
        click.echo(dumps({**doc, "wait": report}))
    elif report is not None:
        for line in render_wait(report).lines:
            click.echo(terminal_safe(line))
    if failure is not None:
        raise failure
    if report is not None and report["outcome"] != "applied":
        exit_code, code = _WAIT_EXIT[report["outcome"]]
        problems = render_wait(report).problems
        worst = next(s for s in report["services"] if s["outcome"] == report["outcome"])
        hint = _WAIT_HINTS[report["outcome"]].format(service=worst["service"], state=state)
        raise CliError(
            code, "\n".join(f"--wait: {problem}" for problem in problems), exit_code, hint=hint
        )
    return doc


def _with_notices(
    render: Callable[[Mapping[str, Any], datetime], Rendered],
) -> Callable[[Mapping[str, Any], datetime], Rendered]:
    """``render``, with a warning for each service of the write no agent has reported."""

    def rendered(doc: Mapping[str, Any], now: datetime) -> Rendered:
        base = render(doc, now)
        notices = (doc.get("result") or {}).get("unknown_services") or []
        return Rendered(base.lines, [*base.warnings, *map(unknown_service_warning, notices)])

    return rendered


def unknown_service_warning(notice: Mapping[str, Any]) -> str:
    """What to say of a service no agent has reported (an ``UnknownService`` document)."""
    service = notice.get("service", "?")
    memory = notice.get("memory")
    within = f"in the last {format_age(memory)}" if isinstance(memory, timedelta) else "yet"
    text = f"warning: no agent of service {service} has connected {within}"
    close = list(notice.get("did_you_mean") or [])
    if close:
        text += f"; did you mean {' or '.join(close)}?"
    return text + " (`cpctl services` lists the services known)"


# ---- human output of a wait ----

WAIT_OUTCOMES = ("applied", "no_instances", "timed_out", "rejected")
"""Outcomes of a wait, least to most serious; a wait over several services takes the worst."""


def wait_outcome(result: Mapping[str, Any]) -> str:
    """What a ``WaitAppliedResponse`` (plain) means for one service."""
    if result.get("nacks"):
        return "rejected"
    if int(result.get("connected", 0)) == 0:
        return "no_instances"
    if result.get("all_applied"):
        return "applied"
    return "timed_out"


def worst_outcome(outcomes: Iterable[str]) -> str:
    """The most serious of several outcomes (``applied`` when there are none)."""
    return max(outcomes, key=WAIT_OUTCOMES.index, default="applied")


_MAX_LISTED = 10


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f" and {len(items) - _MAX_LISTED} more"
    return shown


def describe_wait(result: Mapping[str, Any]) -> str:
    """One line about one service of a wait (a ``WaitService`` document)."""
    service = result.get("service", "?")
    applied, connected = result.get("applied", 0), result.get("connected", 0)
    seconds = float(result.get("seconds", 0.0))
    outcome = result.get("outcome") or wait_outcome(result)
    clients = int(result.get("sync_clients") or 0)
    aside = (
        f" ({clients} OpenFeature sync client(s) not counted: they confirm nothing)"
        if clients
        else ""
    )
    if outcome == "applied":
        return f"{service}: applied by {applied}/{connected} instances in {seconds:.2f} s{aside}"
    if outcome == "no_instances":
        unknown = result.get("unknown") or {}
        if unknown:
            close = list(unknown.get("did_you_mean") or [])
            memory = unknown.get("memory")
            within = f" in the last {format_age(memory)}" if isinstance(memory, timedelta) else ""
            guess = (
                f": did you mean {' or '.join(close)}?" if close else ": is the service name right?"
            )
            return (
                f"{service}: no connected instance to apply it, and no agent of {service} "
                f"has connected{within}{guess} (`cpctl services` lists the services known)"
                f"{aside}"
            )
        return (
            f"{service}: no connected instance to apply it (is the service name right? "
            f"`cpctl status {service}` shows its instances){aside}"
        )
    if outcome == "rejected":
        nacks = dict(result.get("nacks") or {})
        reasons = [f"{instance} ({nacks[instance]})" for instance in sorted(nacks)]
        return (
            f"{service}: rejected by {len(nacks)} of {connected} instance(s): "
            f"{_listed(reasons)}; applied by {applied}/{connected}"
        )
    pending = [
        f"{p.get('instance_id', '?')} (at rev {p.get('applied_revision', 0)})"
        for p in result.get("pending") or []
    ]
    text = f"{service}: applied by only {applied}/{connected} instances within {seconds:.1f} s"
    if pending:
        text += f"; pending: {_listed(pending)}"
    else:
        text += "; another server has not confirmed its instances yet"
    return text


class WaitReport(NamedTuple):
    """Human output of a wait: lines for the services that applied it, and the problems."""

    lines: Sequence[str]
    problems: Sequence[str]


def render_wait(report: Mapping[str, Any]) -> WaitReport:
    lines, problems = [], []
    for result in report.get("services") or []:
        text = one_line(describe_wait(result))
        if result.get("outcome") == "applied":
            lines.append(text)
        else:
            problems.append(text)
    return WaitReport(lines, problems)
