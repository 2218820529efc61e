"""cpctl against a server that authenticates: every command x every caller.

The matrix of test_auth.py one level up: its tokens, auth file, seeded state and expected
codes, through each cpctl command that calls a MitigationService RPC. cpctl runs
in-process (click's CliRunner) in a worker thread, since the server runs on the test's
loop and must keep serving; a whole matrix of subprocesses would cost a minute. Every
write is a dry run, so the state seeded once stays as it is whatever the order of the
cases, and a raw etcd read checks that nothing was written.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc
import pytest
import structlog
from click.testing import CliRunner, Result

from controlplane.cli import (
    ANONYMOUS_HINT,
    ENV_TOKEN,
    REFUSED_HINT,
    ROLE_HINT,
    ExitCode,
    cli,
)
from controlplane.server import ControlServer
from tests.helpers.raw_etcd import RawEtcd
from tests.integration.test_auth import (
    ALLOWED,
    CALLERS,
    READ,
    ROLES_NEEDED,
    TOKENS,
    WRONG_TOKEN,
    Seeded,
    auth_document,
    auth_server,  # noqa: F401  # a fixture, used by name
    auth_stub,  # noqa: F401  # a fixture, used by name
    expected_code,
    seed,
)
from tests.integration.test_cli_e2e import Watch

SECRETS = (*TOKENS.values(), WRONG_TOKEN)
# Who each role's token is in test_auth's auth file: the name the server's messages use.
IDENTITY = {entry["role"]: entry["name"] for entry in auth_document()["identities"]}
CLAIMED_ACTOR = "someone-else"

BUNDLE = """\
name: cli-auth-dry
reason: auth matrix
changes:
  - shed: {service: checkout, percent: 90}
