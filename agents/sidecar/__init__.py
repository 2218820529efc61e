"""``cp-agent``: the agent SDK in a process of its own, for services in any language.

    cp-agent --service checkout --servers 10.0.0.5:50051,10.0.0.6:50051 \\
             --tls-ca /etc/controlplane/ca.pem --token-file /run/secrets/cp-token \\
             --version v1.5.0 --cache /var/cache/cp-agent/checkout.json \\
             --state-file /run/cp-agent/checkout.json \\
             --on-change /etc/cp-agent/reload.sh --on-pin-change /etc/cp-agent/redeploy.sh

(``python -m agents.sidecar`` runs the same.) It runs one :class:`agents.Agent`
and offers its state three ways: a local HTTP JSON endpoint, a state file, and
hooks run on change.

Options (argument > environment variable > default; the SDK's own variables
where the SDK has the setting)::

    --service S          CONTROLPLANE_SERVICE       required
    --servers A,B        CONTROLPLANE_SERVERS       required, host:port, comma-separated
    --version V          CONTROLPLANE_VERSION       the version the service runs
    --instance-id I      CONTROLPLANE_INSTANCE_ID   <hostname>-<pid>-<random>
    --cache PATH         CONTROLPLANE_CACHE_PATH    none: no boot from a cache file
    --listen HOST:PORT   CP_AGENT_LISTEN            127.0.0.1:9465 (port 0: any free port)
    --state-file PATH    CP_AGENT_STATE_FILE        none: no state file
    --on-change CMD      CP_AGENT_ON_CHANGE         none
    --on-pin-change CMD  CP_AGENT_ON_PIN_CHANGE     none
    --hook-timeout SECS  CP_AGENT_HOOK_TIMEOUT      300: a hook running longer is killed
    --hook-attempts N    CP_AGENT_HOOK_ATTEMPTS     5: attempts per change before giving up
    --log-level LEVEL    CP_AGENT_LOG_LEVEL         info

Connection to the servers (the SDK's settings, see ``agents._config``)::

    --token-file PATH    CONTROLPLANE_TOKEN_FILE        none; read again for each connection
    (no option)          CONTROLPLANE_TOKEN             the token itself (no --token: command
                                                        lines show up in ``ps``)
    --tls                CONTROLPLANE_TLS               off; on: TLS with the system's CA roots
    --tls-ca PATH        CONTROLPLANE_TLS_CA            none; CA certificates (PEM), TLS on
    --tls-cert PATH      CONTROLPLANE_TLS_CLIENT_CERT   none; client certificate (mutual TLS)
    --tls-key PATH       CONTROLPLANE_TLS_CLIENT_KEY    none; its key (with --tls-cert)
    --tls-server-name N  CONTROLPLANE_TLS_SERVER_NAME   the host in --servers
    --insecure           CONTROLPLANE_INSECURE          off: plaintext only to loopback servers

A token the server refuses is logged as an error (``agent_auth_failed``); the
agent keeps retrying and serving its last known state.

The endpoint has no authentication: it listens on loopback by default, and a
warning is logged when it does not. It logs ``sidecar_listening address=HOST:PORT``
once it accepts connections.

HTTP endpoints (GET or HEAD; JSON bodies; every body names the agent ``state``
and the ``revision`` it answers from)::

    /v1/state                    the whole effective state: flags (and the scope
                                 each comes from), shedding, pin, revision, agent
                                 state, running version, hook status
    /v1/flags                    every flag's value
    /v1/flags/NAME               one flag: value, type, scope, why, until when;
                                 404 {"error": "flag_not_found", ...} when not set
    /v1/shed?criticality=X[&key=K]
                                 {"shed": true|false, ...}: the decision for a
                                 request of that criticality (the four tier names;
                                 missing or anything else: CRITICAL), stable per
                                 key when one is given, at random otherwise
    /v1/pin                      the pin (or null), the running version, drift
    /healthz                     200 when READY; 503 otherwise, with the state:
                                 STALE (no server reachable) still serves the last
                                 known state, and the body says so; CONNECTING has
                                 none yet. Use it for readiness and alerts, not as
                                 a liveness probe: a restart during a control-plane
                                 outage loses nothing but gains nothing either.

Anything else is 404 (unknown path) or 405 (another method), in JSON.

The state file (``--state-file``) holds the ``/v1/state`` document. It is
replaced atomically (a temporary file in the same directory, fsync, rename,
fsync of the directory; mode 0644) whenever what it says changes: a change from
the server, a time-boxed change expiring, the agent state (READY/STALE) or a
hook's status; readers see the old file or the new one, never a part. It stays
when the sidecar stops (fail static: the last state is still the best one).

Hooks. ``--on-change CMD`` runs (``/bin/sh -c CMD``) for every change a service
sees (flags, shedding, pin), with the change as JSON on stdin::

    {"service": "checkout", "revision": 12, "state": "READY", "expired": false,
     "flags": {"new-ui": {"old": true, "new": false}},
     "shedding": {"old": null, "new": {"tier": "SHEDDABLE", "percent": 30.0, ...}} | null,
     "pin": {"old": null, "new": {"version": "v1.4.2", ...}} | null}

and in the environment: ``CP_SERVICE``, ``CP_REVISION``, ``CP_STATE``,
``CP_EXPIRED`` (``1`` when a time-boxed change expired: the revision does not
change then), ``CP_CHANGED_FLAGS`` (names, comma-separated), ``CP_SHEDDING_CHANGED``
and ``CP_PIN_CHANGED`` (``1``/``0``), when the shedding level changed
``CP_SHED_TIER`` / ``CP_SHED_PERCENT`` (the new level; empty when removed), when
the pin changed ``CP_PIN_VERSION`` (the new one; empty when unpinned), and
``CP_STATE_FILE``.

``--on-pin-change CMD``, the redeploy hook, runs when the pinned version changes
(a pin, a different version, an unpin; not a new reason or expiry on the same
version), with ``{"service", "revision", "pin", "previous", "running_version"}``
on stdin and ``CP_SERVICE``, ``CP_REVISION``, ``CP_PIN_VERSION`` (empty: unpinned),
``CP_PREVIOUS_PIN_VERSION``, ``CP_PIN_REASON``, ``CP_RUNNING_VERSION`` in the
environment. It compares with the version it last handed to the hook, so the
redeploy runs once per pin, also across restarts when there is a state file.

For both hooks:

- They run on a worker thread of their own (never the agent's), one run at a
  time, in revision order. Changes arriving while the hook runs (or waits to
  retry) are merged into its next run: old values from the first, new ones from
  the last, the newest revision; a change undone meanwhile is not run at all.
- A failing run (non-zero exit, killed, over ``--hook-timeout``) is logged with
  the end of its output and retried with exponential backoff (1 s, 2 s, 4 s ...,
  at most 30 s, jittered) up to ``--hook-attempts`` attempts, then logged as given
  up (``hook_given_up``); the next change runs it again.
- Never twice for the same change: the agent reports each change once, and each
  report is handed to the hook once (retries of a failed run aside). The state
  file records the last change each hook finished with, and a restarted sidecar
  does not run the hooks again for the state it finds already handed over (a
  run cut short by a crash or a stop runs again: at least once across
  restarts). Without a state file, the first state after a start is new to the
  hooks (the pin hook sees a pin from nothing; it gets ``CP_RUNNING_VERSION`` to
  tell whether anything needs doing).

Lifecycle: SIGTERM or SIGINT stops it: the endpoint closes, the agent closes
(writing its cache), the state file gets its last write, a running hook gets
``HOOK_STOP_GRACE`` seconds to finish (then its process group is killed), hook
runs not yet started are dropped with a warning. Exit status 0 after a clean
stop, 2 for an invalid option, 1 when the address cannot be bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol

import click

from agents import _shed
from agents._atomic import write_atomic
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
from agents._state import Snapshot, StateChange
from agents._types import Criticality, FlagValue, PinnedVersion, SheddingLevel
from controlplane.transport import TransportConfigError

__all__ = [
    "HookResult",
    "HookRunner",
    "PinHookRunner",
    "Response",
    "Sidecar",
    "SidecarOptions",
    "main",
    "merge_changes",
    "retry_delay",
]

log = logging.getLogger("agents.sidecar")

DEFAULT_LISTEN = "127.0.0.1:9465"
HOOK_ATTEMPTS = 5
HOOK_TIMEOUT = 300.0
HOOK_BACKOFF = 1.0
"""Seconds before the first retry of a failed hook; doubled per attempt."""
HOOK_BACKOFF_CAP = 30.0
HOOK_STOP_GRACE = 10.0
"""Seconds a running hook may take to finish when the sidecar stops."""
STATE_POLL_INTERVAL = 0.1
"""Seconds between the state file writer's looks at the agent state (READY,
STALE), which no change callback reports; changes themselves wake it at once."""
STATE_FILE_MODE = 0o644
"""The state file's permissions: readable by the service's other users."""
_OUTPUT_TAIL = 2000

ENV_LISTEN = "CP_AGENT_LISTEN"
ENV_STATE_FILE = "CP_AGENT_STATE_FILE"
ENV_ON_CHANGE = "CP_AGENT_ON_CHANGE"
ENV_ON_PIN_CHANGE = "CP_AGENT_ON_PIN_CHANGE"
ENV_HOOK_TIMEOUT = "CP_AGENT_HOOK_TIMEOUT"
ENV_HOOK_ATTEMPTS = "CP_AGENT_HOOK_ATTEMPTS"
ENV_LOG_LEVEL = "CP_AGENT_LOG_LEVEL"


class SidecarAgent(Protocol):
    """What the sidecar needs of an agent: :class:`agents.Agent`, or
    :class:`agents.testing.StaticAgent` in tests.

    The sidecar lives in the SDK's package and reads the agent's immutable
    snapshot itself: one attribute read gives flags, shedding, pin and revision
    of one and the same revision.
    """

    _snapshot: Snapshot

    @property
    def state(self) -> str: ...

    def on_change(self, callback: Callable[[StateChange], None]) -> Callable[[], None]: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    """The sidecar's settings (see the module docstring for each)."""

    service: str
    servers: tuple[str, ...] = ()
    version: str = ""
    instance_id: str | None = None
    cache: Path | None = None
    listen: str = DEFAULT_LISTEN
    state_file: Path | None = None
    on_change: str | None = None
    on_pin_change: str | None = None
    hook_timeout: float = HOOK_TIMEOUT
    hook_attempts: int = HOOK_ATTEMPTS
    hook_backoff: float = HOOK_BACKOFF
    """Seconds before a hook's first retry (tests make it short)."""
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    tls: bool | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    insecure: bool | None = None
    """The connection settings, as the agent's arguments (None: the agent's
    environment variable, else its default)."""


