"""The sidecar: the agent, the endpoint, the state file writer and the hooks of
one service, started and stopped together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST as METRICS_TYPE
from prometheus_client import CollectorRegistry, generate_latest

from agents import _shed
from agents._config import AgentConfigError
from agents._state import Snapshot, StateChange
from agents._types import Criticality
from agents.sidecar._documents import Response, flag_type, format_time, pin_doc, shedding_doc
from agents.sidecar._hooks import Executor, HookRunner, PinHookRunner
from agents.sidecar._http import ENDPOINTS, EndpointHandler, EndpointServer, EndpointServer6
from agents.sidecar._options import SidecarAgent, SidecarOptions, is_loopback, parse_listen
from agents.sidecar._state_file import StateFileWriter, read_previous_hooks

if TYPE_CHECKING:
    from agents._agent import Agent

log = logging.getLogger("agents.sidecar")


class Sidecar:
    """The agent, the endpoint, the state file writer and the hooks of one sidecar.

    Args:
        options: The settings.
        agent: The agent to serve (tests pass a
            :class:`agents.testing.StaticAgent`); by default an
            :class:`agents.Agent` built from ``options``, its metrics in
            ``registry``.
        execute: Runs hook commands (tests pass a fake); by default a process.
        registry: What ``/metrics`` serves (the agent's metrics, when the sidecar
            builds the agent); by default a registry of its own.

    Raises:
        AgentConfigError: A setting is missing or invalid.

    Lifecycle: construction validates and does no I/O; :meth:`start` binds the
    address, starts the threads and the agent (once); :meth:`stop` is
    idempotent (the order is in the ``agents.sidecar`` docstring).
    """

    def __init__(
        self,
        options: SidecarOptions,
        *,
        agent: SidecarAgent | None = None,
        execute: Executor | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.options = options
        self.registry = registry if registry is not None else CollectorRegistry()
        try:
            self._listen = parse_listen(options.listen)
        except ValueError as exc:
            raise AgentConfigError(f"listen: {exc}") from None
        if options.hook_attempts < 1:
            raise AgentConfigError("hook attempts must be at least 1")
        if options.hook_timeout <= 0:
            raise AgentConfigError("hook timeout must be positive")
        self._own_agent: Agent | None = None
        if agent is None:
            from agents._agent import Agent

            agent = self._own_agent = Agent(
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
                registry=self.registry,
            )
        self.agent: SidecarAgent = agent
        self.service = options.service
        self._execute = execute
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._http: EndpointServer | None = None
        self._http_thread: threading.Thread | None = None
        self._writer: StateFileWriter | None = None
        self._hooks: list[HookRunner] = []
        self._remove_callbacks: list[Callable[[], None]] = []
        self._hooks_version = 0
        self.address = ""
        """``host:port`` the endpoint listens on, once started."""

    def _secrets(self) -> list[str]:
        """What a hook's logged output must not show: the token, however it is given."""
        found = [self.options.token or ""]
        found += [v for k, v in os.environ.items() if k.upper().startswith("CONTROLPLANE_TOKEN")]
        paths = [self.options.token_file, os.environ.get("CONTROLPLANE_TOKEN_FILE")]
        for path in paths:
            if path:
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    found.append(Path(path).read_text(encoding="utf-8").strip())
        return [value.strip() for value in found if value.strip()]

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
        server_class = EndpointServer6 if ":" in host else EndpointServer
        self._http = server_class((host, port), EndpointHandler)
        self._http.sidecar = self
        name = host.strip("[]").lower()
        if name in ("", "0.0.0.0", "::"):
            self._http.allowed_hosts = None
        else:
            self._http.allowed_hosts = frozenset({"localhost", "127.0.0.1", "::1", name})
        bound_host, bound_port = str(self._http.server_address[0]), self._http.server_address[1]
        self.address = (
            f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
        )
        if not is_loopback(host):
            log.warning(
                "sidecar_not_loopback address=%s: the endpoint has no authentication; "
                "anyone who can reach it reads the state",
                self.address,
            )

        previous: dict[str, Any] = {}
        if options.state_file is not None:
            previous = read_previous_hooks(options.state_file, self.service)
        common: dict[str, Any] = {
            "service": self.service,
            "attempts": options.hook_attempts,
            "timeout": options.hook_timeout,
            "backoff": options.hook_backoff,
            "on_status": self._hook_status_changed,
            "execute": self._execute,
            "env": {"CP_STATE_FILE": str(options.state_file or "")},
            "secrets": self._secrets,
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
            self._writer = StateFileWriter(options.state_file, self.document, self._state_key)
            self._writer.start()
        # Registered before the agent starts: the state loaded from the cache
        # (or the first one from a server) is the hooks' first change.
        self._remove_callbacks = [
            self.agent.on_change(self._changed),
            self.agent.on_state(self._agent_state_changed),
        ]
        self.agent.start()
        if self._writer is not None:
            # A new revision that changes no value (a reason, an expiry extended)
            # reaches no callback, but the file shows it.
            if self._own_agent is not None:
                self._own_agent._published = self._writer.wake
            # The first write: the state the agent started with (from the cache, or none).
            self._writer.wake()
        self._http_thread = threading.Thread(
            target=self._http.serve, name="cp-agent-http", daemon=True
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
            self._http.stop()
            if self._http_thread is not None:
                self._http_thread.join()
            self._http.server_close()
        self.agent.close()
        for remove in self._remove_callbacks:
            remove()
        if self._own_agent is not None:
            self._own_agent._published = None
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

    def _agent_state_changed(self, state: str) -> None:
        # The agent's thread (or the one starting it): wake, nothing that blocks.
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
            "pin": pin_doc(snapshot.pin),
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
            "expires_at": format_time(override.expires_at),
            "content": json.loads(override.content_json),
        }

    def _about(self, snapshot: Snapshot) -> dict[str, Any]:
        return {"state": str(self.agent.state), "revision": snapshot.revision}

    @staticmethod
    def _shedding(snapshot: Snapshot) -> dict[str, Any] | None:
        doc = shedding_doc(snapshot.shedding)
        record = snapshot.shedding_record
        if doc is not None and record is not None:
            doc["reason"] = record.meta.reason
            doc["expires_at"] = format_time(record.meta.expires_at)
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
        if path == "/metrics":
            return Response(
                HTTPStatus.OK, {}, text=generate_latest(self.registry), content_type=METRICS_TYPE
            )
        return Response(
            HTTPStatus.NOT_FOUND,
            {
                "error": "not_found",
                "message": f"no endpoint {url.path}",
                "endpoints": list(ENDPOINTS),
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
            "type": flag_type(value),
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
                set_at=format_time(meta.set_at),
                expires_at=format_time(meta.expires_at),
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
                "pin": pin_doc(pin),
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
