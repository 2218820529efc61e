"""The ``cpctl`` group: global options, help, error handling, and ``main``.

The commands live in one module per noun and are added here, in the order of an
incident: flags, shedding, pins, bundles, then follow-up.
"""

from __future__ import annotations

import getpass
import os
import sys
import textwrap
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn

import click

from controlplane import __version__
from controlplane._durations import DURATION_FORMS, TIME_FORMS
from controlplane.cli._app import ENV_TOKEN, App, setting_error
from controlplane.cli._errors import EXIT_CODE_HELP, CliError, ExitCode, report_error
from controlplane.cli._output import JSON_SHAPES
from controlplane.cli._params import DURATION, VALUE_FORMS
from controlplane.cli.audit import history, timeline, watch
from controlplane.cli.bundle import bundle
from controlplane.cli.flag import flag
from controlplane.cli.notifications import notifications
from controlplane.cli.pin import known_good, pin, rollback
from controlplane.cli.shed import shed
from controlplane.cli.status import services, status
from controlplane.cli.trigger import trigger
from controlplane.transport import ClientSecurity, TransportConfigError, path_or_none


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


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
            for code, text in EXIT_CODE_HELP.items()
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
        'stderr as {"error": {"code": "ABORTED", "message": "...", "exit_code": 4}}, and '
        'warnings as one line {"warning": {"code": ..., "message": ...}}; both may carry '
        'more fields, e.g. "did_you_mean": [{"scope": ..., "name": ...}] for a flag not set. '
        "`watch --json` prints JSON Lines instead: one AuditEntry per line, as changes are "
        "made.",
        '--wait adds "wait" to a write\'s document: a Wait object (null on a dry run, or '
        "when no service was named to wait for) with one WaitService per service; an "
        "unchanged write waits too, for the revision from which it is in force. Its outcome: "
        "applied (exit 0), no_instances (9), timed_out (8) or rejected (10); several "
        "services take the most serious, in that order.",
        "\b\nJSON objects:\n"
        + "\n".join(
            line
            for name, keys in JSON_SHAPES.items()
            for line in _shape_lines(name, keys, max(map(len, JSON_SHAPES)))
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
            code = report_error(e, _json_wanted(e, argv))
        except click.Abort:
            interrupted = CliError("CANCELLED", "interrupted", ExitCode.INTERRUPTED)
            code = report_error(interrupted, _json_wanted(interrupted, argv))
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


# In the order of an incident, which is the order `cpctl --help` lists them in.
cli.add_command(flag)
cli.add_command(shed)
cli.add_command(pin)
cli.add_command(known_good)
cli.add_command(rollback)
cli.add_command(bundle)
cli.add_command(status)
cli.add_command(services)
cli.add_command(watch)
cli.add_command(history)
cli.add_command(timeline)
cli.add_command(trigger)
cli.add_command(notifications)


def main() -> NoReturn:
    """Console-script entry point of ``cpctl``."""
    cli.main(prog_name="cpctl")
