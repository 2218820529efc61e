"""The hooks: commands run on a change, retried, merged while one runs, their
last outcome kept across restarts in the state file.

A hook runs with the sidecar's environment less the sidecar's own settings (every
``CONTROLPLANE_*`` and ``CPCTL_*`` variable: the token, the token file, the TLS key...),
plus its ``CP_*`` variables. A failed run's output is logged cut to its last
:data:`_OUTPUT_TAIL` characters, with the sidecar's token written as ``<redacted>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agents._state import StateChange
from agents.sidecar._documents import change_document, pin_doc
from agents.sidecar._options import (
    HOOK_ATTEMPTS,
    HOOK_BACKOFF,
    HOOK_BACKOFF_CAP,
    HOOK_STOP_GRACE,
    HOOK_TIMEOUT,
)

log = logging.getLogger("agents.sidecar")


_OUTPUT_TAIL = 500
_CAPTURED = 8 * _OUTPUT_TAIL
"""What is kept of a run's output before redaction and the final cut."""
_SETTINGS_PREFIXES = ("CONTROLPLANE_", "CPCTL_")
"""Environment variables a hook does not get: the sidecar's own settings."""


def hook_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the sidecar's settings (token, token file, TLS files...)."""
    return {k: v for k, v in environ.items() if not k.upper().startswith(_SETTINGS_PREFIXES)}


def redacted(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret of at least 8 characters written as ``<redacted>``."""
    for secret in sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return text


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
        secrets: The secrets (the token) a failed run's logged output must not show.

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
        secrets: Callable[[], Iterable[str]] = tuple,
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
        self._secrets = secrets
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
                {**hook_environment(os.environ), **self._env, **env},
                self.timeout,
            )
            revision = job.change.revision
            if not result.ok and result.output:
                # Redacted before the cut: a token straddling the cut is not half shown.
                shown = redacted(result.output, self._secrets())[-_OUTPUT_TAIL:]
                result = dataclasses.replace(result, output=shown)
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
            "pin": pin_doc(current),
            "previous": pin_doc(previous),
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
    return text[-_CAPTURED:]