SECURITY_NAMES = {
    "token": ENV_TOKEN,
    "token_file": f"--token-file/{ENV_TOKEN_FILE}",
    "tls": f"--tls/{ENV_TLS}",
    "ca": f"--tls-ca/{ENV_TLS_CA}",
    "cert": f"--tls-cert/{ENV_TLS_CERT}",
    "key": f"--tls-key/{ENV_TLS_KEY}",
    "server_name": f"--tls-server-name/{ENV_TLS_SERVER_NAME}",
    "insecure": f"--insecure/{ENV_INSECURE}",
}
"""What cp-agent's errors call the connection settings (``controlplane.transport``)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6; port 0: any free port) as a pair.

    Raises:
        ValueError: It is not that.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- documents


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _shedding_doc(level: SheddingLevel | None) -> dict[str, Any] | None:
    if level is None:
        return None
    return {"tier": level.tier.name, "percent": level.percent}


def _pin_doc(pin: PinnedVersion | None) -> dict[str, Any] | None:
    if pin is None:
        return None
    return {
        "version": pin.version,
        "reason": pin.reason,
        "since": _time(pin.since),
        "expires_at": _time(pin.expires_at),
    }


def _flag_type(value: FlagValue) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float | int):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def change_document(
    service: str, change: StateChange, state: str, *, expired: bool = False
) -> dict[str, Any]:
    """The JSON an ``--on-change`` hook gets on stdin for ``change``."""
    doc: dict[str, Any] = {
        "service": service,
        "revision": change.revision,
        "state": state,
        "expired": expired,
        "flags": {name: {"old": old, "new": new} for name, (old, new) in change.flags.items()},
        "shedding": None,
        "pin": None,
    }
    if change.shedding is not None:
        old_level, new_level = change.shedding
        doc["shedding"] = {"old": _shedding_doc(old_level), "new": _shedding_doc(new_level)}
    if change.pin is not None:
        old_pin, new_pin = change.pin
        doc["pin"] = {"old": _pin_doc(old_pin), "new": _pin_doc(new_pin)}
    return doc


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer: status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        """The body as UTF-8 JSON with a final newline."""
        return (json.dumps(self.body, ensure_ascii=False) + "\n").encode()


# ---------------------------------------------------------------- hooks


def _same(a: object, b: object) -> bool:
    # True == 1.0 in Python, but a kill switch turning into a number is a change.
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return a == b


def _merge_pair(first: tuple[Any, Any] | None, then: tuple[Any, Any] | None) -> Any:
    if first is None:
        return then
    if then is None:
        return first
    return None if first[0] == then[1] else (first[0], then[1])


def merge_changes(first: StateChange, then: StateChange) -> StateChange:
    """One change that takes a service from before ``first`` to after ``then``.

    Old values come from ``first``, new ones from ``then``; what ``then`` undid
    of ``first`` drops out (the result may be empty). The revision is ``then``'s.
    """
    flags = dict(first.flags)
    for name, (old, new) in then.flags.items():
        before = first.flags[name][0] if name in first.flags else old
        if _same(before, new):
            flags.pop(name, None)
        else:
            flags[name] = (before, new)
    # Every other field is an ``(old, new)`` pair or None (shedding, pin, and any
    # the SDK adds): merged alike.
    pairs = {
        f.name: _merge_pair(getattr(first, f.name), getattr(then, f.name))
        for f in dataclasses.fields(StateChange)
        if f.name not in ("revision", "flags")
    }
    return StateChange(revision=then.revision, flags=flags, **pairs)


@dataclass(frozen=True, slots=True)
class HookResult:
    """How one run of a hook command went."""

    ok: bool
    detail: str
    """``exit status 0``, ``exit status 3``, ``killed by SIGKILL``, ``timed out
    after 5s``, ``could not start: ...``."""
    output: str = ""
    """The end of what it wrote (stdout and stderr)."""


Executor = Callable[[str, bytes, Mapping[str, str], float], HookResult]
"""Runs ``command`` with ``stdin``, ``env`` and a timeout (tests pass a fake)."""


@dataclass(slots=True)
class _Job:
    change: StateChange
    expired: bool
    state: str = "READY"


@dataclass(slots=True)
class _Ledger:
    """The last change a hook finished with (handed over, or given up on)."""

    revision: int
    result: str
    attempts: int
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "result": self.result, "attempts": self.attempts}


class HookRunner:
    """The ``--on-change`` hook: runs one command for the changes submitted, on a
    worker thread of its own, one run at a time, in order (see the module
    docstring for merging, retries and the ledger).

    Args:
        command: A ``/bin/sh -c`` command line.
        service: The service, for the payload and ``CP_SERVICE``.
        attempts: Attempts per change before giving up.
        timeout: Seconds a run may take before it is killed and counts as failed.
        backoff: Seconds before the first retry (doubled per attempt, at most
            ``HOOK_BACKOFF_CAP``, times a random factor in [0.5, 1)).
        last: The ``last`` entry of this hook in a previous run's state file:
            a first change at or below its revision is not run again.
        on_status: Called (from any thread) when the status changes, for the
            state file.
        execute: Runs a command; the default runs it in a new process group.
        env: Extra environment variables for every run.

    Lifecycle: :meth:`start` once; :meth:`submit` from any thread (it only
    queues); :meth:`stop` is idempotent.
    """

    kind = "on_change"

    def __init__(
        self,
        command: str,
        *,
        service: str,
        attempts: int = HOOK_ATTEMPTS,
        timeout: float = HOOK_TIMEOUT,
        backoff: float = HOOK_BACKOFF,
        last: Mapping[str, Any] | None = None,
        on_status: Callable[[], None] = lambda: None,
        execute: Executor | None = None,
        env: Mapping[str, str] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.command = command
        self.service = service
        self.attempts = attempts
        self.timeout = timeout
        self.backoff = backoff
        self._on_status = on_status
        self._execute = execute or self._run_process
        self._env = dict(env or {})
        self._rand = rand
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._busy = False
        self._stopping = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._last = _parse_ledger(last)
        # The first change after a start may repeat what a previous run handed
        # over (the cache loaded, or the same revision from the server).
        self._floor = self._last.revision if self._last is not None else 0
        self._first = True
        self._last_revision: int | None = None
        self.runs = 0
        """Commands started so far (attempts included)."""

    # ------------------------------------------------------------ the agent's side

    def submit(self, change: StateChange, state: str = "READY") -> None:
        """Queue ``change`` for the hook (merged with one already queued)."""
        with self._cond:
            job = self._accept(change, state)
            if job is None or self._stopping:
                return
            self._pending = job if self._pending is None else self._merge(self._pending, job)
            self._cond.notify_all()
        self._on_status()

    def _accept(self, change: StateChange, state: str) -> _Job | None:
        first, self._first = self._first, False
        previous, self._last_revision = self._last_revision, change.revision
        if first and change.revision <= self._floor:
            log.info(
                "hook_skipped hook=%s revision=%d (handed over before the restart)",
                self.kind,
                change.revision,
            )
            return None
        # The agent reports each change once; one at the revision already
        # reported is the clock's (a time-boxed change expired).
        return _Job(change, previous is not None and change.revision <= previous, state)

    @staticmethod
    def _merge(first: _Job, then: _Job) -> _Job:
        return _Job(
            merge_changes(first.change, then.change), first.expired and then.expired, then.state
        )

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """For ``/v1/state`` and the state file: ``busy``, the ``pending``
        revision and the ``last`` change finished with."""
        with self._cond:
            return {
                "busy": self._busy,
                "pending": None if self._pending is None else self._pending.change.revision,
                "last": None if self._last is None else self._last_json(self._last),
            }

    def _last_json(self, last: _Ledger) -> dict[str, Any]:
        return last.to_json()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is running or queued; return whether that happened."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and self._pending is None, timeout)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._work, name=f"cp-agent-hook-{self.kind}", daemon=True
            )
            self._thread.start()

    def stop(self, grace: float = HOOK_STOP_GRACE) -> None:
        """Stop: drop what is queued, let a running command finish for ``grace``
        seconds, then kill its process group. Idempotent."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            dropped, self._pending = self._pending, None
            thread = self._thread
            self._cond.notify_all()
        if dropped is not None:
            log.warning(
                "hook_dropped hook=%s revision=%d (stopping before it ran)",
                self.kind,
                dropped.change.revision,
            )
        if thread is None:
            return
        thread.join(grace)
        if thread.is_alive():
            with self._cond:
                proc = self._proc
            if proc is not None:
                log.warning(
                    "hook_killed hook=%s (still running %ss after the stop)", self.kind, grace
                )
                _kill_group(proc)
            thread.join(5.0)

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stopping)
                if self._stopping or self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            self._on_status()
            try:
                self._run_job(job)
            except Exception:  # the worker must outlive whatever a run hits
                log.exception("hook_error hook=%s revision=%d", self.kind, job.change.revision)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                self._on_status()

    def _run_job(self, job: _Job) -> None:
        attempt = 0
        while True:
            prepared = self._prepare(job)
            if prepared is None:
                log.debug("hook_nothing_to_do hook=%s revision=%d", self.kind, job.change.revision)
                return
            payload, env = prepared
            attempt += 1
            with self._cond:
                self.runs += 1
            result = self._execute(
                self.command,
                json.dumps(payload).encode(),
                {**os.environ, **self._env, **env},
                self.timeout,
            )
            revision = job.change.revision
            if result.ok:
                log.info("hook_ran hook=%s revision=%d attempt=%d", self.kind, revision, attempt)
                self._finish(job, "ok", attempt)
                return
            if self._stopping:
                log.warning(
                    "hook_failed hook=%s revision=%d attempt=%d/%d result=%r output=%r "
                    "(stopping: no retry)",
                    self.kind,
                    revision,
                    attempt,
                    self.attempts,
                    result.detail,
                    result.output,
                )
                return
            if attempt >= self.attempts:
                log.error(
                    "hook_given_up hook=%s revision=%d attempts=%d result=%r output=%r",
                    self.kind,
                    revision,
                    attempt,
                    result.detail,
                    result.output,
                )
                self._finish(job, "gave_up", attempt)
                return
            delay = retry_delay(attempt, self.backoff, self._rand())
            log.warning(
                "hook_failed hook=%s revision=%d attempt=%d/%d result=%r retry_in=%.3f output=%r",
                self.kind,
                revision,
                attempt,
                self.attempts,
                result.detail,
                delay,
                result.output,
            )
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, delay)
                if self._stopping:
                    return
                if self._pending is not None:
                    # Newer changes arrived: the retry hands over everything at once.
                    job = self._merge(job, self._pending)
                    self._pending = None
                    attempt = 0

    def _prepare(self, job: _Job) -> tuple[dict[str, Any], dict[str, str]] | None:
        change = job.change
        if change.empty:
            return None  # merged away: undone before it ran
        payload = change_document(self.service, change, job.state, expired=job.expired)
        shedding_now = change.shedding[1] if change.shedding is not None else None
        pin_now = change.pin[1] if change.pin is not None else None
        env = {
            "CP_SERVICE": self.service,
            "CP_REVISION": str(change.revision),
            "CP_STATE": job.state,
            "CP_EXPIRED": "1" if job.expired else "0",
            "CP_CHANGED_FLAGS": ",".join(sorted(change.flags)),
            "CP_SHEDDING_CHANGED": "1" if change.shedding is not None else "0",
            "CP_PIN_CHANGED": "1" if change.pin is not None else "0",
        }
        if change.shedding is not None:
            env["CP_SHED_TIER"] = shedding_now.tier.name if shedding_now else ""
            env["CP_SHED_PERCENT"] = f"{shedding_now.percent:g}" if shedding_now else ""
        if change.pin is not None:
            env["CP_PIN_VERSION"] = pin_now.version if pin_now else ""
        return payload, env

    def _finish(self, job: _Job, result: str, attempts: int) -> None:
        with self._cond:
            self._last = _Ledger(job.change.revision, result, attempts)

    # ------------------------------------------------------------ running a command

    def _run_process(
        self, command: str, stdin: bytes, env: Mapping[str, str], timeout: float
    ) -> HookResult:
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env),
                # Its own process group: a timeout or a stop kills what it started
                # too, and a Ctrl-C at the sidecar's terminal does not reach it.
                start_new_session=True,
            )
        except OSError as exc:
            return HookResult(False, f"could not start: {exc}")
        with self._cond:
            self._proc = proc
        try:
            try:
                out, _ = proc.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                out, _ = proc.communicate()
                return HookResult(False, f"timed out after {timeout:g}s", _tail(out))
        finally:
            with self._cond:
                self._proc = None
        code = proc.returncode
        if code == 0:
            return HookResult(True, "exit status 0", _tail(out))
        if code < 0:
            return HookResult(False, f"killed by {signal.Signals(-code).name}", _tail(out))
        return HookResult(False, f"exit status {code}", _tail(out))


