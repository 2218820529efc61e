"""A real Prometheus Alertmanager in its own process, notifying one webhook receiver.

The binary: ``CONTROLPLANE_ALERTMANAGER``, else ``prometheus-alertmanager`` (Debian's
name) or ``alertmanager`` on PATH. ``.ci/run`` unpacks Debian's package (without
installing it) and sets the variable; Debian's build also needs the package's templates
at ``/usr/share/prometheus/alertmanager/``, which ``.ci/run`` links there.

    async with Alertmanager(sink_url, bearer="token") as am:
        await am.fire({"alertname": "HighErrorRate", "service": "checkout"})
        ...
        await am.resolve({"alertname": "HighErrorRate", "service": "checkout"})

Alertmanager runs on a free loopback port with clustering off, so nothing waits for
peers: with ``group_wait`` 0s a new group is notified as soon as its first alert
arrives, and later changes at the next ``group_interval`` tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane.embedded_etcd import free_port
from tests.helpers.debian_tools import unpacked

ENV = "CONTROLPLANE_ALERTMANAGER"
NAMES = ("prometheus-alertmanager", "alertmanager")
RECEIVER = "controlplane"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_BIND_ATTEMPTS = 3
_POLL_MIN_S = 0.01
_POLL_MAX_S = 0.2
_LOG_TAIL_BYTES = 8000
# Debian's build reads its default notification templates from here, not from the binary,
# and no flag moves them.
DEBIAN_TEMPLATES = Path("/usr/share/prometheus/alertmanager")


def find_alertmanager() -> str:
    """The Alertmanager binary to run; fails the test, naming where to get one."""
    configured = os.environ.get(ENV)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            pytest.fail(f"{ENV}={configured} is not an executable file")
        return configured
    for name in NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    unpacked = _unpack_debian_package()
    if unpacked is not None:
        return unpacked
    pytest.fail(
        f"no Alertmanager: set {ENV} to a prometheus-alertmanager binary, or put one on "
        "PATH; .ci/run unpacks Debian's prometheus-alertmanager package "
        "(apt-get download prometheus-alertmanager && dpkg-deb -x) and sets it"
    )


def _unpack_debian_package() -> str | None:
    """Debian's package, unpacked into the tests' cache (see ``debian_tools``); its
    templates linked where Debian's build reads them when nothing is there (which takes
    root; else the start fails saying what to link)."""
    binary = unpacked("prometheus-alertmanager", "prometheus-alertmanager")
    if binary is None:
        return None
    templates = binary.parents[2] / "share" / "prometheus" / "alertmanager"
    if not (DEBIAN_TEMPLATES / "default.tmpl").exists() and templates.exists():
        with contextlib.suppress(OSError):
            DEBIAN_TEMPLATES.parent.mkdir(parents=True, exist_ok=True)
            if DEBIAN_TEMPLATES.is_symlink():
                DEBIAN_TEMPLATES.unlink()
            DEBIAN_TEMPLATES.symlink_to(templates)
    return str(binary)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class AlertmanagerError(AssertionError):
    """Alertmanager exited, was not ready in time, or refused a request."""


class Alertmanager:
    """An async context manager: Alertmanager started on entry, stopped on exit.

    Args:
        url: The webhook receiver's URL (``webhook_configs``, ``send_resolved: true``).
        bearer: Credentials for ``Authorization: Bearer ...`` on every notification.
        group_wait: How long a new group waits before its first notification.
        group_interval: How long a group waits before notifying of changes.
        repeat_interval: How long before an unchanged group is notified again.
        group_by: The route's grouping labels.
        workdir: Where the config, the storage and the log go; a temp dir by default.
    """

    def __init__(
        self,
        url: str,
        *,
        bearer: str | None = None,
        group_wait: str = "0s",
        group_interval: str = "1s",
        repeat_interval: str = "1h",
        group_by: Sequence[str] = ("alertname", "service"),
        workdir: Path | None = None,
    ) -> None:
        self.webhook_url = url
        self.bearer = bearer
        self.group_wait = group_wait
        self.group_interval = group_interval
        self.repeat_interval = repeat_interval
        self.group_by = list(group_by)
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._client: httpx.AsyncClient | None = None
        self._starts: dict[tuple[tuple[str, str], ...], str] = {}
        self.port = 0
        self.dir = Path()

    @property
    def url(self) -> str:
        """Alertmanager's own base URL, also its ``externalURL`` in the payloads."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "alertmanager.log"

    def config(self) -> dict[str, Any]:
        """The ``alertmanager.yml`` it runs with."""
        webhook: dict[str, Any] = {"url": self.webhook_url, "send_resolved": True}
        if self.bearer is not None:
            webhook["http_config"] = {
                "authorization": {"type": "Bearer", "credentials": self.bearer}
            }
        return {
            "route": {
                "receiver": RECEIVER,
                "group_by": self.group_by,
                "group_wait": self.group_wait,
                "group_interval": self.group_interval,
                "repeat_interval": self.repeat_interval,
            },
            "receivers": [{"name": RECEIVER, "webhook_configs": [webhook]}],
        }

    async def __aenter__(self) -> Self:
        binary = find_alertmanager()
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="cp-alertmanager-")
            self.dir = Path(self._tempdir.name)
        else:
            self.dir = self._workdir
            self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "alertmanager.yml").write_text(yaml.safe_dump(self.config()))
        (self.dir / "storage").mkdir(exist_ok=True)
        self._client = httpx.AsyncClient(timeout=5.0)
        try:
            for attempt in range(1, _BIND_ATTEMPTS + 1):
                self.port = free_port()
                try:
                    await self._launch(binary)
                    return self
                except AlertmanagerError as exc:
                    if attempt == _BIND_ATTEMPTS or "address already in use" not in str(exc):
                        raise
        except BaseException:
            await self._cleanup()
            raise
        raise AssertionError("unreachable")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._cleanup()

    async def _launch(self, binary: str) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={self.dir / 'alertmanager.yml'}",
                f"--storage.path={self.dir / 'storage'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--web.external-url={self.url}",
                # Empty: no cluster, so no gossip port and no wait for peers to settle.
                "--cluster.listen-address=",
                "--log.level=debug",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await self._wait_ready(offset)
        except BaseException:
            await self._stop()
            raise

    async def _wait_ready(self, offset: int) -> None:
        proc = self._proc
        assert proc is not None and self._client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        interval = _POLL_MIN_S
        while True:
            with contextlib.suppress(httpx.TransportError):
                response = await self._client.get(f"{self.url}/-/ready")
                if response.status_code == 200:
                    if proc.returncode is not None:
                        raise AlertmanagerError(
                            f"Alertmanager exited with code {proc.returncode}, yet "
                            f"{self.url} answers: another process has the port\n"
                            + self.log_tail(offset)
                        )
                    return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AlertmanagerError(
                    f"Alertmanager was not ready within {START_TIMEOUT:g}s on {self.url}:\n"
                    + self.log_tail(offset)
                )
            # Waiting on the process is the poll interval and notices an early exit.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), min(interval, remaining))
            if proc.returncode is not None:
                raise AlertmanagerError(
                    f"Alertmanager exited with code {proc.returncode} during start-up:\n"
                    + self.log_tail(offset)
                )
            interval = min(interval * 2, _POLL_MAX_S)

    def log_tail(self, offset: int = 0) -> str:
        """Alertmanager's own log (the end of it), from ``offset`` on."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(offset, size - _LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        if f"{DEBIAN_TEMPLATES / 'default.tmpl'}: no such file" in text:
            text += (
                f"\nDebian's Alertmanager needs its templates in {DEBIAN_TEMPLATES}/: link the "
                "unpacked package's usr/share/prometheus/alertmanager there (.ci/run does)"
            )
        return text

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def _cleanup(self) -> None:
        try:
            await self._stop()
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
            if self._tempdir is not None:
                self._tempdir.cleanup()
                self._tempdir = None

    def _live_client(self) -> httpx.AsyncClient:
        if self._client is None or self._proc is None:
            raise AlertmanagerError("Alertmanager is not running (use it in `async with`)")
        if self._proc.returncode is not None:
            raise AlertmanagerError(
                f"Alertmanager exited with code {self._proc.returncode}:\n" + self.log_tail()
            )
        return self._client

    async def post_alerts(self, alerts: Iterable[Mapping[str, Any]]) -> None:
        """POST ``/api/v2/alerts``; returns once Alertmanager stored them.

        Each alert: ``labels``, and optionally ``annotations``, ``startsAt``, ``endsAt``
        (RFC 3339) and ``generatorURL``, as Prometheus sends them.
        """
        body = [dict(alert) for alert in alerts]
        response = await self._live_client().post(f"{self.url}/api/v2/alerts", json=body)
        if response.status_code != 200:
            raise AlertmanagerError(
                f"POST /api/v2/alerts answered {response.status_code}: {response.text}"
            )

    async def fire(
        self,
        labels: Mapping[str, str],
        annotations: Mapping[str, str] | None = None,
        generator_url: str = "",
    ) -> None:
        """Send a firing alert. As Prometheus does, a repeat keeps the first ``startsAt``."""
        starts_at = self._starts.setdefault(_key(labels), now_rfc3339())
        alert: dict[str, Any] = {"labels": dict(labels), "startsAt": starts_at}
        if annotations is not None:
            alert["annotations"] = dict(annotations)
        if generator_url:
            alert["generatorURL"] = generator_url
        await self.post_alerts([alert])

    async def resolve(
        self,
        labels: Mapping[str, str],
        annotations: Mapping[str, str] | None = None,
        generator_url: str = "",
    ) -> None:
        """Send the alert again with ``endsAt`` now: Alertmanager marks it resolved."""
        ends_at = now_rfc3339()
        starts_at = self._starts.pop(_key(labels), ends_at)
        alert: dict[str, Any] = {"labels": dict(labels), "startsAt": starts_at, "endsAt": ends_at}
        if annotations is not None:
            alert["annotations"] = dict(annotations)
        if generator_url:
            alert["generatorURL"] = generator_url
        await self.post_alerts([alert])

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` (with those labels) on ``/metrics``."""
        response = await self._live_client().get(f"{self.url}/metrics")
        response.raise_for_status()
        total = 0.0
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    async def wait_metric(
        self, name: str, at_least: float, within: float = 10.0, **labels: str
    ) -> float:
        """Until ``metric(name, **labels)`` reaches ``at_least``; its value then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        interval = _POLL_MIN_S
        while True:
            value = await self.metric(name, **labels)
            if value >= at_least:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AlertmanagerError(
                    f"{name}{labels or ''} was {value:g}, not {at_least:g}, within {within:g}s"
                )
            # The process' exit ends the wait early too.
            assert self._proc is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), min(interval, remaining))
            interval = min(interval * 2, _POLL_MAX_S)

    async def flushes(self) -> float:
        """How many times a group's notification was decided: sent or not.

        Each flush of a group asks the notification log whether the receiver was told
        already (the de-duplication stage), before any send: the log's query count.
        """
        return await self.metric("alertmanager_nflog_queries_total")