"""


@pytest.fixture(autouse=True)
def server_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """The server's log events, kept off sys.stdout.

    Unconfigured structlog prints to whatever sys.stdout is at the time, and while cpctl
    runs CliRunner has swapped in the buffer it reads cpctl's output from.
    """
    with structlog.testing.capture_logs() as logs:
        yield logs


@dataclass(frozen=True)
class Command:
    """One cpctl command line and the RPC it calls."""

    rpc: str
    argv: tuple[str, ...]


def commands(seeded: Seeded, bundle_file: Path) -> list[Command]:
    """One valid command line per cpctl command; writes are dry runs."""
    dry = ("--reason", "cli auth test", "--dry-run")
    checked = ("--bundle", str(bundle_file), "--reason", "cli auth test", "--check")
    return [
        Command("SetFlag", ("flag", "set", "checkout", "kill-x", "false", *dry)),
        Command("GetFlag", ("flag", "get", "checkout", "kill-x")),
        Command("ListFlags", ("flag", "list")),
        Command("ClearFlag", ("flag", "clear", "checkout", "kill-x", *dry)),
        Command("SetShedding", ("shed", "set", "checkout", "50", *dry)),
        Command("GetShedding", ("shed", "get", "checkout")),
        Command("ListShedding", ("shed", "list")),
        Command("ClearShedding", ("shed", "clear", "checkout", *dry)),
        Command("PinVersion", ("pin", "set", "checkout", "v1", *dry)),
        Command("GetPin", ("pin", "get", "checkout")),
        Command("ListPins", ("pin", "list")),
        Command("UnpinVersion", ("pin", "clear", "checkout", *dry)),
        Command("MarkKnownGood", ("known-good", "mark", "checkout", "v3", *dry)),
        Command("UnmarkKnownGood", ("known-good", "unmark", "checkout", "v1", *dry)),
        Command("ListKnownGood", ("known-good", "list", "checkout")),
        Command("Rollback", ("rollback", "checkout", *dry)),
        # A bundle's reason comes from its file.
        Command("ApplyBundle", ("bundle", "apply", str(bundle_file), "--dry-run")),
        Command("RevertBundle", ("bundle", "revert", seeded.bundle_id, *dry)),
        Command("ListBundles", ("bundle", "list")),
        Command("GetBundle", ("bundle", "get", seeded.bundle_id)),
        Command("GetStatus", ("status", "checkout")),
        Command("ListServices", ("services",)),
        Command("ListHistory", ("history", "--service", "checkout")),
        Command("GetTimeline", ("timeline", "--incident", "INC-7")),
        # Runs until stopped: only refused callers here (test_watch_... runs an allowed one).
        Command("WatchChanges", ("watch", "checkout")),
        Command("ListNotifications", ("notifications", "status")),
        Command("ListNotifications", ("notifications", "failed")),
        Command("SetTrigger", ("trigger", "set", "dry", "--match", "alertname=X", *checked)),
        Command("ListTriggers", ("trigger", "list")),
        Command("GetTrigger", ("trigger", "get", "seeded")),
        Command("SetTriggerEnabled", ("trigger", "enable", "seeded", *dry)),
        Command("SetTriggerEnabled", ("trigger", "disable", "seeded", *dry)),
        Command("DeleteTrigger", ("trigger", "delete", "seeded", *dry)),
        # The seeded group fired already, and "never" fired nothing: neither writes.
        Command("FireTrigger", ("trigger", "fire", "seeded", "--group-key", "seeded")),
        Command("ResolveTrigger", ("trigger", "resolve", "seeded", "--group-key", "never")),
    ]


def command_path(argv: tuple[str, ...]) -> str:
    """The cpctl command an argv runs ("flag set", "rollback")."""
    group: click.Command = cli
    path: list[str] = []
    for word in argv:
        if not isinstance(group, click.Group):
            break
        group = group.commands[word]
        path.append(word)
    return " ".join(path)


def leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> set[str]:
    found: set[str] = set()
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found |= leaf_commands(command, (*path, name))
        else:
            found.add(" ".join((*path, name)))
    return found


def token_of(caller: str) -> str | None:
    return {"none": None, "wrong": WRONG_TOKEN}.get(caller, TOKENS.get(caller))


def clean_env(**values: str | None) -> dict[str, str | None]:
    """CliRunner's env: every CPCTL_* variable unset (ambient ones too), then ``values``."""
    names = {name for name in os.environ if name.startswith("CPCTL_")}
    names |= {p.envvar for p in cli.params if isinstance(p.envvar, str)}
    names.add(ENV_TOKEN)
    env: dict[str, str | None] = dict.fromkeys(names)
    env.update(values)
    return env


async def cpctl(address: str, *args: str, env: Mapping[str, str | None]) -> Result:
    """Run cpctl in-process in a worker thread: the server on this loop keeps serving."""
    argv = ["--server", address, "--actor", CLAIMED_ACTOR, *args]
    runner = CliRunner()
    return await asyncio.wait_for(asyncio.to_thread(runner.invoke, cli, argv, env=env), 30)


