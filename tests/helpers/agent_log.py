"""The agent SDK's log records (the ``agents`` logger), for a test to wait on.

Records may come from any thread (``agents.Agent`` logs from its own); waits are on an
event, set for each record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager


class AgentLog(logging.Handler):
    """Every record of the ``agents`` logger while attached (see :func:`attached`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._loop = loop
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._loop.call_soon_threadsafe(self._arrived.set)

    def matching(self, *parts: str, level: int = logging.DEBUG) -> list[logging.LogRecord]:
        """The records at ``level`` or above whose message contains each of ``parts``."""
        return [
            record
            for record in list(self.records)
            if record.levelno >= level and all(part in record.getMessage() for part in parts)
        ]

    def messages(self, *parts: str, level: int = logging.DEBUG) -> list[str]:
        """The messages of :meth:`matching`."""
        return [record.getMessage() for record in self.matching(*parts, level=level)]

    async def wait(
        self, *parts: str, level: int = logging.DEBUG, count: int = 1, within: float = 5.0
    ) -> logging.LogRecord:
        """The ``count``-th record at ``level`` or above whose message contains each of
        ``parts``."""
        try:
            async with asyncio.timeout(within):
                while True:
                    self._arrived.clear()
                    found = self.matching(*parts, level=level)
                    if len(found) >= count:
                        return found[count - 1]
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(
                f"fewer than {count} log messages with {parts} within {within}s"
            ) from None


@contextmanager
def attached() -> Iterator[AgentLog]:
    """An :class:`AgentLog` on the ``agents`` logger at DEBUG (call in the test's loop)."""
    handler = AgentLog(asyncio.get_running_loop())
    logger = logging.getLogger("agents")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
