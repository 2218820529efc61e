"""``cpctl``: change and inspect mitigations from a terminal or a runbook.

Layout: one module per noun holds its click commands and their human output (``flag``,
``shed``, ``pin`` with ``known-good`` and ``rollback``, ``bundle``, ``status`` with
``services``, and ``audit`` for ``watch``, ``history`` and ``timeline``). What every noun
uses is in the private modules: ``_errors`` (exit codes, ``CliError``, the gRPC status
table, the error report), ``_params`` (parsing what people type, the click types), ``_app``
(``App``: the servers, failover, the calls; printing a result), ``_write`` (the write
options and --wait) and ``_output`` (plain form of a response, JSON, tables). ``_root`` is
the ``cpctl`` group itself: the global options, the help and ``main``.

A command parses its arguments, builds one request, calls ``App.call`` and hands the
plain response to ``respond`` with its renderer; a write goes through ``write_and_wait``
instead, which also does --wait. Adding a command means adding those few lines to its
noun's module. gRPC and the generated stubs are imported inside the functions that call,
so ``import controlplane.cli`` and ``cpctl --help`` do not pay for them.
"""

from controlplane._durations import parse_duration, parse_time
from controlplane.cli._app import ENV_TOKEN, OUTCOME_UNKNOWN
from controlplane.cli._errors import (
    ANONYMOUS_HINT,
    REFUSED_HINT,
    ROLE_HINT,
    CliError,
    ExitCode,
    exit_code_for_status,
)
from controlplane.cli._params import FlagValue, parse_flag_value, parse_percent, parse_since
from controlplane.cli._root import cli, main
from controlplane.cli._write import WaitArgs, wait_exit_code

__all__ = [
    "ANONYMOUS_HINT",
    "ENV_TOKEN",
    "OUTCOME_UNKNOWN",
    "REFUSED_HINT",
    "ROLE_HINT",
    "CliError",
    "ExitCode",
    "FlagValue",
    "WaitArgs",
    "cli",
    "exit_code_for_status",
    "main",
    "parse_duration",
    "parse_flag_value",
    "parse_percent",
    "parse_since",
    "parse_time",
    "wait_exit_code",
]