def problems_of(
    result: Result,
    *,
    rpc: str,
    caller: str,
    want: grpc.StatusCode,
    address: str,
    json_output: bool,
) -> list[str]:
    """What is wrong with one run of the matrix (empty: as expected)."""
    problems: list[str] = []
    out, err = result.stdout, result.stderr
    for secret in SECRETS:
        if secret in out or secret in err:
            problems.append(f"a token is printed: {out!r} {err!r}")
    if want == grpc.StatusCode.OK:
        if result.exit_code != ExitCode.OK:
            return [*problems, f"exit {result.exit_code}, want 0: {err.strip()!r}"]
        if not out.strip():
            problems.append("exit 0 with nothing on stdout")
        elif rpc in ("FireTrigger", "ResolveTrigger"):  # it must have written nothing
            wrote = (
                (json.loads(out).get("result") or {}).get("changed")
                if json_output
                else not out.startswith(("already fired: ", "not reverted: "))
            )
            if wrote:
                problems.append(f"a firing that wrote: {out!r}")
        elif ALLOWED[rpc] != READ:  # a write: it must have been a dry run
            dry_run = (
                json.loads(out)["result"]["dry_run"] is True
                if json_output
                else out.startswith("dry run: ")
            )
            if not dry_run:
                problems.append(f"not a dry run: {out!r}")
        return problems

    if result.exit_code != ExitCode.PERMISSION_DENIED:
        return [*problems, f"exit {result.exit_code}, want 7 ({want.name}): {err.strip()!r}"]
    if out:
        problems.append(f"a refusal printed on stdout: {out!r}")
    if want == grpc.StatusCode.PERMISSION_DENIED:
        roles = ROLES_NEEDED[frozenset(ALLOWED[rpc])]
        details = (
            f"{IDENTITY[caller]} (role {caller}) may not call {rpc}: it needs the {roles} role"
        )
        hint = ROLE_HINT
    elif caller == "none":
        details = (
            "no credentials: send the metadata 'authorization: Bearer <token>'"
            " (cpctl: CPCTL_TOKEN or --token-file)"
        )
        hint = ANONYMOUS_HINT
    else:
        details = "unknown or revoked token"
        hint = REFUSED_HINT
    message = f"{address} refused the call ({want.name}): {details}"
    if json_output:
        try:
            got = json.loads(err)
        except json.JSONDecodeError:
            return [*problems, f"stderr is not one JSON document: {err!r}"]
        expected = {"error": {"code": want.name, "message": message, "exit_code": 7}}
        if got != expected:
            problems.append(f"error document {got}, want {expected}")
    elif err.splitlines() != [f"error: {message}", f"hint: {hint}"]:
        problems.append(f"stderr {err!r}, want the error {message!r} and the hint {hint!r}")
    return problems


def test_the_table_covers_every_cpctl_command() -> None:
    table = commands(Seeded("b", 1), Path("bundle.yaml"))
    assert {command_path(c.argv) for c in table} == leaf_commands(cli)
    assert len({command_path(c.argv) for c in table}) == len(table)
    # Every RPC of the service but WaitApplied, which cpctl calls only in a --wait after a
    # real write (test_auth.py checks it as an RPC).
    assert {c.rpc for c in table} == set(ALLOWED) - {"WaitApplied"}


async def test_every_command_for_every_caller_exits_as_the_role_allows(
    auth_server: ControlServer,  # noqa: F811
    auth_stub: Any,  # noqa: F811
    raw_etcd: RawEtcd,
    prefix: str,
    tmp_path: Path,
) -> None:
    seeded = await seed(auth_stub)
    bundle_file = tmp_path / "dry.yaml"
    bundle_file.write_text(BUNDLE, encoding="utf-8")
    before = await raw_etcd.get_prefix(prefix)
    failures: list[str] = []
    checked = 0
    for command in commands(seeded, bundle_file):
        for caller in CALLERS:
            want = expected_code(command.rpc, caller)
            if command.rpc == "WatchChanges" and want == grpc.StatusCode.OK:
                continue  # it would run until stopped
            for json_output in (False, True):
                args = ("--json", *command.argv) if json_output else command.argv
                env = clean_env(**{ENV_TOKEN: token_of(caller)})
                result = await cpctl(auth_server.address, *args, env=env)
                checked += 1
                problems = problems_of(
                    result,
                    rpc=command.rpc,
                    caller=caller,
                    want=want,
                    address=auth_server.address,
                    json_output=json_output,
                )
                where = f"cpctl {' '.join(args)} as {caller}"
                failures.extend(f"{where}: {problem}" for problem in problems)
    assert not failures, "\n".join(failures)
    # 34 commands x 6 callers, and watch x 3 refused callers; each human and --json.
    assert checked == (34 * 6 + 3) * 2
    assert await raw_etcd.get_prefix(prefix) == before


