"""README.md and docs/runbook.md are pasted by people new to the project: keep them runnable.

- Every ``cpctl`` command in their code blocks parses against the real CLI (click's own
  parser, down to the subcommand, with the options where they are written), and every
  ``cpctl``, ``controlplane``, ``cp-agent`` and ``make`` named in them, inline too, names
  real subcommands, options and targets.
- The runbook runs as written, block after block in one bash, against a real control server
  and etcd with instances of the services connected, including the revert loop going on
  past bundles that fail and ending non-zero; so do the README's commands.
- The files they name exist, and the bundles are valid.
- Their commands and examples carry no absolute date: one day it would be in the past.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from prometheus_client import CollectorRegistry

from agents._override import parse_override
from agents.sidecar._cli import _command as cp_agent_cli
from controlplane.api.v1 import mitigation_pb2, mitigation_pb2_grpc
from controlplane.bundles import load_bundle_file
from controlplane.cli import cli as cpctl_cli
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from controlplane.server import main as controlplane_cli
from controlplane.store import DEFAULT_PREFIX
from tests.helpers.raw_agent import RawAgent
from tests.integration.conftest import server_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUNBOOK = ROOT / "docs" / "runbook.md"
DOCS = (README, RUNBOOK)
VENV_BIN = ROOT / ".venv" / "bin"
BUNDLES = ROOT / "runbooks" / "bundles"
PATH_LINE = 'export PATH="$PWD/.venv/bin:$PATH"'
INC = "INC-2291"  # the runbook's incident

# ---- the documents: code blocks, inline code, shell words ----


@dataclass(frozen=True, slots=True)
class Block:
    """A fenced code block of a document."""

    path: Path
    line: int  # of the opening fence
    lang: str
    text: str
    section: str  # the heading it is under

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in ("", "sh", "bash")


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    section, i = "", 0
    while i < len(lines):
        if lines[i].startswith("#"):
            section = lines[i].lstrip("#").strip()
        fence = re.match(r"```(\S*)", lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: a code block is never closed"
        text = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, i + 1, fence.group(1), text, section))
        i = end + 1
    return blocks


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in code_blocks(path) if b.is_shell]


def inline_code(path: Path) -> list[str]:
    """The inline code spans of a document's prose (code blocks left out)."""
    prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def logical_lines(text: str) -> list[str]:
    """A shell block's command lines: continuations joined, a quote left open on one line
    carried on to the next, here-document bodies and a transcript's output left out."""
    raw = text.splitlines()
    if any(line.startswith("$ ") for line in raw):  # a transcript: only the prompts are typed
        raw = [line[2:] for line in raw if line.startswith("$ ")]
    lines: list[str] = []
    pending, heredoc = "", None
    for line in raw:
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote is still open: the command goes on
            continue
        opened = re.search(r"<<-?\s*['\"]?(\w+)", pending)
        heredoc = opened.group(1) if opened else None
        lines.append(pending)
        pending = ""
    assert not pending, f"unfinished command: {pending!r}"
    return lines


_OPERATORS = {"|", "||", "&&", ";", "&", ";;", "(", ")", "|&"}
_KEYWORDS = {"!", "if", "then", "elif", "else", "while", "until", "do", "time", "{", "}"}


def words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    return list(lexer)


