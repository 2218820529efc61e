"""The ``controlplane`` command: ``serve`` (the control server) and ``token``.

Without ``--etcd`` the server starts an embedded etcd under ``--data-dir`` (for
development; production points at an etcd cluster). With ``--workers N`` above 1, a
supervisor process runs N server processes on the one address.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import click
import structlog

from controlplane import __version__
from controlplane._duration_param import DurationParam
from controlplane._files import UnsafeFileError, read_guarded
from controlplane.server._config import MIN_AUDIT_RETENTION, ServerConfig, ServerConfigError
from controlplane.server._ports import split_host_port
from controlplane.server._runtime import configure_logging, run_event_loop, serve_until_stopped
from controlplane.server._workers import WorkerStartError, run_workers
from controlplane.server.auth import AuthFileError, hash_token
from controlplane.store import DEFAULT_PREFIX, EtcdSecurity, normalize_endpoints

log = structlog.get_logger("controlplane.server")

_ORIGIN = re.compile(
    r"\*|https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)
"""A web origin as browsers send it in ``Origin`` (or ``*``)."""


class StartError(click.ClickException):
    """Why the server cannot start: one ``Error:`` line per problem (each port in use
    is one)."""

    def show(self, file: IO[Any] | None = None) -> None:
        for line in self.format_message().splitlines():
            click.echo(f"Error: {line}", file=file, err=file is None)


@click.group()
@click.version_option(__version__, prog_name="controlplane")
def main() -> None:
    """The compensating-actions control server."""


@main.command()
@click.option(
    "--listen",
    envvar="CONTROLPLANE_LISTEN",
    default="127.0.0.1:50051",
    show_default=True,
    help="gRPC address.",
)
@click.option(
    "--http",
    envvar="CONTROLPLANE_HTTP",
    default=None,
    metavar="HOST:PORT",
    help="Also serve MitigationService as JSON over HTTP/1.1 on this address (same TLS, "
    "tokens and roles as --listen; OpenAPI at /openapi.json). Default: off.",
)
@click.option(
    "--notify",
    "notify_file",
    envvar="CONTROLPLANE_NOTIFY",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Tell Slack, PagerDuty or webhooks of every change (YAML: destinations, filters; "
    "see README). Re-read on SIGHUP. Default: off.",
)
@click.option(
    "--http-cors-origin",
    "http_cors_origins",
    envvar="CONTROLPLANE_HTTP_CORS_ORIGIN",
    multiple=True,
    metavar="ORIGIN",
    help="A web origin (https://app.example.com; '*': any) whose pages may call the OFREP "
    "routes from a browser (OpenFeature's web provider). Repeatable. Default: none.",
)
@click.option(
    "--etcd",
    envvar="CONTROLPLANE_ETCD",
    default="",
    help="Comma-separated etcd endpoints (host:port); absent: an embedded etcd under --data-dir.",
)
@click.option(
    "--prefix",
    envvar="CONTROLPLANE_PREFIX",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="etcd key prefix.",
)
@click.option(
    "--metrics",
    envvar="CONTROLPLANE_METRICS",
    default="127.0.0.1:9464",
    show_default=True,
    help="Prometheus endpoint address (HOST:PORT); 'off' disables it.",
)
@click.option(
    "--log-format",
    envvar="CONTROLPLANE_LOG_FORMAT",
    type=click.Choice(["json", "console"]),
    default="json",
    show_default=True,
)
@click.option(
    "--etcd-timeout",
    envvar="CONTROLPLANE_ETCD_TIMEOUT",
    type=DurationParam(strip=True),
    default="2s",
    show_default=True,
    help="Longest wait for etcd per RPC, before UNAVAILABLE.",
)
@click.option(
    "--audit-retention",
    envvar="CONTROLPLANE_AUDIT_RETENTION",
    type=DurationParam(strip=True),
    default="30d",
    show_default=True,
    help="How long audit records are kept.",
)
@click.option(
    "--stale-after",
    envvar="CONTROLPLANE_STALE_AFTER",
    type=DurationParam(strip=True, positive=True),
    default="4h",
    show_default=True,
    help="A mitigation in force without expiry for longer than this is stale: `cpctl "
    "status` warns of it (alert on controlplane_mitigation_age_seconds alike).",
)
@click.option(
    "--data-dir",
    envvar="CONTROLPLANE_DATA_DIR",
    type=click.Path(path_type=Path),
    default=Path(".controlplane"),
    show_default=True,
    help="Embedded etcd's data.",
)
@click.option(
    "--embedded-etcd-port",
    envvar="CONTROLPLANE_EMBEDDED_ETCD_PORT",
    type=click.IntRange(min=0, max=65534),
    default=2379,
    show_default=True,
    help="Client port of the embedded etcd; its peer port is the next one (0: any free ports).",
)
@click.option(
    "--etcd-ca",
    envvar="CONTROLPLANE_ETCD_CA",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TLS to etcd: the CA (PEM) that signed etcd's certificate.",
)
@click.option(
    "--etcd-cert",
    envvar="CONTROLPLANE_ETCD_CERT",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TLS to etcd: this server's client certificate (etcd --client-cert-auth).",
)
@click.option(
    "--etcd-key",
    envvar="CONTROLPLANE_ETCD_KEY",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The client certificate's private key (PEM).",
)
@click.option(
    "--etcd-server-name",
    envvar="CONTROLPLANE_ETCD_SERVER_NAME",
    default=None,
    help="The name to expect in etcd's certificate (when endpoints are IP addresses).",
)
@click.option(
    "--etcd-user",
    envvar="CONTROLPLANE_ETCD_USER",
    default=None,
    help="etcd user (etcd auth); the password comes from CONTROLPLANE_ETCD_PASSWORD "
    "or --etcd-password-file, never the command line.",
)
@click.option(
    "--etcd-password-file",
    envvar="CONTROLPLANE_ETCD_PASSWORD_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A file holding the etcd user's password.",
)
@click.option(
    "--auth-file",
    envvar="CONTROLPLANE_AUTH_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Identities, roles and token hashes (YAML or JSON); re-read on SIGHUP. "
    "Absent: authentication off.",
)
@click.option(
    "--tls-cert",
    envvar="CONTROLPLANE_TLS_CERT",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Serve TLS with this certificate chain (PEM); re-read on SIGHUP.",
)
@click.option(
    "--tls-key",
    envvar="CONTROLPLANE_TLS_KEY",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The certificate's private key (PEM).",
)
@click.option(
    "--tls-client-ca",
    envvar="CONTROLPLANE_TLS_CLIENT_CA",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Mutual TLS: clients must present a certificate this CA signed.",
)
@click.option(
    "--insecure",
    envvar="CONTROLPLANE_INSECURE",
    is_flag=True,
    default=False,
    help="Allow plaintext on an address that is not loopback (logged as a warning).",
)
@click.option(
    "--no-auth",
    envvar="CONTROLPLANE_NO_AUTH",
    is_flag=True,
    default=False,
    help="Serve without authentication on an address that is not loopback (logged as a "
    "warning); without it, such an address needs --auth-file.",
)
@click.option(
    "--etcd-insecure",
    envvar="CONTROLPLANE_ETCD_INSECURE",
    is_flag=True,
    default=False,
    help="Allow plaintext to etcd endpoints that are not loopback (without it they need "
    "--etcd-ca).",
)
@click.option(
    "--max-streams-per-identity",
    envvar="CONTROLPLANE_MAX_STREAMS_PER_IDENTITY",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Most open Sync and WatchChanges streams per identity in each server process "
    "(0: by role, 20000 for an agent identity, 100 for the others; max_streams in the "
    "auth file overrides it per identity).",
)
@click.option(
    "--workers",
    envvar="CONTROLPLANE_WORKERS",
    type=click.IntRange(min=1, max=256),
    default=1,
    show_default=True,
    help="Server processes on the one address (SO_REUSEPORT), each with its own etcd "
    "watch: agents' connections, and the fan-out, spread over cores. Above 1, a "
    "supervisor process starts them, restarts one that dies and serves --metrics for all.",
)
@click.option(
    "--max-message-bytes",
    envvar="CONTROLPLANE_MAX_MESSAGE_BYTES",
    type=click.IntRange(min=1024, max=64 * 1024 * 1024),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Largest request message accepted (RESOURCE_EXHAUSTED beyond; over HTTP, the "
    "largest body: 413 beyond).",
)
def serve(
    listen: str,
    http: str | None,
    http_cors_origins: tuple[str, ...],
    notify_file: Path | None,
    etcd: str,
    prefix: str,
    metrics: str,
    log_format: str,
    etcd_timeout: timedelta,
    audit_retention: timedelta,
    stale_after: timedelta,
    data_dir: Path,
    embedded_etcd_port: int,
    auth_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    insecure: bool,
    max_streams_per_identity: int,
    max_message_bytes: int,
    etcd_ca: Path | None,
    etcd_cert: Path | None,
    etcd_key: Path | None,
    etcd_server_name: str | None,
    etcd_user: str | None,
    etcd_password_file: Path | None,
    no_auth: bool,
    etcd_insecure: bool,
    workers: int,
) -> None:
    """Run the control server until SIGTERM or SIGINT; SIGHUP re-reads the auth file
    and the TLS certificates."""
    configure_logging(log_format)
    if etcd_timeout <= timedelta(0):
        raise click.BadParameter("must be positive", param_hint="--etcd-timeout")
    if audit_retention < MIN_AUDIT_RETENTION:
        raise click.BadParameter(
            f"must be at least {MIN_AUDIT_RETENTION} (the audit trail is for the post-mortem)",
            param_hint="--audit-retention",
        )
    if not prefix.startswith("/"):
        raise click.BadParameter(f"{prefix!r} must start with '/'", param_hint="--prefix")
    if metrics not in ("", "off") and split_host_port(metrics) is None:
        raise click.BadParameter(
            f"{metrics!r} is not HOST:PORT (e.g. 127.0.0.1:9464; 'off': no metrics endpoint)",
            param_hint="--metrics",
        )
    if http is not None and split_host_port(http) is None:
        raise click.BadParameter(
            f"{http!r} is not HOST:PORT (e.g. 127.0.0.1:8016)", param_hint="--http"
        )
    for origin in http_cors_origins:
        if not _ORIGIN.fullmatch(origin):
            raise click.BadParameter(
                f"{origin!r} is not a web origin: give scheme://host[:port] with no path "
                "(e.g. https://app.example.com), or '*' for any",
                param_hint="--http-cors-origin",
            )
    if http_cors_origins and http is None:
        raise click.UsageError("--http-cors-origin needs --http (the OFREP routes are there)")
    endpoints = [e.strip() for e in etcd.split(",") if e.strip()]
    etcd_security = _etcd_security(
        etcd_ca, etcd_cert, etcd_key, etcd_server_name, etcd_user, etcd_password_file
    )
    if etcd_security is not None and not endpoints:
        raise click.UsageError("--etcd-ca/--etcd-cert/--etcd-user need --etcd (an external etcd)")
    if endpoints:
        try:
            normalize_endpoints(endpoints, tls=etcd_security is not None and etcd_security.uses_tls)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--etcd") from None
    config = ServerConfig(
        listen=listen,
        http=http,
        http_cors_origins=tuple(http_cors_origins),
        notify_file=notify_file,
        etcd=endpoints,
        prefix=prefix if prefix.endswith("/") else prefix + "/",
        metrics=None if metrics in ("", "off") else metrics,
        etcd_timeout=etcd_timeout.total_seconds(),
        audit_retention=audit_retention,
        stale_after=stale_after,
        data_dir=data_dir,
        embedded_etcd_client_port=embedded_etcd_port,
        embedded_etcd_peer_port=0 if embedded_etcd_port == 0 else embedded_etcd_port + 1,
        auth_file=auth_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        insecure=insecure,
        max_streams_per_identity=max_streams_per_identity or None,
        max_message_bytes=max_message_bytes,
        etcd_security=etcd_security,
        no_auth=no_auth,
        etcd_insecure=etcd_insecure,
    )
    if workers > 1:
        try:
            run_workers(config, workers, log_format)
        except (ServerConfigError, WorkerStartError) as exc:
            raise StartError(str(exc)) from None
        return
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_event_loop(serve_until_stopped(config))
    except (ServerConfigError, AuthFileError) as exc:
        raise StartError(str(exc)) from None


def _etcd_security(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    server_name: str | None,
    user: str | None,
    password_file: Path | None,
) -> EtcdSecurity | None:
    """The etcd TLS and user settings; the password from its file or the environment."""
    password = os.environ.get("CONTROLPLANE_ETCD_PASSWORD") or None
    if password_file is not None:
        what = "the etcd password file (--etcd-password-file)"
        try:
            raw, warning = read_guarded(password_file, what, secret=True)
            password = raw.decode("utf-8").rstrip("\r\n")
        except UnsafeFileError as exc:
            raise click.BadParameter(str(exc), param_hint="--etcd-password-file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(
                f"cannot read {password_file}: {exc}", param_hint="--etcd-password-file"
            ) from None
        if warning is not None:
            log.warning("secret_file_readable", file=str(password_file), message=warning)
    if not any((ca, cert, key, server_name, user, password)):
        return None
    try:
        return EtcdSecurity(
            ca=ca, cert=cert, key=key, user=user, password=password, server_name=server_name
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@click.option(
    "--hash",
    "hash_only",
    is_flag=True,
    help="Read a token on stdin and print only its SHA-256 (for the auth file).",
)
def token(hash_only: bool) -> None:
    """Make a new random token and print it with its SHA-256 for the auth file.

    The token goes to the client (CPCTL_TOKEN, a token file); only the hash goes in the
    auth file. Nothing is stored.
    """
    if hash_only:
        text = sys.stdin.readline().strip()
        if not text:
            raise click.ClickException("no token on stdin")
        click.echo(hash_token(text))
        return
    new = secrets.token_urlsafe(32)
    click.echo(f"token:        {new}")
    click.echo(f"token_sha256: {hash_token(new)}")