class PinHookRunner(HookRunner):
    """The ``--on-pin-change`` hook: runs when the pinned version differs from the
    one it last handed over (persisted as ``last.version`` in the state file)."""

    kind = "on_pin_change"

    def __init__(
        self, command: str, *, service: str, running_version: str = "", **kwargs: Any
    ) -> None:
        super().__init__(command, service=service, **kwargs)
        self.running_version = running_version
        # Without a previous run's record, the service counts as unpinned.
        self._handed: str | None = self._last.version if self._last is not None else None

    def _accept(self, change: StateChange, state: str) -> _Job | None:
        self._first = False
        pin = change.pin
        if pin is None:
            return None
        old, new = pin
        if (old.version if old else None) == (new.version if new else None):
            return None  # a new reason or expiry: nothing to redeploy
        return _Job(StateChange(revision=change.revision, flags={}, pin=pin), False, state)

    def _prepare(self, job: _Job) -> tuple[dict[str, Any], dict[str, str]] | None:
        pin = job.change.pin
        if pin is None:
            return None
        previous, current = pin
        version = current.version if current is not None else None
        if version == self._handed:
            return None  # back to what the hook last got: nothing to do
        payload = {
            "service": self.service,
            "revision": job.change.revision,
            "pin": _pin_doc(current),
            "previous": _pin_doc(previous),
            "running_version": self.running_version or None,
        }
        env = {
            "CP_SERVICE": self.service,
            "CP_REVISION": str(job.change.revision),
            "CP_PIN_VERSION": version or "",
            "CP_PREVIOUS_PIN_VERSION": previous.version if previous is not None else "",
            "CP_PIN_REASON": current.reason if current is not None else "",
            "CP_RUNNING_VERSION": self.running_version,
        }
        return payload, env

    def _finish(self, job: _Job, result: str, attempts: int) -> None:
        pin = job.change.pin
        version = pin[1].version if pin is not None and pin[1] is not None else None
        with self._cond:
            self._handed = version
            self._last = _Ledger(job.change.revision, result, attempts, version)

    def _last_json(self, last: _Ledger) -> dict[str, Any]:
        return {**last.to_json(), "version": last.version}


