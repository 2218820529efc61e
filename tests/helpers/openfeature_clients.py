"""OpenFeature clients no one here wrote, each in a process of its own, driven by lines.

Every client script (``tests/helpers/flagd_client.py``, ``flagd_node/client.mjs``,
``ofrep_web/client.mjs``) speaks the same line protocol: it prints one JSON line per
provider event (``{"event": NAME, "flags": [...]}``), ``{"event": "INITIALIZED"}`` once
ready, optionally one line per request it makes (``{"fetch": ...}``), and for each stdin
line ``KIND KEY DEFAULT_JSON`` one JSON line with the resolution (value, reason,
variant, error_code).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

WAIT = 10.0  # seconds a client gets to say something before the test fails
HELPERS = Path(__file__).parent


class Client:
    """A client process: its events, its requests, and resolutions on demand."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.fetches: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *argv: str) -> Client:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            document = json.loads(line)
            queue = (
                self.events
                if "event" in document
                else self.fetches
                if "fetch" in document
                else self.answers
            )
            await queue.put(document)

    async def event(self, name: str) -> dict[str, Any]:
        """The next event called ``name`` (others before it are skipped)."""
        async with asyncio.timeout(WAIT):
            while True:
                event = await self.events.get()
                if event["event"] == name:
                    return event

    async def fetch(self) -> dict[str, Any]:
        """The next request the client made."""
        async with asyncio.timeout(WAIT):
            return await self.fetches.get()

    async def resolve(self, kind: str, key: str, default: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{kind} {key} {json.dumps(default)}\n".encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(WAIT):
            return await self.answers.get()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


def npm_install(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``tests/helpers/NAME`` (package.json, client.mjs) with its npm packages
    installed from the registry."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("node and npm are missing: install Debian's nodejs and npm (.ci/run does)")
    where = tmp_path_factory.mktemp(name)
    for file in ("package.json", "client.mjs"):
        shutil.copy(HELPERS / name / file, where / file)
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=where, check=True, timeout=600,
    )  # fmt: skip
    return where
