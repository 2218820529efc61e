"""The control server: build, start and stop; health, reflection, metrics, logs.

``controlplane serve`` (:func:`main`) runs it; :class:`ControlServer` is one server
process, configured by a :class:`ServerConfig`.
"""

from controlplane.server._control_server import (
    ControlServer,
    ServerConfig,
    ServerConfigError,
    configure_logging,
    main,
    parse_duration,
    run_event_loop,
    serve,
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
