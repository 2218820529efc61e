"""The control server: build, start and stop; health, reflection, metrics, logs.

``controlplane serve`` (:func:`main`) runs it; :class:`ControlServer` is one server
process, configured by a :class:`ServerConfig`.
"""

from controlplane.server._cli import main, parse_duration, serve
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
    "parse_duration",
    "run_event_loop",
    "serve",
    "serve_until_stopped",
    "tune_gc",
]