def retry_delay(attempt: int, base: float, rand: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (from 1): ``base`` doubled
    per attempt, at most ``HOOK_BACKOFF_CAP``, times ``0.5 + rand / 2`` (``rand`` in
    [0, 1)), so that hosts whose hooks failed together do not retry together."""
    return float(min(HOOK_BACKOFF_CAP, base * 2 ** (attempt - 1)) * (0.5 + rand / 2))


def _parse_ledger(last: Mapping[str, Any] | None) -> _Ledger | None:
    if not isinstance(last, Mapping):
        return None
    revision = last.get("revision")
    version = last.get("version")
    if not isinstance(revision, int) or isinstance(revision, bool):
        return None
    return _Ledger(
        revision=revision,
        result=str(last.get("result", "")),
        attempts=int(last.get("attempts", 0) or 0),
        version=version if isinstance(version, str) else None,
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(out: bytes | None) -> str:
    text = (out or b"").decode("utf-8", errors="replace").strip()
    return text[-_OUTPUT_TAIL:]


# ---------------------------------------------------------------- the state file


class _StateFileWriter:
    """Rewrites the state file on a thread of its own whenever ``key()`` changes."""

    def __init__(
        self,
        path: Path,
        document: Callable[[], dict[str, Any]],
        key: Callable[[], object],
        interval: float = STATE_POLL_INTERVAL,
    ) -> None:
        self.path = path
        self._document = document
        self._key = key
        self._interval = interval
        self._wakeup = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._written: object = None
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._loop, name="cp-agent-state-file", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self) -> None:
        """Stop the thread and write the last state. Idempotent."""
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join()
        self.write_if_changed()

    def _loop(self) -> None:
        while not self._stopping:
            self._wakeup.wait(self._interval)
            self._wakeup.clear()
            self.write_if_changed()

    def write_if_changed(self) -> None:
        with self._lock:
            key = self._key()
            if key == self._written:
                return
            data = (json.dumps(self._document(), ensure_ascii=False, indent=2) + "\n").encode()
            try:
                write_atomic(self.path, data, mode=STATE_FILE_MODE)
            except OSError as exc:
                # Retried at the next look; logged once per kind of failure.
                if str(exc) != self._failure:
                    log.error("state_file_write_failed path=%s error=%s", self.path, exc)
                self._failure = str(exc)
                return
            if self._failure is not None:
                log.info("state_file_written path=%s (again)", self.path)
            self._failure = None
            self._written = key


def _read_previous_hooks(path: Path, service: str) -> dict[str, Any]:
    """The ``hooks`` section of a previous run's state file (empty if none)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("state_file_unreadable path=%s error=%s (hooks start afresh)", path, exc)
        return {}
    if not isinstance(doc, dict) or doc.get("service") != service:
        log.warning("state_file_other path=%s (not this service's: hooks start afresh)", path)
        return {}
    hooks = doc.get("hooks")
    return hooks if isinstance(hooks, dict) else {}


# ---------------------------------------------------------------- HTTP


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    sidecar: Sidecar


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "cp-agent"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(self._handle())

    def do_HEAD(self) -> None:
        self._answer(self._handle(), body=False)

    def _refuse(self) -> None:
        # The request body is not read: close the connection after answering.
        self.close_connection = True
        self._answer(self._handle())

    def _handle(self) -> Response:
        try:
            return self.server.sidecar.handle(self.command, self.path)
        except Exception:
            log.exception("http_error method=%s path=%s", self.command, self.path)
            return Response(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": "internal", "message": "the sidecar failed to answer; see its log"},
            )

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _refuse

    def _answer(self, response: Response, *, body: bool = True) -> None:
        data = response.encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request client=%s " + format, self.address_string(), *args)


_ENDPOINTS = ("/v1/state", "/v1/flags", "/v1/flags/NAME", "/v1/shed", "/v1/pin", "/healthz")


# ---------------------------------------------------------------- the sidecar


class Sidecar:
    """The agent, the endpoint, the state file writer and the hooks of one sidecar.

    Args:
        options: The settings.
        agent: The agent to serve (tests pass a
            :class:`agents.testing.StaticAgent`); by default an
            :class:`agents.Agent` built from ``options``.
        execute: Runs hook commands (tests pass a fake); by default a process.

    Raises:
        AgentConfigError: A setting is missing or invalid.

    Lifecycle: construction validates and does no I/O; :meth:`start` binds the
    address, starts the threads and the agent (once); :meth:`stop` is
    idempotent (see the module docstring for the order).
    """

    def __init__(
        self,
        options: SidecarOptions,
        *,
        agent: SidecarAgent | None = None,
        execute: Executor | None = None,
    ) -> None:
        self.options = options
        try:
            self._listen = parse_listen(options.listen)
        except ValueError as exc:
            raise AgentConfigError(f"listen: {exc}") from None
        if options.hook_attempts < 1:
            raise AgentConfigError("hook attempts must be at least 1")
        if options.hook_timeout <= 0:
            raise AgentConfigError("hook timeout must be positive")
        if agent is None:
            from agents._agent import Agent

            agent = Agent(
                options.service,
                list(options.servers),
                version=options.version,
                instance_id=options.instance_id,
                cache_path=options.cache,
                token=options.token,
                token_file=options.token_file,
                tls=options.tls,
                tls_ca=options.tls_ca,
                tls_cert=options.tls_cert,
                tls_key=options.tls_key,
                tls_server_name=options.tls_server_name,
                insecure=options.insecure,
            )
        self.agent: SidecarAgent = agent
        self.service = options.service
        self._execute = execute
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._http: _HTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._writer: _StateFileWriter | None = None
        self._hooks: list[HookRunner] = []
        self._remove_callback: Callable[[], None] | None = None
        self._hooks_version = 0
        self.address = ""
        """``host:port`` the endpoint listens on, once started."""

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind the address, then start the hooks, the state file writer and the agent.

        Raises:
            OSError: The address cannot be bound (nothing was started).
            RuntimeError: The sidecar was stopped.
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError("the sidecar is stopped")
            if self._started:
                return
            self._started = True
        options = self.options
        host, port = self._listen
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self._http = server_class((host, port), _Handler)
        self._http.sidecar = self
        bound_host, bound_port = str(self._http.server_address[0]), self._http.server_address[1]
        self.address = (
            f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
        )
        if not _is_loopback(host):
            log.warning(
                "sidecar_not_loopback address=%s: the endpoint has no authentication; "
                "anyone who can reach it reads the state",
                self.address,
            )

        previous: dict[str, Any] = {}
        if options.state_file is not None:
            previous = _read_previous_hooks(options.state_file, self.service)
        common: dict[str, Any] = {
            "service": self.service,
            "attempts": options.hook_attempts,
            "timeout": options.hook_timeout,
            "backoff": options.hook_backoff,
            "on_status": self._hook_status_changed,
            "execute": self._execute,
            "env": {"CP_STATE_FILE": str(options.state_file or "")},
        }
        if options.on_change:
            self._hooks.append(
                HookRunner(options.on_change, last=_last_of(previous, "on_change"), **common)
            )
        if options.on_pin_change:
            self._hooks.append(
                PinHookRunner(
                    options.on_pin_change,
                    running_version=options.version,
                    last=_last_of(previous, "on_pin_change"),
                    **common,
                )
            )
        for hook in self._hooks:
            hook.start()
        if options.state_file is not None:
            self._writer = _StateFileWriter(options.state_file, self.document, self._state_key)
            self._writer.start()
        # Registered before the agent starts: the state loaded from the cache
        # (or the first one from a server) is the hooks' first change.
        self._remove_callback = self.agent.on_change(self._changed)
        self.agent.start()
        self._http_thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="cp-agent-http",
            daemon=True,
        )
        self._http_thread.start()
        log.info(
            "sidecar_listening address=%s service=%s state_file=%s hooks=%s",
            self.address,
            self.service,
            options.state_file,
            ",".join(h.kind for h in self._hooks) or "none",
        )

    def stop(self) -> None:
        """Close the endpoint and the agent, write the state file a last time,
        stop the hooks. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            started = self._started
        if not started:
            return
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.agent.close()
        if self._remove_callback is not None:
            self._remove_callback()
        for hook in self._hooks:
            hook.stop()
        if self._writer is not None:
            self._writer.stop()
        log.info("sidecar_stopped service=%s revision=%d", self.service, self._snapshot().revision)

    def __enter__(self) -> Sidecar:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def hooks(self) -> tuple[HookRunner, ...]:
        """The hook runners configured."""
        return tuple(self._hooks)

    # ------------------------------------------------------------ callbacks

    def _changed(self, change: StateChange) -> None:
        # The agent's thread: queue and wake, nothing that blocks.
        state = str(self.agent.state)
        for hook in self._hooks:
            hook.submit(change, state)
        if self._writer is not None:
            self._writer.wake()

    def _hook_status_changed(self) -> None:
        with self._lock:
            self._hooks_version += 1
        if self._writer is not None:
            self._writer.wake()

    def _state_key(self) -> object:
        # The snapshot itself, not its id(): an id may be reused once the old
        # snapshot is gone. Compared by identity first, so a look costs nothing.
        return (self._snapshot(), str(self.agent.state), self._hooks_version)

    def _snapshot(self) -> Snapshot:
        return self.agent._snapshot

    # ------------------------------------------------------------ documents

    def document(self) -> dict[str, Any]:
        """The ``/v1/state`` document (and the state file's content)."""
        snapshot = self._snapshot()
        return {
            "service": self.service,
            "instance_id": getattr(self.agent, "instance_id", None),
            "running_version": self.options.version or None,
            "state": str(self.agent.state),
            "server": getattr(self.agent, "server", None),
            "revision": snapshot.revision,
            "flags": dict(snapshot.flags),
            "flag_scopes": dict(snapshot.flag_scopes),
            "shedding": self._shedding(snapshot),
            "pin": _pin_doc(snapshot.pin),
            "override": self._override(),
            "hooks": {hook.kind: hook.status() for hook in self._hooks},
        }

    def _override(self) -> dict[str, Any] | None:
        """The break-glass override in force on this host, or None."""
        override = getattr(self.agent, "override", None)
        if not getattr(self.agent, "override_active", False) or override is None:
            return None
        return {
            "active": True,
            "reason": override.reason,
            "actor": override.actor,
            "expires_at": _time(override.expires_at),
            "content": json.loads(override.content_json),
        }

    def _about(self, snapshot: Snapshot) -> dict[str, Any]:
        return {"state": str(self.agent.state), "revision": snapshot.revision}

    @staticmethod
    def _shedding(snapshot: Snapshot) -> dict[str, Any] | None:
        doc = _shedding_doc(snapshot.shedding)
        record = snapshot.shedding_record
        if doc is not None and record is not None:
            doc["reason"] = record.meta.reason
            doc["expires_at"] = _time(record.meta.expires_at)
        return doc

    def handle(self, method: str, target: str) -> Response:
        """The answer to ``method target`` (the request line's path and query)."""
        url = urllib.parse.urlsplit(target)
        path = url.path.rstrip("/") or "/"
        if method not in ("GET", "HEAD"):
            return Response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": "method_not_allowed", "message": f"{method} is not allowed: GET only"},
                (("Allow", "GET, HEAD"),),
            )
        snapshot = self._snapshot()
        if path == "/v1/state":
            return Response(HTTPStatus.OK, self.document())
        if path == "/v1/flags":
            return Response(HTTPStatus.OK, {**self._about(snapshot), "flags": dict(snapshot.flags)})
        if path.startswith("/v1/flags/"):
            return self._flag(snapshot, urllib.parse.unquote(path[len("/v1/flags/") :]))
        if path == "/v1/shed":
            return self._shed(snapshot, urllib.parse.parse_qs(url.query))
        if path == "/v1/pin":
            return self._pin(snapshot)
        if path == "/healthz":
            return self._health(snapshot)
        return Response(
            HTTPStatus.NOT_FOUND,
            {
                "error": "not_found",
                "message": f"no endpoint {url.path}",
                "endpoints": list(_ENDPOINTS),
            },
        )

    def _flag(self, snapshot: Snapshot, name: str) -> Response:
        about = self._about(snapshot)
        if name not in snapshot.flags:
            return Response(
                HTTPStatus.NOT_FOUND,
                {
                    "error": "flag_not_found",
                    "message": f"flag {name!r} is not set for service {self.service!r}",
                    "name": name,
                    **about,
                },
            )
        value = snapshot.flags[name]
        scope = snapshot.flag_scopes.get(name, "")
        doc: dict[str, Any] = {
            "name": name,
            "value": value,
            "type": _flag_type(value),
            "scope": scope,
            **about,
        }
        record = snapshot.flag_records.get((scope, name))
        if record is not None:
            meta = record.meta
            doc.update(
                reason=meta.reason,
                incident=meta.incident or None,
                actor=meta.actor,
                set_at=_time(meta.set_at),
                expires_at=_time(meta.expires_at),
            )
        return Response(HTTPStatus.OK, doc)

    def _shed(self, snapshot: Snapshot, query: Mapping[str, list[str]]) -> Response:
        raw = query.get("criticality", [""])[0]
        key = query.get("key", [None])[0]
        # Tolerant, as the middleware is: missing or unknown counts as CRITICAL.
        criticality = Criticality.parse(raw) if raw else Criticality.CRITICAL
        if key is None:
            shed = _shed.should_shed(snapshot, criticality)
        else:
            shed = _shed.should_shed_key(snapshot, criticality, key)
        return Response(
            HTTPStatus.OK,
            {
                "shed": shed,
                "criticality": criticality.name,
                "key": key,
                "shedding": self._shedding(snapshot),
                **self._about(snapshot),
            },
        )

    def _pin(self, snapshot: Snapshot) -> Response:
        pin = snapshot.pin
        running = self.options.version or None
        drift = None if pin is None or running is None else pin.version != running
        return Response(
            HTTPStatus.OK,
            {
                "pin": _pin_doc(pin),
                "running_version": running,
                "drift": drift,
                **self._about(snapshot),
            },
        )

    def _health(self, snapshot: Snapshot) -> Response:
        state = str(self.agent.state)
        body: dict[str, Any] = {
            "state": state,
            "revision": snapshot.revision,
            "server": getattr(self.agent, "server", None),
            # A break-glass override is in force: health says so ("override active").
            "override_active": bool(getattr(self.agent, "override_active", False)),
        }
        if state == "READY":
            return Response(HTTPStatus.OK, {"status": "ok", "serving": True, **body})
        if state == "STALE":
            message = (
                "no control server reachable: serving the last known state "
                f"(revision {snapshot.revision}); /v1/* keep answering from it"
            )
            status = "stale"
        else:
            message = "no state from a control server yet: /v1/* answer with nothing set"
            status = state.lower()
        return Response(
            HTTPStatus.SERVICE_UNAVAILABLE,
            {"status": status, "serving": state == "STALE", "message": message, **body},
        )


def _last_of(previous: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    entry = previous.get(kind)
    last = entry.get("last") if isinstance(entry, dict) else None
    return last if isinstance(last, dict) else None


# ---------------------------------------------------------------- CLI


@dataclass
class _Signals:
    """SIGTERM and SIGINT, turned into a byte on a pipe the main thread reads.

    The handler only writes to a pipe: it takes no lock, so it cannot deadlock
    with whatever the main thread was doing when the signal came.
    """

    read_fd: int = -1
    write_fd: int = -1
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
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
