"""The cpctl group itself: global options, help, command order, completion, imports."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from controlplane.cli import cli
from tests.unit.cli.support import run


@pytest.mark.parametrize("value", ["5", "1.5s", "abc", "0s"])
def test_bad_timeout_names_the_global_option(value: str) -> None:
    result = run("--json", "--timeout", value, "flag", "list")
    assert result.exit_code == 2
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "USAGE"
    assert "--timeout" in error["message"]


def test_help_does_not_import_grpc() -> None:
    # Only checks the CLI modules themselves: importing them must not pull in gRPC stubs.
    import subprocess
    import sys

    code = (
        "import sys; import controlplane.cli; "
        "print(any(m == 'grpc' or m.startswith('controlplane.api') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_commands_are_listed_in_incident_order() -> None:
    assert isinstance(cli, click.Group)
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == [
        "flag", "shed", "pin", "known-good", "rollback", "bundle", "status", "services", "watch",
        "history", "timeline", "trigger", "notifications",
    ]  # fmt: skip


def test_shell_completion_comes_from_the_cli_itself() -> None:
    import os
    import subprocess
    import sys

    cpctl = Path(sys.executable).parent / "cpctl"
    env = dict(os.environ, COMP_WORDS="cpctl shed set checkout 30 --tier ", COMP_CWORD="6")
    env["_CPCTL_COMPLETE"] = "bash_complete"
    out = subprocess.run([str(cpctl)], env=env, capture_output=True, text=True, check=False)
    offered = {line.split(",", 1)[1] for line in out.stdout.splitlines() if "," in line}
    assert {"sheddable", "sheddable_plus", "critical", "critical_plus"} <= {
        o.lower() for o in offered
    }
    script = subprocess.run(
        [str(cpctl)], env=dict(os.environ, _CPCTL_COMPLETE="zsh_source"),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "compdef" in script.stdout
