"""The ``cp-agent`` command: options from the command line and the environment,
signals, exit status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click

from agents._config import (
    ENV_CACHE_PATH,
    ENV_INSECURE,
    ENV_INSTANCE_ID,
    ENV_SERVERS,
    ENV_SERVICE,
    ENV_TLS,
    ENV_TLS_CA,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    ENV_TLS_SERVER_NAME,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ENV_VERSION,
    AgentConfigError,
)
from agents.sidecar._options import (
    DEFAULT_LISTEN,
    ENV_HOOK_ATTEMPTS,
    ENV_HOOK_TIMEOUT,
    ENV_LISTEN,
    ENV_LOG_LEVEL,
    ENV_ON_CHANGE,
    ENV_ON_PIN_CHANGE,
    ENV_STATE_FILE,
    HOOK_ATTEMPTS,
    HOOK_TIMEOUT,
    SECURITY_NAMES,
    SidecarOptions,
)
from agents.sidecar._sidecar import Sidecar
from controlplane.transport import TransportConfigError

log = logging.getLogger("agents.sidecar")


@dataclass
class _Signals:
    """SIGTERM and SIGINT, turned into a byte on a pipe the main thread reads.

    The handler only writes to a pipe: it takes no lock, so it cannot deadlock
    with whatever the main thread was doing when the signal came. The pipe is also
    the interpreter's wakeup fd: the kernel may deliver the signal to another thread
    (the agent's, the HTTP server's), and then Python's handler would only run once
    the main thread woke up, which it never does while it blocks reading the pipe.
    """

    read_fd: int = -1
    write_fd: int = -1
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        signal.set_wakeup_fd(self.write_fd)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(self.write_fd, bytes([signum]))

    def wait(self) -> int:
        """Block until a signal came; a second one then ends the process at once."""
        signum = os.read(self.read_fd, 1)[0]
        for other in self.previous:
            signal.signal(other, signal.SIG_DFL)
        return signum


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


@click.command(
    name="cp-agent",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--service", envvar=ENV_SERVICE, show_envvar=True, required=True, help="Service.")
@click.option(
    "--servers",
    envvar=ENV_SERVERS,
    show_envvar=True,
    required=True,
    help="Control servers, host:port, comma-separated.",
)
@click.option(
    "--version",
    envvar=ENV_VERSION,
    show_envvar=True,
    default="",
    help="The version the service runs (status shows drift from the pin).",
)
@click.option("--instance-id", envvar=ENV_INSTANCE_ID, show_envvar=True, default=None)
@click.option(
    "--cache",
    envvar=ENV_CACHE_PATH,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Cache file to boot from when no server answers.",
)
@click.option(
    "--listen",
    envvar=ENV_LISTEN,
    show_envvar=True,
    default=DEFAULT_LISTEN,
    show_default=True,
    help="HTTP address (port 0: any free port).",
)
@click.option(
    "--state-file",
    envvar=ENV_STATE_FILE,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON file rewritten atomically on every change.",
)
@click.option(
    "--on-change",
    envvar=ENV_ON_CHANGE,
    show_envvar=True,
    default=None,
    help="Shell command run on every change (the change as JSON on stdin).",
)
@click.option(
    "--on-pin-change",
    envvar=ENV_ON_PIN_CHANGE,
    show_envvar=True,
    default=None,
    help="Shell command run when the pinned version changes (the redeploy hook).",
)
@click.option(
    "--hook-timeout",
    envvar=ENV_HOOK_TIMEOUT,
    show_envvar=True,
    type=click.FloatRange(min=0, min_open=True),
    default=HOOK_TIMEOUT,
    show_default=True,
    help="Seconds a hook may run before it is killed.",
)
@click.option(
    "--hook-attempts",
    envvar=ENV_HOOK_ATTEMPTS,
    show_envvar=True,
    type=click.IntRange(min=1),
    default=HOOK_ATTEMPTS,
    show_default=True,
    help="Attempts per change before a failing hook is given up.",
)
@click.option(
    "--token-file",
    envvar=ENV_TOKEN_FILE,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"File holding the bearer token, read again for each connection. Or put the token in "
    f"{ENV_TOKEN}; there is no --token option, since command lines show up in `ps`.",
)
@click.option(
    "--tls",
    is_flag=True,
    envvar=ENV_TLS,
    show_envvar=True,
    help="Connect with TLS, verifying the servers against the system's CA roots (implied by "
    "--tls-ca and --tls-cert).",
)
@click.option(
    "--tls-ca",
    envvar=ENV_TLS_CA,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA certificates (PEM) that verify the servers; turns TLS on.",
)
@click.option(
    "--tls-cert",
    envvar=ENV_TLS_CERT,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Client certificate (PEM) for mutual TLS; needs --tls-key; turns TLS on.",
)
@click.option(
    "--tls-key",
    envvar=ENV_TLS_KEY,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The client certificate's private key (PEM).",
)
@click.option(
    "--tls-server-name",
    envvar=ENV_TLS_SERVER_NAME,
    show_envvar=True,
    default=None,
    metavar="NAME",
    help="Verify the servers' certificates for NAME instead of the hosts in --servers.",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar=ENV_INSECURE,
    show_envvar=True,
    help="Allow plaintext to servers that are not on loopback.",
)
@click.option(
    "--log-level",
    envvar=ENV_LOG_LEVEL,
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
def _command(
    service: str,
    servers: str,
    version: str,
    instance_id: str | None,
    cache: Path | None,
    listen: str,
    state_file: Path | None,
    on_change: str | None,
    on_pin_change: str | None,
    hook_timeout: float,
    hook_attempts: int,
    token_file: Path | None,
    tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_server_name: str | None,
    insecure: bool,
    log_level: str,
) -> None:
    """Run the control plane's agent for one service, serving its state over local
    HTTP and a state file and running hooks on change, until SIGTERM or SIGINT."""
    _configure_logging(log_level)
    ctx = click.get_current_context()
    # --token-file given here wins over CONTROLPLANE_TOKEN; from the environment,
    # the agent reads both variables itself (and refuses the two together).
    if ctx.get_parameter_source("token_file") is not click.core.ParameterSource.COMMANDLINE:
        token_file = None
    options = SidecarOptions(
        service=service,
        servers=tuple(s.strip() for s in servers.split(",") if s.strip()),
        version=version,
        instance_id=instance_id,
        cache=cache,
        listen=listen,
        state_file=state_file,
        on_change=on_change or None,
        on_pin_change=on_pin_change or None,
        hook_timeout=hook_timeout,
        hook_attempts=hook_attempts,
        token_file=token_file,
        # A flag not given is None: the agent's variable (already read here) decides.
        tls=tls or None,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_server_name=tls_server_name,
        insecure=insecure or None,
    )
    try:
        sidecar = Sidecar(options)
    except AgentConfigError as exc:
        cause = exc.__cause__
        if isinstance(cause, TransportConfigError):
            raise click.UsageError(cause.render(SECURITY_NAMES)) from None
        raise click.UsageError(str(exc)) from None
    signals = _Signals()
    # Before anything starts: a signal during start-up is handled after it.
    signals.install()
    try:
        sidecar.start()
    except OSError as exc:
        log.error("sidecar_listen_failed address=%s error=%s", listen, exc)
        sidecar.stop()
        raise SystemExit(1) from None
    signum = signals.wait()
    log.info("sidecar_stopping signal=%s", signal.Signals(signum).name)
    sidecar.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``cp-agent`` console script."""
    _command.main(args=argv, prog_name="cp-agent")