def substitutions(word: str) -> list[str]:
    """The commands of the ``$(...)`` in a word."""
    found, start = [], word.find("$(")
    while start != -1:
        depth, i = 0, start + 1
        for i in range(start + 1, len(word)):
            depth += {"(": 1, ")": -1}.get(word[i], 0)
            if depth == 0:
                break
        found.append(word[start + 2 : i])
        start = word.find("$(", i)
    return found


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a command line, as words (redirections and leading keywords
    and assignments left out), those of its command substitutions included."""
    tokens = words(line)
    current: list[str] = []
    skip = False
    for token in tokens:
        if skip:
            skip = False
        elif token in _OPERATORS:
            yield from _command(current)
            current = []
        elif token[0] in "<>" or token in (">&", "&>"):
            skip = True  # the redirection's target goes with it
        else:
            current.append(token)
    yield from _command(current)
    for token in tokens:
        for inner in substitutions(token):
            yield from simple_commands(inner)


def _command(tokens: list[str]) -> Iterator[list[str]]:
    while tokens and tokens[0] in _KEYWORDS:
        tokens = tokens[1:]
    while tokens and re.match(r"\w+=", tokens[0]):
        if tokens[0].startswith("_CPCTL_COMPLETE="):
            return  # not a command: cpctl prints its shell completion (run by a test below)
        tokens = tokens[1:]
    if tokens:
        yield tokens


@dataclass(frozen=True, slots=True)
class Command:
    where: str
    words: tuple[str, ...]

    @property
    def program(self) -> str:
        return self.words[0]


def block_commands(paths: Sequence[Path] = DOCS) -> list[Command]:
    return [
        Command(block.where, tuple(cmd))
        for path in paths
        for block in shell_blocks(path)
        for line in logical_lines(block.text)
        for cmd in simple_commands(line)
    ]


# ---- the real command-line parsers ----

PROGRAMS: dict[str, click.Command] = {
    "cpctl": cpctl_cli,
    "controlplane": controlplane_cli,
    "cp-agent": cp_agent_cli,
}


def _now_iso(delta: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


# What the documents' variables hold when their commands are parsed (not run). A variable
# without a sample here fails the test, naming it.
SAMPLES: dict[str, str] = {
    "INC": INC,
    "BUNDLES": str(BUNDLES),
    "BUNDLE_FILE": str(BUNDLES / "degrade-checkout.yaml"),
    "BUNDLE_ID": "degrade-checkout-id",
    "id": "degrade-checkout-id",
    "SINCE": _now_iso(-timedelta(hours=3)),
    "UNTIL": _now_iso(),
    "PWD": str(ROOT),
    "USER": "oncall",
}


def expand(word: str, where: str) -> str:
    """A word as the shell would pass it: ``$(date ...)`` run, other substitutions a
    placeholder (their own commands are checked on their own), variables their sample."""
    for inner in substitutions(word):
        if inner.split()[0] == "date":
            value = subprocess.run(
                ["bash", "-c", inner], capture_output=True, text=True, check=True
            ).stdout.strip()
        else:
            value = "placeholder"
        word = word.replace(f"$({inner})", value, 1)

    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in SAMPLES:
            raise AssertionError(f"{where}: ${name} has no sample value in SAMPLES")
        return SAMPLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, word)


def parse_cpctl(argv: Sequence[str]) -> click.Context:
    """``cpctl ARGV`` through click's parser, the groups' and then the subcommand's, as
    ``cpctl`` would parse it, without invoking anything."""
    ctx = cpctl_cli.make_context("cpctl", list(argv))
    command: click.Command = cpctl_cli
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            raise click.UsageError(f"{ctx.command_path}: no command given", ctx)
        name, sub, remaining = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None
        ctx = sub.make_context(name, remaining, parent=ctx)
        command = sub
    return ctx


def name_problems(program: str, argv: Sequence[str]) -> list[str]:
    """What in ``PROGRAM ARGV`` names no subcommand or option of the real CLI (values and
    placeholders such as ``ID`` or ``...`` are not judged)."""
    command = PROGRAMS[program]
    chain = [command]
    takes_value = False
    problems = []
    for raw in argv:
        word = raw.strip("[]")
        if takes_value:
            takes_value = False
            continue
        if word.startswith("-") and len(word) > 1 and not word[1].isdigit():
            name = word.split("=", 1)[0]
            option = next((o for c in chain if (o := _option(c, name)) is not None), None)
            if option is None and name not in ("-h", "--help"):
                where = " ".join([program, *(c.name or "" for c in chain[1:])])
                problems.append(f"no option {name} for {where}")
            elif option is not None:
                takes_value = "=" not in word and not (option.is_flag or option.count)
        elif isinstance(command, click.Group):
            sub = command.commands.get(word)
            if sub is None:
                problems.append(f"no command {word!r} in {program}")
                break
            command = sub
            chain.append(sub)
    return problems


def _option(command: click.Command, name: str) -> click.Option | None:
    for param in command.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, flags=re.M))


# ---- (a) every command parses ----


def test_every_cpctl_command_in_the_code_blocks_parses_against_the_real_cli() -> None:
    commands = [c for c in block_commands() if c.program == "cpctl"]
    problems = []
    for command in commands:
        argv = [expand(word, command.where) for word in command.words[1:]]
        try:
            parse_cpctl(argv)
        except click.ClickException as exc:
            problems.append(f"{command.where}: cpctl {shlex.join(argv)}: {exc.format_message()}")
    assert not problems, "\n".join(problems)
    # The extraction finds them all: a sample of what the documents hold.
    seen = {" ".join(c.words[:3]) for c in commands}
    for expected in (
        "cpctl flag set",
        "cpctl bundle apply",
        "cpctl bundle revert",
        "cpctl timeline --incident",
        "cpctl --json history",
        "cpctl --json bundle",
        "cpctl watch checkout",
    ):
        assert expected in seen, f"no `{expected}` found in the code blocks: {sorted(seen)}"
    assert len(commands) >= 40, len(commands)


def test_every_command_named_inline_or_for_production_names_real_commands_and_options() -> None:
    problems = []
    checked = 0
    for path in DOCS:
        for span in inline_code(path):
            try:
                span_words = shlex.split(span)
            except ValueError:
                span_words = span.split()
            if span_words and span_words[0] in PROGRAMS and len(span_words) > 1:
                checked += 1
                found = name_problems(*_split(span_words))
                problems += [f"{path.name}: `{span}`: {p}" for p in found]
    for command in block_commands():
        if command.program in PROGRAMS:
            checked += 1
            problems += [f"{command.where}: {p}" for p in name_problems(*_split(command.words))]
        elif command.program == "make":
            for word in command.words[1:]:
                if "=" in word:  # make run ARGS="--log-format console"
                    serve_args = ["serve", *shlex.split(word.split("=", 1)[1])]
                    found = name_problems("controlplane", serve_args)
                    problems += [f"{command.where}: {p}" for p in found]
                elif word not in make_targets():
                    problems.append(f"{command.where}: no make target {word!r}")
    assert not problems, "\n".join(problems)
    assert checked >= 50, checked


def _split(argv: Sequence[str]) -> tuple[str, list[str]]:
    return argv[0], list(argv[1:])


def test_the_name_checks_catch_what_they_are_for() -> None:
    with pytest.raises(click.NoSuchOption):
        parse_cpctl(["bundle", "apply", "f.yaml", "--incidnet", "INC-1"])
    with pytest.raises(click.UsageError):
        parse_cpctl(["bundle", "aply", "f.yaml"])
    with pytest.raises(click.BadParameter):
        parse_cpctl(["history", "--since", "yesterday"])
    assert name_problems("cpctl", ["bundle", "revert", "ID", "[--force]"]) == []
    assert name_problems("cpctl", ["--server", "a:1", "pin", "clear"]) == []
    assert name_problems("cpctl", ["pin", "clear", "--froce"]) != []
    assert name_problems("controlplane", ["serve", "--tls-cert", "x", "--tls-keys", "y"]) != []


def test_commands_are_bare_and_the_path_is_said_once_before_them() -> None:
    readme = README.read_text()
    assert readme.count(PATH_LINE) == 1, "README: say once how to put .venv/bin on PATH"
    by_path = [f"{c.where}: {c.program}" for c in block_commands() if "/" in c.program]
    assert not by_path, f"commands run by their path, not from PATH: {by_path}"
    for path in DOCS:
        blocks = shell_blocks(path)
        first_path = next(i for i, b in enumerate(blocks) if PATH_LINE in b.text)
        first_cpctl = next(
            i for i, b in enumerate(blocks) if re.search(r"^\s*cpctl ", b.text, flags=re.M)
        )
        assert first_path <= first_cpctl, f"{path.name}: cpctl is used before PATH is set"


def test_the_timeline_is_shown_where_a_post_mortem_starts() -> None:
    readme = [b for b in shell_blocks(README) if "post-mortem" in b.text.lower()]
    assert readme and readme[0].text.startswith("cpctl timeline --incident"), readme
    step8 = runbook_steps()[8]
    assert step8[0].text.startswith('cpctl timeline --incident "$INC"'), step8[0].text


# ---- (c) the files they name exist; (d) no absolute dates ----

_ETCD_KEYS = {"flags", "shedding", "pins", "known-good", "bundles", "expiries", "audit"}
_PATHLIKE = re.compile(r"[A-Za-z._][\w.-]*(?:/[\w.*-]+)*/?")


def _generated() -> set[str]:
    """What the tools make in a clone (.venv, make run's data directory): git ignores it."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return {line.strip("/") for line in lines if line and "/" not in line.strip("/")}


def _not_written(span_words: list[str]) -> list[str]:
    """The words of a command but the files it writes (``> file``)."""
    return [w for i, w in enumerate(span_words) if i == 0 or span_words[i - 1] not in (">", ">>")]


def named_paths(path: Path) -> set[str]:
    """Files and directories of the repository a document names: in inline code, in shell
    words of its code blocks, as link targets; not those the commands write or the tools
    make. ``$PWD/`` (the root of the clone, where the documents are used) and the variables
    set from it are resolved."""
    candidates: list[str] = re.findall(r"\]\(([^)#\s]+)\)", path.read_text())
    for span in inline_code(path):
        candidates += _not_written(span.split())
    rooted: dict[str, str] = {}
    for block in shell_blocks(path):
        for line in logical_lines(block.text):
            for word in _not_written(words(line)):
                assigned = re.fullmatch(r"(\w+)=\$PWD/(\S+)", word)
                if assigned:
                    rooted[f"${assigned.group(1)}"] = assigned.group(2)
                candidates.append(word.split("=", 1)[1] if re.match(r"\w+=", word) else word)
    found = set()
    for candidate in candidates:
        name = candidate.replace("$PWD/", "")
        for variable, value in rooted.items():
            name = name.replace(variable, value)
        if not _PATHLIKE.fullmatch(name) or name.split("/")[0] in _ETCD_KEYS | _generated():
            continue
        if "/" in name or name.endswith(".md"):
            found.add(name)
    return found


def test_every_file_the_documents_name_exists() -> None:
    missing = []
    for path in DOCS:
        names = named_paths(path)
        for name in names:  # relative to the root of the clone, where they are used
            if not list(ROOT.glob(name.rstrip("/"))):
                missing.append(f"{path.name}: {name}")
    assert not missing, "\n".join(sorted(missing))
    readme, runbook = named_paths(README), named_paths(RUNBOOK)
    assert "runbooks/bundles/degrade-checkout.yaml" in readme, sorted(readme)
    assert "runbooks/bundles/degrade-checkout-fail-fast.yaml" in runbook, sorted(runbook)
    assert "controlplane/bundles.py" in readme


def test_the_bundles_are_valid_and_the_runbook_shows_its_bundle_as_it_is() -> None:
    files = sorted(BUNDLES.glob("*.yaml"))
    assert len(files) >= 2, files
    for file in files:
        spec = load_bundle_file(file)
        assert f"{spec.name}.yaml" == file.name, (spec.name, file.name)
        assert spec.ttl is not None, f"{file.name}: a degradation must be time-boxed"
        assert not spec.incident, f"{file.name}: the incident comes with --incident"
    shown = next(b for b in code_blocks(RUNBOOK) if b.lang == "yaml")
    assert shown.text == (BUNDLES / "degrade-checkout.yaml").read_text()


_DATE = re.compile(r"\b(?:19|20)\d\d-[01]\d-[0-3]\d|\b20\d{6}-\d{6}\b")


def test_no_absolute_date_in_commands_and_examples() -> None:
    found = []
    for path in DOCS:
        for block in code_blocks(path):
            for n, line in enumerate(block.text.splitlines(), start=block.line + 1):
                found += [f"{path.name}:{n}: {m.group()}" for m in _DATE.finditer(line)]
        for span in inline_code(path):
            found += [f"{path.name}: `{span}`" for _ in _DATE.finditer(span)]
    assert not found, (
        "absolute dates are in the past one day: use --ttl, --since 2h or "
        "$(date -u -d '+2 hours' +%Y-%m-%dT%H:%M:%SZ)\n" + "\n".join(found)
    )


# ---- (b) running them: one bash, as a terminal the blocks are pasted into ----


@dataclass(frozen=True, slots=True)
class Ran:
    status: int
    out: str
    err: str
    failed: list[str]  # every command that failed on the way (the ERR trap)

    def ok(self, label: str) -> Ran:
        assert self.status == 0 and not self.failed, (
            f"{label}: exit {self.status}; failed: {self.failed}\n"
            f"stdout:\n{self.out}\nstderr:\n{self.err}"
        )
        return self


class Shell:
    """One bash into which blocks are pasted in turn: what a block sets (variables, the
    directory) is there for the next. Each block is sourced with its stdin closed; with
    pipefail and an ERR trap, every command that fails is recorded, not only the last."""

    def __init__(self, workdir: Path, cwd: Path, env: Mapping[str, str]) -> None:
        self.dir = workdir
        self.cwd = cwd
        self.env = dict(env)
        self.count = 0
        self.failures = workdir / "failed.txt"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Shell:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            "bash", "--noprofile", "--norc",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=self.cwd, env=self.env, start_new_session=True,
        )  # fmt: skip
        trap = f'printf "%s\\t%s\\n" "$?" "$BASH_COMMAND" >> {shlex.quote(str(self.failures))}'
        await self._send(f"set -o pipefail\ntrap {shlex.quote(trap)} ERR\n")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # end of input: bash exits once the block it runs is done
        try:
            await asyncio.wait_for(self.proc.wait(), 0.1 if exc[0] else 30)
        except TimeoutError:  # a test failed in the middle of a block: stop it all
            _kill_group(self.proc)
            await self.proc.wait()

    async def _send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        await self.proc.stdin.drain()

    async def run(self, text: str, label: str = "block") -> Ran:
        assert self.proc is not None and self.proc.stdout is not None
        self.count += 1
        stem = self.dir / f"{self.count:02d}"
        script, out, err = (stem.with_suffix(s) for s in (".sh", ".out", ".err"))
        script.write_text(text)
        self.failures.write_text("")
        marker = f"--- done {self.count} ---"
        await self._send(
            f". {shlex.quote(str(script))} < /dev/null > {shlex.quote(str(out))} "
            f"2> {shlex.quote(str(err))}; printf '\\n{marker} %s\\n' \"$?\"\n"
        )
        async with asyncio.timeout(90):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"{label}: bash ended"
                if line.startswith(marker):
                    status = int(line.split()[-1])
                    break
        failed = [
            f for f in self.failures.read_text().splitlines() if str(script) not in f
        ]  # the block itself returning non-zero is its status, not a failure within
        return Ran(status, out.read_text(), err.read_text(), failed)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def shell_env(home: Path, server: str, **extra: str) -> dict[str, str]:
    """This environment without cpctl's and the server's settings, .venv/bin off PATH (the
    documents put it there), HOME of the test's own, the test's server as CPCTL_SERVER."""
    if not (VENV_BIN / "cpctl").exists():
        pytest.fail(f"{VENV_BIN / 'cpctl'} is missing: install the project (make install)")
    venv = VENV_BIN.resolve()
    path = [
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv
    ]
    if shutil.which("jq", path=os.pathsep.join(path)) is None:
        pytest.fail("jq is not on PATH: the runbook uses it (CI installs it in .ci/run)")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CPCTL_", "CONTROLPLANE_", "ETCDCTL_", "VIRTUAL_ENV"))
    }
    home.mkdir(parents=True, exist_ok=True)
    env.update(PATH=os.pathsep.join(path), HOME=str(home), USER="oncall", CPCTL_SERVER=server)
    env.update(extra)
    return env