async def test_a_token_file_works_like_the_variable_and_wins_over_it(
    auth_server: ControlServer,  # noqa: F811
    auth_stub: Any,  # noqa: F811
    raw_etcd: RawEtcd,
    prefix: str,
    tmp_path: Path,
) -> None:
    await seed(auth_stub)
    files = {}
    for caller in ("viewer", "admin", "wrong"):
        files[caller] = tmp_path / f"{caller}.token"
        files[caller].write_text(f"{token_of(caller)}\n", encoding="utf-8")
    mark = ("known-good", "mark", "checkout", "v3", "--reason", "r", "--dry-run")
    before = await raw_etcd.get_prefix(prefix)
    address = auth_server.address

    async def run(caller: str, *args: str, **env: str | None) -> Result:
        return await cpctl(address, "--token-file", str(files[caller]), *args, env=clean_env(**env))

    admin = await run("admin", "--json", *mark)
    assert admin.exit_code == 0, admin.stderr
    assert json.loads(admin.stdout)["result"]["dry_run"] is True

    viewer = await run("viewer", "--json", *mark)
    assert viewer.exit_code == ExitCode.PERMISSION_DENIED
    error = json.loads(viewer.stderr)["error"]
    assert error["code"] == "PERMISSION_DENIED"
    assert error["message"].endswith(
        "ro-dashboard (role viewer) may not call MarkKnownGood: it needs the admin role"
    )

    wrong = await run("wrong", "pin", "list")
    assert wrong.exit_code == ExitCode.PERMISSION_DENIED
    assert wrong.stderr.splitlines() == [
        f"error: {address} refused the call (UNAUTHENTICATED): unknown or revoked token",
        f"hint: {REFUSED_HINT}",
    ]

    # --token-file given on the command line wins over CPCTL_TOKEN in the environment.
    overridden = await run("viewer", *mark, **{ENV_TOKEN: TOKENS["admin"]})
    assert overridden.exit_code == ExitCode.PERMISSION_DENIED, overridden.stdout
    assert "ro-dashboard (role viewer)" in overridden.stderr
    # And CPCTL_TOKEN_FILE is the option's variable.
    from_env = await cpctl(address, *mark, env=clean_env(CPCTL_TOKEN_FILE=str(files["admin"])))
    assert from_env.exit_code == 0, from_env.stderr

    for result in (admin, viewer, wrong, overridden, from_env):
        for secret in SECRETS:
            assert secret not in result.stdout + result.stderr
    assert await raw_etcd.get_prefix(prefix) == before


async def test_watch_by_an_allowed_caller_goes_live_and_stops_on_ctrl_c(
    auth_server: ControlServer,  # noqa: F811
) -> None:
    # A subprocess, not in-process: the watch runs until SIGINT, which needs its own process.
    watch = await Watch.start(auth_server.address, "watch", "checkout", token=TOKENS["viewer"])
    proc = watch.proc
    try:
        note = await watch.line(proc.stderr)
    finally:
        code, rest, errors = await watch.stop()
    assert re.fullmatch(r"watching checkout from revision \d+ \(Ctrl-C to stop\)", note), note
    assert (code, rest, errors) == (ExitCode.INTERRUPTED, "", "")


async def test_the_audit_names_the_token_s_identity_not_actor(
    auth_server: ControlServer,  # noqa: F811
    raw_etcd: RawEtcd,
    prefix: str,
) -> None:
    env = clean_env(**{ENV_TOKEN: TOKENS["operator"]})
    args = ("flag", "set", "checkout", "kill-w", "true", "--reason", "audit test")
    written = await cpctl(auth_server.address, "--json", *args, env=env)
    assert written.exit_code == 0, written.stderr
    assert json.loads(written.stdout)["flag"]["meta"]["actor"] == IDENTITY["operator"]
    # What the server stored, read back raw: the flag and its audit record.
    stored = await raw_etcd.get_prefix(prefix)
    records = [json.loads(value) for value in stored.values()]
    audits = [r for r in records if r["kind"] == "audit" and r.get("name") == "kill-w"]
    assert len(audits) == 1, records
    assert audits[0]["actor"] == "oncall"
    assert audits[0]["actor_authenticated"] is True
    (flag,) = [r for r in records if r["kind"] == "flag" and r["name"] == "kill-w"]
    assert flag["meta"]["actor"] == "oncall"
    assert CLAIMED_ACTOR not in json.dumps(records)
