"""The control server: build, start and stop; health, reflection, metrics, logs.

``controlplane serve`` (:func:`main`) runs it; :class:`ControlServer` is one server
process, configured by a :class:`ServerConfig`. The names here are the package's
public ones; its modules:

- ``_config``: :class:`ServerConfig` and the checks made before anything starts;
- ``_tls``: the server's certificates, read, checked and re-read on reload;
- ``_control_server``: :class:`ControlServer`, its lifecycle, health and background loops;
- ``_mitigation_service``, ``_agent_service``: the two gRPC services, and ``_rpc``, what
  every RPC goes through (etcd budget, status, log event);
- ``_routes``, ``_http``, ``_http_context``, ``_openapi``: the HTTP listener (``--http``),
  MitigationService as JSON from one route table, and its OpenAPI document;
- ``hub``: the one etcd watch per process, fanned out to the agents' streams;
- ``_presence``: the agents connected to this process and what each applied;
- ``auth``: identities, roles, the auth file and the interceptor enforcing them;
- ``_ports``: the ports ``serve`` opens, checked free before anything starts, and a
  port in use said in one line (what holds it, the option that moves it);
- ``_runtime``: logging, the event loop, the collector, running a server until stopped;
- ``_workers``: ``--workers``, several server processes on one port under a supervisor;
- ``_cli``: the ``serve`` and ``token`` commands.
"""

from controlplane.server._cli import main, serve
from controlplane.server._config import ServerConfig, ServerConfigError
from controlplane.server._control_server import ControlServer
from controlplane.server._runtime import (
    configure_logging,
    run_event_loop,
    serve_until_stopped,
    tune_gc,
)

__all__ = [
    "ControlServer",
    "ServerConfig",
    "ServerConfigError",
    "configure_logging",
    "main",
    "run_event_loop",
    "serve",
    "serve_until_stopped",
    "tune_gc",
]