async def cpctl(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Someone else's cpctl, beside the runbook's (a colleague, a check)."""
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "cpctl"), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "CPCTL_ACTOR": "colleague"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def instances(address: str, service: str, count: int) -> AsyncIterator[list[RawAgent]]:
    """``count`` connected instances of ``service`` that apply every change."""
    async with contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(RawAgent(address, service, f"{service}-{n}"))
            for n in range(1, count + 1)
        ]
        for agent in agents:
            await agent.next()  # the snapshot: the server has it registered
        yield agents


async def gone(server: ControlServer, service: str) -> None:
    """Until the server has no instance of ``service`` left (it learns of each departure)."""
    assert server.presence is not None
    async with asyncio.timeout(10):
        while server.presence.local(service):
            await server.presence.changed(service)


async def bundles(stub: mitigation_pb2_grpc.MitigationServiceStub, incident: str) -> dict[str, str]:
    """The incident's bundles: id to state."""
    listed = await stub.ListBundles(mitigation_pb2.ListBundlesRequest())
    return {
        b.id: mitigation_pb2.BundleState.Name(b.state)
        for b in listed.bundles
        if b.meta.incident == incident
    }


def runbook_steps() -> dict[int, list[Block]]:
    steps: dict[int, list[Block]] = {}
    for block in shell_blocks(RUNBOOK):
        number = re.match(r"(\d+)\. ", block.section)
        assert number, f"{block.where}: a shell block outside a numbered step"
        steps.setdefault(int(number.group(1)), []).append(block)
    assert sorted(steps) == list(range(9)), sorted(steps)
    return steps


def setup_blocks(steps: Mapping[int, list[Block]]) -> list[Block]:
    """Step 0 without the production settings (left out against `make run`, it says)."""
    local = [b for b in steps[0] if "prod.internal" not in b.text]
    assert len(steps[0]) - len(local) == 1, [b.text for b in steps[0]]
    return local


async def set_up(shell: Shell, steps: Mapping[int, list[Block]], home: Path) -> None:
    for block in setup_blocks(steps):
        (await shell.run(block.text, block.where)).ok(block.where)
    where = (await shell.run("command -v cpctl; pwd")).ok("after step 0").out.split()
    assert where == [str(VENV_BIN / "cpctl"), str(home / "incidents" / INC)], where


async def watch_while_someone_changes(
    block: Block,
    setup: str,
    env: Mapping[str, str],
    value: str,
) -> tuple[str, str]:
    """Run a watch block as pasted, change a checkout flag once it is live (for another
    incident), take the first line it prints, then Ctrl-C. Its output and stderr."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "--noprofile", "--norc", "-c", f"{setup}\n{block.text}",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=ROOT, env=dict(env), start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            note = b""
            while b"watching" not in note:
                note = await proc.stderr.readline()
                assert note, f"{block.where}: the watch ended before it was live"
            changed = await cpctl(
                env, "flag", "set", "checkout", "banner", value, "--reason", "tell customers",
                "--incident", "INC-2300",
            )  # fmt: skip
            assert changed.returncode == 0, changed.stderr
            line = (await proc.stdout.readline()).decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            async with asyncio.timeout(30):
                err = (await proc.stderr.read()).decode()
                await proc.wait()
        except TimeoutError:
            _kill_group(proc)
            raise
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    return line, err


async def test_the_runbook_runs_as_written_and_its_revert_loop_goes_past_failures(
    server: ControlServer, stub: mitigation_pb2_grpc.MitigationServiceStub, tmp_path: Path
) -> None:
    steps = runbook_steps()
    home = tmp_path / "home"
    env = shell_env(home, server.address)
    incident_dir = home / "incidents" / INC
    async with (
        instances(server.address, "checkout", 2),
        Shell(tmp_path / "shell", ROOT, env) as shell,
    ):
        async with instances(server.address, "payments", 1):
            await set_up(shell, steps, home)

            status, summary, already = steps[1]
            out = (await shell.run(status.text, status.where)).ok(status.where).out
            assert "checkout · revision" in out and "2 of 2 instance(s) connected" in out, out
            doc = json.loads((await shell.run(summary.text, summary.where)).ok(summary.where).out)
            assert doc["connected"] == 2 and doc["shedding"] == "off", doc
            assert (await shell.run(already.text, already.where)).ok(already.where).out == ""

            (dry_run,) = steps[2]
            out = (await shell.run(dry_run.text, dry_run.where)).ok(dry_run.where).out
            assert "would apply bundle degrade-checkout" in out, out

            apply, outcomes, by_exit_code = steps[3]
            out = (await shell.run(apply.text, apply.where)).ok(apply.where).out
            assert re.search(r"bundle \S+-degrade-checkout-\S+ at revision \d+ \(exit 0\)", out)
            out = (await shell.run(outcomes.text, outcomes.where)).ok(outcomes.where).out
            assert "checkout: applied, 2/2 instances" in out, out
            assert "payments: applied, 1/1 instances" in out, out
            # The branch of each exit code reads apply.json without a jq error.
            for rc in ("0", "8", "9", "10"):
                ran = await shell.run(f"rc={rc}\n{by_exit_code.text}", f"{by_exit_code.where}")
                assert ran.ok(f"{by_exit_code.where} with rc={rc}").out == ""

            status, checks = steps[4]
            (await shell.run(status.text, status.where)).ok(status.where)
            out = (await shell.run(checks.text, checks.where)).ok(checks.where).out
            assert "still at" not in out, out
            assert "express-pay = false until" in out, out
            assert 'payment-mode = "deferred-capture" until' in out, out
            assert out.rstrip().endswith("2000"), out

            setup = "\n".join(b.text for b in setup_blocks(steps))
            human, as_json = steps[5]
            line, err = await watch_while_someone_changes(human, setup, env, "slow-payments")
            assert "flag.set" in line and "checkout/banner" in line and "INC-2300" in line, line
            assert "Traceback" not in err, err
            line, err = await watch_while_someone_changes(as_json, setup, env, "retry-later")
            assert line.startswith(tuple("0123456789")), line
            assert "colleague flag.set checkout/banner: tell customers" in line, line
            assert "Traceback" not in err, err

            (get_and_extend,) = steps[6]
            ran = await shell.run(get_and_extend.text, get_and_extend.where)
            out = ran.ok(get_and_extend.where).out
            assert "APPLIED until" in out and "payments: applied by 1/1 instances" in out, out
            applied = await bundles(stub, INC)
            assert sorted(applied.values()) == ["APPLIED", "PARTIALLY_OVERRIDDEN"], applied

        # Recovery; meanwhile the payments instance went away: each revert's --wait finds
        # no instance of payments (exit 9), after the revert is written.
        await gone(server, "payments")
        revert_loop, exit_4_inspect, exit_4_force, back_to_normal = steps[7]
        assert "--force" in exit_4_force.text and "bundle get" in exit_4_inspect.text
        ran = await shell.run(revert_loop.text, revert_loop.where)
        assert ran.status != 0, "the loop must end non-zero when a revert failed"
        assert [f.split("\t", 1)[1] for f in ran.failed] == ["false"], ran.failed
        to_revert = (incident_dir / "to-revert.txt").read_text().split()
        newest = [id_ for id_, state in applied.items() if state == "APPLIED"]
        assert to_revert == newest + [id_ for id_ in applied if id_ not in newest], to_revert
        reported = [line for line in ran.err.splitlines() if re.fullmatch(r"\S+ exit \d+", line)]
        assert reported == [f"{id_} exit 9" for id_ in to_revert], ran.err
        assert (incident_dir / "not-reverted.txt").read_text().splitlines() == reported
        assert await bundles(stub, INC) == dict.fromkeys(applied, "REVERTED")
        ran = await shell.run(back_to_normal.text, back_to_normal.where)
        normal = json.loads(ran.ok(back_to_normal.where).out)  # the colleague's banner stays
        assert normal == {
            "flags": [{"name": "banner", "value": "retry-later", "scope": "checkout"}],
            "shedding": None,
        }, normal

        markdown, record, unlabelled = steps[8]
        (await shell.run(markdown.text, markdown.where)).ok(markdown.where)
        timeline = (incident_dir / f"{INC}-timeline.md").read_text()
        assert timeline.startswith(f"# Timeline of {INC}"), timeline
        assert "| shedding.revert | checkout |" in timeline, timeline
        entries = json.loads((incident_dir / f"{INC}-timeline.json").read_text())["entries"]
        assert {e["change"]["incident"] for e in entries} == {INC}
        record_doc = json.loads((await shell.run(record.text, record.where)).ok(record.where).out)
        assert record_doc["state"] == "REVERTED" and record_doc["reverted"]["by"] == "oncall"
        out = (await shell.run(unlabelled.text, unlabelled.where)).ok(unlabelled.where).out
        assert out.count("tell customers") == 2 and INC not in out, out


async def test_the_runbook_forces_the_reverts_refused_after_a_colleague_changed_a_key(
    server: ControlServer, stub: mitigation_pb2_grpc.MitigationServiceStub, tmp_path: Path
) -> None:
    steps = runbook_steps()
    home = tmp_path / "home"
    env = shell_env(home, server.address)
    async with (
        instances(server.address, "checkout", 1),
        instances(server.address, "payments", 1),
        Shell(tmp_path / "shell", ROOT, env) as shell,
    ):
        await set_up(shell, steps, home)
        for block in (steps[3][0], steps[6][0]):  # apply, then extend
            (await shell.run(block.text, block.where)).ok(block.where)
        colleague = await cpctl(
            env, "shed", "set", "checkout", "20", "--reason", "20% is enough for the night"
        )
        assert colleague.returncode == 0, colleague.stderr

        revert_loop, exit_4_inspect, exit_4_force, back_to_normal = steps[7]
        ran = await shell.run(revert_loop.text, revert_loop.where)
        assert ran.status != 0
        to_revert = (home / "incidents" / INC / "to-revert.txt").read_text().split()
        assert len(to_revert) == 2
        reported = [line for line in ran.err.splitlines() if re.fullmatch(r"\S+ exit \d+", line)]
        assert reported == [f"{id_} exit 4" for id_ in to_revert], ran.err
        assert set((await bundles(stub, INC)).values()) == {"PARTIALLY_OVERRIDDEN"}

        out = (await shell.run(exit_4_inspect.text, exit_4_inspect.where)).ok("exit 4").out
        assert f"bundle {to_revert[0]} (degrade-checkout): partially overridden" in out, out
        assert "shedding/checkout" in out and "20% is enough for the night" in out, out
        (await shell.run(exit_4_force.text, exit_4_force.where)).ok(exit_4_force.where)
        assert set((await bundles(stub, INC)).values()) == {"REVERTED"}
        ran = await shell.run(back_to_normal.text, back_to_normal.where)
        assert json.loads(ran.ok(back_to_normal.where).out) == {"flags": [], "shedding": None}


# ---- the README, run ----

MAKE_RUN_HTTP = "127.0.0.1:8016"
"""Where `make run` serves HTTP (the Makefile's run target)."""

# Blocks not run against `make run`, by their first command: each is checked by the name
# checks above instead.
NOT_RUN = {
    "make": "make itself (these tests run under `make test`)",
    "controlplane serve": "a production server: TLS files, an etcd cluster",
    "cp-agent": "a production sidecar",
}


@pytest.fixture
async def default_prefix_server(fresh_etcd: EmbeddedEtcd) -> AsyncIterator[ControlServer]:
    """A server under the default prefix, as `make run`'s (HTTP too), on an etcd of the
    test's own."""
    srv = ControlServer(
        server_config(fresh_etcd.endpoint, DEFAULT_PREFIX, http="127.0.0.1:0"),
        registry=CollectorRegistry(),
    )
    await srv.start()
    yield srv
    await srv.stop(grace=0)


async def test_the_readme_commands_run_as_printed(
    default_prefix_server: ControlServer, fresh_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    server = default_prefix_server
    home = tmp_path / "home"
    env = shell_env(home, server.address, ETCDCTL_ENDPOINTS=fresh_etcd.endpoint)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    skipped: set[str] = set()
    checked: set[str] = set()  # what was checked beyond "it ran without a failure"
    ran_blocks = 0
    async with (
        instances(server.address, "checkout", 1),
        instances(server.address, "payments", 1),
        Shell(tmp_path / "shell", ROOT, env) as shell,
    ):
        for block in shell_blocks(README):
            first = " ".join(
                next(c for line in logical_lines(block.text) for c in simple_commands(line))
            )
            reason = next((k for k in NOT_RUN if first.startswith(k)), None)
            if reason is not None:
                skipped.add(reason)
                continue
            ran_blocks += 1
            text = block.text
            if "cpctl watch checkout" in text:  # runs until Ctrl-C: the runbook test runs one
                lines = text.splitlines(keepends=True)
                text = "".join(line for line in lines if not line.startswith("cpctl watch "))
                assert len(text.splitlines()) == len(lines) - 1
            if "_COMPLETE=zsh_source" in text:  # one line per shell: bash's is run here
                for shell_name, mark in (("zsh", "#compdef cpctl"), ("fish", "complete ")):
                    script = await shell.run(f"_CPCTL_COMPLETE={shell_name}_source cpctl")
                    assert mark in script.ok(shell_name).out
                text = "".join(line for line in text.splitlines(True) if "# bash" in line)
            if block.text.startswith("$ "):  # a transcript: the token it makes, then its hash
                made = (await shell.run("controlplane token")).ok(block.where).out
                token, digest = re.findall(r"^\w+:\s+(\S+)$", made, flags=re.M)
                text = f"TOKEN={token}\n" + "\n".join(logical_lines(block.text)[1:]) + "\n"
                assert (await shell.run(text, block.where)).ok(block.where).out.strip() == digest
                checked.add("token")
                continue
            if "OVERRIDE=" in text:
                assert text.count("/var/cache/checkout") == 1
                text = text.replace("/var/cache/checkout", str(cache))
            if MAKE_RUN_HTTP in text:  # make run's HTTP address: the test server's
                assert f"--http {MAKE_RUN_HTTP}" in (ROOT / "Makefile").read_text()
                assert server.http is not None
                text = text.replace(f"http://{MAKE_RUN_HTTP}", server.http.url)
            ran = (await shell.run(text, block.where)).ok(block.where)

            if PATH_LINE in text:
                found = (await shell.run("command -v cpctl")).ok("PATH").out.strip()
                assert found == str(VENV_BIN / "cpctl")
                checked.add("path")
            if "bundle revert" in text:
                assert "applied by 1/1 instances" in ran.out, ran.out
                assert re.search(r"bundle \S+ \(degrade-checkout\) reverted", ran.out), ran.out
                checked.add("revert")
            if "cpctl timeline" in text:
                assert ran.out.startswith("# Timeline of INC-42"), ran.out
                assert json.loads(ran.out[ran.out.index("\n{\n") :])["incident"] == "INC-42"
                checked.add("timeline")
            if "bash_source" in text and ">> ~/.bashrc" not in text:
                # What bash does on `cpctl bund<TAB>`.
                completion = await shell.run(
                    "COMP_WORDS=(cpctl bund); COMP_CWORD=1; _cpctl_completion cpctl bund cpctl; "
                    "printf '%s\\n' \"${COMPREPLY[@]}\""
                )
                assert completion.ok("completion").out.split() == ["bundle"]
                checked.add("completion")
            if ">> ~/.bashrc" in text:
                await check_bashrc(home, env)
                checked.add("bashrc")
            if "OVERRIDE=" in text:
                written = (cache / "controlplane.json.override.json").read_text()
                now = datetime.now(UTC)
                override = parse_override(written, now)
                assert timedelta(hours=1) < override.expires_at - now <= timedelta(hours=2)
                checked.add("override")
            if "curl " in text and "/ofrep/" in text:
                # OFREP: the flag checkout's instances read, as a provider gets it.
                answer = json.loads(ran.out)
                assert (answer["key"], answer["reason"]) == ("new-ui", "STATIC"), ran.out
                assert answer["metadata"]["scope"] == "checkout", ran.out
                checked.add("ofrep")
            elif "curl " in text:
                # The flag as set over HTTP, read back; the routes of the OpenAPI document.
                assert "false\n" in ran.out and "/v1/flags/{scope}/{name}\n" in ran.out, ran.out
                checked.add("http")
            if "cpctl trigger fire" in text:
                assert "fired: trigger degrade-checkout applied bundle" in ran.out, ran.out
                assert "reverted: the alert resolved: trigger degrade-checkout" in ran.out
                checked.add("trigger")
            if text.startswith("etcdctl get"):
                assert "/controlplane/v1/flags/checkout/new-ui" in ran.out, ran.out
                checked.add("etcdctl")
    assert skipped == set(NOT_RUN), skipped
    assert checked == {
        "path", "token", "revert", "timeline", "completion", "bashrc", "override", "etcdctl",
        "http", "ofrep", "trigger",
    }, checked  # fmt: skip
    assert ran_blocks >= 10, ran_blocks


async def check_bashrc(home: Path, env: Mapping[str, str]) -> None:
    """A new bash that reads the ~/.bashrc the README wrote has cpctl and its completion."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "--noprofile", "--norc", "-c", ". ~/.bashrc; command -v cpctl; complete -p cpctl",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=home, env=dict(env),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split("\n")[0] == str(VENV_BIN / "cpctl"), out.decode()
    assert "_cpctl_completion cpctl" in out.decode(), out.decode()
