"""The only module that talks to etcd: key layout, compare-and-set, audit, retention.

Layout under the prefix (default ``/controlplane/v1/``), every value a JSON record
readable with ``etcdctl get --prefix``::

    flags/<scope>/<name>            scope: "global" or a service
    shedding/<service>
    pins/<service>
    known-good/<service>/<version>
    bundles/<id>
    audit/<20-digit unix ns>-<8 hex>  time-ordered, so retention is one range delete

Every write is a read-modify-write: the record is read with its mod revision,
the new record computed, then one transaction compares the mod revision and
puts the record and its audit record together. A caller-supplied expected mod
revision that does not match fails with :class:`ConflictError`; without one,
a lost race is retried. A write that changes neither value nor expiry writes
nothing (no revision, no audit record).

The store builds its own gRPC channel to etcd (aetcd 1.0's client opens a
plaintext channel to a single host:port) and uses aetcd's generated etcd v3
stubs on it, so that several endpoints form one multi-address target with
failover, every call gets its own deadline, and TLS can be added here alone.

Security (:class:`EtcdSecurity`): TLS with a CA and an optional client
certificate on every endpoint's channel, and etcd's own user/password
authentication. etcd takes a ``token`` metadata entry from ``Authenticate``; the
store gets one per endpoint when first needed (etcd's default "simple" tokens
belong to the member that issued them) and sends it with every call. When etcd
rejects a token (restarted, auth disabled and enabled, the user's password
changed, idle past ``--auth-token-ttl``) the store authenticates again and
retries that call once: etcd rejects such a call before applying it, so a
write is never applied twice. Passwords and tokens never appear in logs,
errors, reprs or metrics; errors name the user.

Deadlines: each etcd call gets what is left of the current budget
(:meth:`Store.budget`, set per RPC by the service to the smaller of
``etcd_timeout`` and the RPC's own deadline), else ``etcd_timeout``. A call that
gets no answer in time raises :class:`UnavailableError`.

A record that does not parse (hand-edited) is never served: the store keeps
the key's last good record in memory and serves that (or treats the key as
absent if it never saw a good one), logs ``record_invalid`` and counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import hashlib
import json
import random
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import structlog
from aetcd import rpc

from controlplane import model, semantics
from controlplane.errors import (
    BundleConflictError,
    CompactedError,
    ConflictError,
    ControlPlaneError,
    DeadlineExceededError,
    EtcdAccessError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from controlplane.metrics import ServerMetrics
from controlplane.model import (
    GLOBAL_SCOPE,
    AuditEntry,
    Bundle,
    BundleEntry,
    Flag,
    FlagValue,
    KnownGood,
    Meta,
    Pin,
    RecordError,
    Shedding,
    Tier,
    WriteOptions,
)
from controlplane.semantics import Decision, decide_expiry

log = structlog.get_logger("controlplane.store")

R = TypeVar("R", Flag, Shedding, Pin, KnownGood)

DEFAULT_PREFIX = "/controlplane/v1/"
_MAX_CAS_ATTEMPTS = 16
_HISTORY_PAGE = 512
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # gRPC's own reconnect backoff grows to 120 s; etcd coming back must be
    # noticed within about a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]

_deadline: contextvars.ContextVar[tuple[float, bool] | None] = contextvars.ContextVar(
    "controlplane_etcd_deadline", default=None
)

# Audit records hold a record before and after (each up to 64 KiB); etcd takes 1.5 MiB.
MAX_AUDIT_BYTES = 512 * 1024
_MAX_BUNDLE_RECORD_BYTES = 1024 * 1024
_MAX_TXN_BYTES = 1_400_000  # etcd's default request limit is 1.5 MiB
EXPIRY_ACTOR = "controlplane:expiry"


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Stored(Generic[R]):
    """A record with the mod revision of the key that holds it."""

    record: R
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WriteOutcome(Generic[R]):
    """What a write did (or would do, on a dry run)."""

    changed: bool
    dry_run: bool
    revision: int
    mod_revision: int
    record: R | None
    previous: R | None
    restored: R | None = None
    audit_id: str = ""
    overridden_by: tuple[str, ...] = ()
    summary: str = ""
    would_change: bool = False
    key: str = ""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One key's change seen by a watch (``value`` None: deleted)."""

    path: str  # relative to the prefix
    value: bytes | None
    mod_revision: int


@dataclass(frozen=True, slots=True)
class BundleView:
    """A bundle with its state, computed from the keys it changed."""

    bundle: Bundle
    state: model.BundleState
    revision: int  # the transaction that applied it
    overridden_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BundleOutcome:
    """What applying or reverting a bundle did (or would do)."""

    changed: bool
    dry_run: bool
    revision: int
    view: BundleView | None
    summary: str
    would_change: bool = False
    overwritten: tuple[str, ...] = ()
    audit_ids: tuple[str, ...] = ()


@dataclass(slots=True)
class _KeyLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(slots=True)
class _Key:
    """Where a record lives and how to parse and name it."""

    path: str  # relative to the prefix, e.g. "flags/global/new-ui"
    kind: str  # flag, shedding, pin, known_good
    scope: str
    name: str
    parse: Callable[[dict[str, Any]], Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Current:
    """A key as read: its record (or last good one), mod revision, and invalid bytes."""

    record: Any
    mod_revision: int
    invalid: bytes | None = None


_KNOWN_MAX = 10_000
"""Keys a store remembers as it last saw them (for writes without a read first)."""
_BATCH_MAX_WRITES = 24
"""At most this many writes share one transaction: each takes up to 4 operations
(record, expiry index out and in, audit), and etcd allows 128 by default."""
_BATCH_MAX_BYTES = 512 * 1024
"""At most this many bytes of operations in one shared transaction (etcd takes
1.5 MiB a request); a write bigger than that goes in a transaction of its own."""


@dataclass(slots=True, eq=False)
class _Pending:
    """A write's compare-and-set waiting for the next shared transaction."""

    compare: Any
    ops: list[Any]
    size: int
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


_ALONE: Any = object()
"""A shared transaction failed its compare: each of its writes goes on its own."""


@dataclass(slots=True)
class Plan:
    """One key's part of a write: where, and how to decide the new record."""

    key: _Key
    decide: Callable[[Any, datetime, WriteOptions], Decision]
    # For a global flag: its name, to report the services that keep their own value.
    overridden_flag: str = ""


# ---------------------------------------------------------------- security


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """How the store reaches etcd securely: TLS files and an etcd user.

    Every field is optional; the command-line option each one stands for is named
    in the errors. Files are read when the store connects, not here.

    Attributes:
        ca: CA certificate (PEM) that etcd's server certificate must chain to
            (``--etcd-ca``); ``None`` with ``cert`` uses the system's roots.
        cert: Client certificate (PEM) for etcd's ``--client-cert-auth`` (``--etcd-cert``).
        key: The client certificate's private key (PEM) (``--etcd-key``).
        user: etcd user name (``--etcd-user``).
        password: That user's password (``--etcd-password-file`` or ``CONTROLPLANE_ETCD_PASSWORD``);
            never shown in a repr.
        server_name: The name to expect in etcd's certificate instead of the endpoint's
            host (``--etcd-server-name``), e.g. when endpoints are IP addresses.

    Raises:
        ValueError: An option that needs another one alone, or an empty value.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if isinstance(value, str):
                # Accept str paths (click and environment variables give str).
                object.__setattr__(self, name, Path(value))
        if self.cert is not None and self.key is None:
            raise ValueError("--etcd-cert needs --etcd-key (the client certificate's key)")
        if self.key is not None and self.cert is None:
            raise ValueError("--etcd-key needs --etcd-cert (the client certificate)")
        if self.user is not None and not self.user:
            raise ValueError("--etcd-user is empty")
        if self.user is not None and self.password is None:
            raise ValueError(
                f"--etcd-user {self.user!r} needs a password "
                "(--etcd-password-file or CONTROLPLANE_ETCD_PASSWORD)"
            )
        if self.password is not None and self.user is None:
            raise ValueError("an etcd password needs --etcd-user")
        if self.password is not None and not self.password:
            raise ValueError("the etcd password is empty")
        if self.server_name is not None and not self.server_name:
            raise ValueError("--etcd-server-name is empty")
        if self.server_name is not None and not self.uses_tls:
            raise ValueError(
                "--etcd-server-name needs TLS: give --etcd-ca (or --etcd-cert and --etcd-key)"
            )

    @property
    def uses_tls(self) -> bool:
        """Whether the channels to etcd use TLS (a CA or a client certificate is given)."""
        return self.ca is not None or self.cert is not None

    @property
    def uses_auth(self) -> bool:
        """Whether calls carry an etcd user's token."""
        return self.user is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Read the TLS files and build gRPC channel credentials.

        Raises:
            EtcdAccessError: A file cannot be read or holds no PEM block of its kind.
        """
        ca = _read_pem(self.ca, "--etcd-ca", b"CERTIFICATE") if self.ca else None
        cert = _read_pem(self.cert, "--etcd-cert", b"CERTIFICATE") if self.cert else None
        key = _read_pem(self.key, "--etcd-key", b"PRIVATE KEY") if self.key else None
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def _read_pem(path: Path, option: str, kind: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EtcdAccessError(f"cannot read {option} file {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or kind + b"-----" not in data:
        # Never quote the content: it may be a private key.
        raise EtcdAccessError(
            f"{option} file {path} holds no PEM {kind.decode().lower()} "
            f"(-----BEGIN ...{kind.decode()}-----)"
        )
    return data


# etcd's answers (3.4 and 3.5) to a call whose token it does not accept; each is given
# before the call is applied, so the call can be retried with a new token.
_TOKEN_REJECTED = (
    "invalid auth token",  # UNAUTHENTICATED: unknown or expired token, auth re-enabled
    "user name is empty",  # INVALID_ARGUMENT: no token (auth was enabled after we looked)
    "revision of auth store is old",  # INVALID_ARGUMENT: auth changed while in flight
)


class _TokenRejectedError(Exception):
    """etcd refused a stream's token or permission (inside the store only)."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _token_rejected(code: grpc.StatusCode, details: str) -> bool:
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return True
    return code is grpc.StatusCode.INVALID_ARGUMENT and any(
        text in details for text in _TOKEN_REJECTED
    )


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _looks_like_tls_failure(details: str) -> bool:
    # gRPC's words when a handshake fails or etcd drops a connection over its client cert.
    return any(
        text in details for text in ("TSI_", "andshake", "SSL", "certificate", "Verification")
    )


# ---------------------------------------------------------------- endpoints


def normalize_endpoints(endpoints: Sequence[str], *, tls: bool = False) -> list[str]:
    """``host:port`` endpoints from a list that may carry ``http://`` (etcd's URL form).

    With ``tls`` (the store has TLS settings) endpoints may be ``https://`` URLs and
    ``http://`` ones are refused; without it the reverse.
    """
    cleaned = []
    for raw in endpoints:
        endpoint = raw.strip()
        if not endpoint:
            continue
        if endpoint.startswith("https://") and not tls:
            raise ValueError(
                f"etcd endpoint {endpoint!r}: TLS to etcd needs --etcd-ca "
                "(or --etcd-cert and --etcd-key)"
            )
        if endpoint.startswith("http://") and tls:
            raise ValueError(
                f"etcd endpoint {endpoint!r} is plaintext but TLS to etcd is configured: "
                "use https:// or host:port"
            )
        endpoint = endpoint.removeprefix("https://" if tls else "http://").rstrip("/")
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {raw!r} is not host:port")
        cleaned.append(endpoint)
    if not cleaned:
        raise ValueError("no etcd endpoint given")
    return cleaned


_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def etcd_version_risk(version: str) -> str | None:
    """What is known to be wrong with an etcd release, or None.

    Args:
        version: The version an etcd member reports (``Maintenance.Status``), e.g. ``3.5.1``.

    Returns:
        One sentence for operators, or None when nothing is known against it (an
        unparsable version included).
    """
    match = _VERSION_RE.match(version)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    if (major, minor) == (3, 5) and patch <= 2:
        return (
            f"etcd {version} can lose acknowledged writes when a member crashes under load "
            "(fixed in 3.5.3): upgrade etcd to 3.5.3 or later"
        )
    return None


def _range_end(prefix: bytes) -> bytes:
    """The etcd range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _ns(value: datetime) -> int:
    return int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1000


def _bundle_stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%d-%H%M%S")


def new_bundle_id(now: datetime, name: str) -> str:
    """A bundle id people can read and type, ordered by time: ``20261126-164500-name-3fa2``."""
    return f"{_bundle_stamp(now)}-{name}-{secrets.token_hex(2)}"


def _fingerprint(name: str, changes: Sequence[dict[str, Any]]) -> str:
    text = json.dumps({"name": name, "changes": list(changes)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_bundle_shape(paths: Sequence[str]) -> None:
    if not paths:
        raise InvalidArgumentError("changes", "a bundle needs at least one change")
    if len(paths) > model.MAX_BUNDLE_CHANGES:
        raise InvalidArgumentError(
            "changes",
            f"{len(paths)} changes, over the maximum of {model.MAX_BUNDLE_CHANGES} per bundle "
            "(etcd allows 128 operations per transaction; a change takes up to 4): "
            "split it into several bundles",
        )
    seen: dict[str, int] = {}
    for index, path in enumerate(paths):
        if path in seen:
            raise InvalidArgumentError(
                f"changes[{index}]",
                f"changes the same key as changes[{seen[path]}] ({path}): one change per key",
            )
        seen[path] = index


def _check_txn_size(ops: Sequence[Any]) -> None:
    size = sum(op.ByteSize() for op in ops)
    if size > _MAX_TXN_BYTES:
        raise InvalidArgumentError(
            "changes",
            f"the transaction would be {size} bytes, over the {_MAX_TXN_BYTES} byte budget "
            "under etcd's 1.5 MiB request limit: split it into smaller bundles",
        )


def _own_copy(exc: Exception) -> Exception:
    """``exc`` again, for one more waiter (a traceback of its own), or itself."""
    try:
        return copy.copy(exc)
    except Exception:  # one whose constructor takes other arguments than its args
        return exc


def new_audit_id(now: datetime) -> str:
    """A time-ordered audit id: 20-digit unix nanoseconds and 8 random hex digits."""
    return f"{_ns(now):020d}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------- the store


class Store:
    """Flags, shedding, pins and known-good marks in etcd, each write audited.

    Lifecycle: build, ``await connect()`` once (opens the channels; does not wait
    for etcd, which may come later), use, ``await close()`` (idempotent).

    With several endpoints the store talks to one at a time and moves to the next
    when one does not answer (refused, or no answer within the etcd timeout), so a
    dead or hung member costs one failed call, not an outage.

    ``security`` adds TLS and an etcd user (see :class:`EtcdSecurity`): ``connect()``
    reads the TLS files (raising :class:`EtcdAccessError` for one it cannot read);
    the first call to each endpoint authenticates, and a refused user or password
    fails that call with :class:`EtcdAccessError` naming the user.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        etcd_timeout: float = 2.0,
        metrics: ServerMetrics,
        on_etcd_health: Callable[[bool], None] | None = None,
        security: EtcdSecurity | None = None,
    ) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must start and end with '/'")
        self.security = security or EtcdSecurity()
        self.endpoints = normalize_endpoints(endpoints, tls=self.security.uses_tls)
        self.prefix = prefix
        self.etcd_timeout = etcd_timeout
        self._metrics = metrics
        self._on_etcd_health = on_etcd_health
        self._etcd_ok: bool | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._kvs: list[Any] = []
        self._leases: list[Any] = []
        self._auths: list[Any] = []
        # Per endpoint: the token ("" when etcd has auth off); absent until first needed.
        self._tokens: dict[int, str] = {}
        self._auth_locks: list[asyncio.Lock] = []
        self._auth_off_logged = False
        self._current = 0
        self._last_good: dict[str, Any] = {}
        # Each key as this server last read or wrote it: a write builds its transaction
        # on it without reading first; the transaction's compare-and-set on the mod
        # revision catches another writer, and the write is then made again on a read.
        self._known: dict[str, _Current] = {}
        self._key_locks: dict[str, _KeyLock] = {}
        # Group commit: while one write's transaction is with etcd, the writes that
        # come meanwhile wait and then go together in one transaction.
        self._committing = False
        self._queued: list[_Pending] = []
        self._batches: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the channels to etcd. Call once.

        Raises:
            EtcdAccessError: A TLS file cannot be read.
        """
        if self._channels:
            raise RuntimeError("Store.connect() called twice")
        security = self.security
        credentials = security.channel_credentials() if security.uses_tls else None
        options = list(_CHANNEL_OPTIONS)
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        for endpoint in self.endpoints:
            channel = (
                grpc.aio.secure_channel(endpoint, credentials, options=options)
                if credentials is not None
                else grpc.aio.insecure_channel(endpoint, options=options)
            )
            self._channels.append(channel)
            self._kvs.append(rpc.KVStub(channel))
            self._leases.append(rpc.LeaseStub(channel))
            self._auths.append(rpc.AuthStub(channel))
            self._auth_locks.append(asyncio.Lock())
        if security.uses_tls or security.uses_auth:
            log.info(
                "etcd_security",
                tls=security.uses_tls,
                client_cert=security.cert is not None,
                user=security.user,
            )

    async def close(self) -> None:
        """Close the channels. Idempotent."""
        for task in list(self._batches):
            task.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
        for pending in self._queued:
            if not pending.done.done():
                pending.done.set_exception(UnavailableError("the server is stopping"))
        self._queued.clear()
        self._committing = False
        channels, self._channels, self._kvs, self._leases = self._channels, [], [], []
        self._auths, self._auth_locks, self._tokens = [], [], {}
        for channel in channels:
            await channel.close(grace=None)

    @contextlib.contextmanager
    def budget(self, seconds: float, *, caller_deadline: bool = False) -> Iterator[None]:
        """Give the etcd calls made inside at most ``seconds`` in all.

        ``caller_deadline``: the limit is the caller's own deadline (shorter than
        the etcd timeout). Running out of it then says DEADLINE_EXCEEDED and says
        nothing about etcd's health.
        """
        token = _deadline.set((time.monotonic() + max(seconds, 0.0), caller_deadline))
        try:
            yield
        finally:
            _deadline.reset(token)

    # -- raw etcd calls ----------------------------------------------------

    def _timeout(self) -> tuple[float, bool]:
        budget = _deadline.get()
        if budget is None:
            return self.etcd_timeout, False
        deadline, caller = budget
        left = deadline - time.monotonic()
        if left <= 0:
            if caller:
                raise DeadlineExceededError("the call's deadline ran out before etcd answered")
            raise UnavailableError(self._unreachable(f"no answer within {self.etcd_timeout:g}s"))
        return left, caller

    def _unreachable(self, detail: str) -> str:
        message = f"etcd is unreachable at {','.join(self.endpoints)}: {detail}"
        if self.security.uses_tls and _looks_like_tls_failure(detail):
            message += (
                " (TLS to etcd failed: does etcd trust the client certificate (--etcd-cert), "
                "and does its own certificate chain to --etcd-ca and name the endpoint "
                "(--etcd-server-name)?)"
            )
        return message

    # -- etcd authentication -------------------------------------------------

    def _user(self) -> str:
        return repr(self.security.user)

    async def _token(self, index: int, deadline: float) -> str | None:
        """The token for calls to endpoint ``index``; None without an etcd user."""
        if not self.security.uses_auth:
            return None
        token = self._tokens.get(index)
        if token is None:
            token = await self._renew_token(index, None, deadline)
        return token

    async def _renew_token(self, index: int, stale: str | None, deadline: float) -> str:
        """Authenticate at endpoint ``index`` unless another call replaced ``stale`` meanwhile.

        One authentication per endpoint at a time: when a token dies, every call in
        flight sees it rejected, and each Authenticate is a raft write in etcd.

        Raises:
            EtcdAccessError: etcd refused the user name or password.
            grpc.aio.AioRpcError: etcd did not answer (left to the caller's handling).
            TimeoutError: ``deadline`` passed while waiting for another call's renewal.
        """
        async with asyncio.timeout_at(_loop_time(deadline)), self._auth_locks[index]:
            current = self._tokens.get(index)
            if current is not None and current != stale:
                return current
            self._tokens.pop(index, None)
            token = await self._authenticate(index, deadline)
            self._tokens[index] = token
            if stale is not None:
                log.info(
                    "etcd_token_renewed", endpoint=self.endpoints[index], user=self.security.user
                )
            return token

    async def _authenticate(self, index: int, deadline: float) -> str:
        user = self.security.user
        assert user is not None and self.security.password is not None
        request = rpc.AuthenticateRequest(name=user, password=self.security.password)
        start = time.perf_counter()
        outcome = "error"
        try:
            response = await self._auths[index].Authenticate(
                request, timeout=max(deadline - time.monotonic(), 0.001)
            )
            outcome = "ok"
        except grpc.aio.AioRpcError as exc:
            details = str(exc.details())
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in details:
                # As etcd's own client does: go on without a token; should auth be
                # enabled later, etcd says "user name is empty" and we come back here.
                outcome = "ok"
                if not self._auth_off_logged:
                    self._auth_off_logged = True
                    log.warning("etcd_auth_not_enabled", endpoint=self.endpoints[index], user=user)
                return ""
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in (
                details
            ):
                raise EtcdAccessError(
                    f"etcd refused user {user!r}: authentication failed "
                    f"(wrong user name or password; etcd says: {details})"
                ) from None
            raise
        finally:
            self._metrics.etcd_seconds.labels("authenticate", outcome).observe(
                time.perf_counter() - start
            )
        return str(response.token)

    def _token_metadata(self, token: str | None) -> tuple[tuple[str, str], ...] | None:
        return (("token", token),) if token else None

    def _refused(self, operation: str, code: grpc.StatusCode, details: str) -> EtcdAccessError:
        """The error for an etcd answer about the store's own credentials."""
        if code is grpc.StatusCode.PERMISSION_DENIED:
            who = f"user {self._user()}" if self.security.uses_auth else "this client"
            return EtcdAccessError(
                f"etcd refused {who} {operation} access under {self.prefix}: {details} "
                "(grant the user a role with read-write access to the prefix)"
            )
        if not self.security.uses_auth:
            return EtcdAccessError(
                f"etcd refused the {operation}: it requires authentication ({details}); "
                "configure --etcd-user and its password"
            )
        return EtcdAccessError(
            f"etcd refused user {self._user()} again after a new token: {details}"
        )

    def _set_etcd_ok(self, ok: bool) -> None:
        self._metrics.etcd_up.set(1 if ok else 0)
        if ok != self._etcd_ok:
            self._etcd_ok = ok
            if ok:
                log.info("etcd_reachable", endpoint=self.endpoints[self._current])
            else:
                log.error("etcd_unreachable", endpoints=self.endpoints)
            if self._on_etcd_health is not None:
                self._on_etcd_health(ok)

    def _rotate(self, failed: int) -> None:
        if len(self.endpoints) > 1 and self._current == failed:
            self._current = (failed + 1) % len(self.endpoints)
            log.warning(
                "etcd_endpoint_switched",
                failed=self.endpoints[failed],
                now=self.endpoints[self._current],
            )

    async def _call(
        self,
        operation: str,
        method_name: str,
        request: Any,
        *,
        idempotent: bool = False,
        lease: bool = False,
    ) -> Any:
        if not self._kvs:
            raise RuntimeError("Store is not connected")
        # Reads may be tried on each endpoint in turn; a write is tried once, since
        # one that got no answer may still have been applied.
        attempts = len(self._kvs) if idempotent else 1
        for attempt in range(attempts):
            timeout, caller = self._timeout()
            if attempt + 1 < attempts:
                timeout = min(timeout, max(timeout / 2, min(timeout, 0.5)))
            index = self._current
            method = getattr((self._leases if lease else self._kvs)[index], method_name)
            start = time.perf_counter()
            outcome = "ok"
            try:
                response = await self._invoke(index, method, request, time.monotonic() + timeout)
            except grpc.aio.AioRpcError as exc:
                outcome = "error"
                code = exc.code()
                if code is grpc.StatusCode.PERMISSION_DENIED or _token_rejected(
                    code, str(exc.details())
                ):
                    self._metrics.etcd_up.set(0)
                    raise self._refused(operation, code, str(exc.details())) from None
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and caller and self._spent():
                    raise DeadlineExceededError(
                        "the call's deadline ran out before etcd answered"
                    ) from None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._rotate(index)
                    if attempt + 1 < attempts and not self._spent():
                        continue
                    self._set_etcd_ok(False)
                    detail = (
                        f"no answer within {timeout:.2f}s"
                        if code is grpc.StatusCode.DEADLINE_EXCEEDED
                        else str(exc.details())
                    )
                    raise UnavailableError(self._unreachable(detail)) from None
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    details = str(exc.details())
                    if "space exceeded" in details:
                        raise UnavailableError(
                            f"etcd refused the write: {details} (its space quota is full: "
                            "compact and defragment etcd)"
                        ) from None
                    raise ControlPlaneError(f"etcd answer too large: {details}") from None
                raise ControlPlaneError(f"etcd error ({code.name}): {exc.details()}") from None
            except TimeoutError:
                # Waited for another call's authentication until the budget ran out.
                outcome = "error"
                if caller:
                    raise DeadlineExceededError(
                        "the call's deadline ran out before etcd answered"
                    ) from None
                self._set_etcd_ok(False)
                raise UnavailableError(
                    self._unreachable(f"no answer within {timeout:.2f}s (authenticating)")
                ) from None
            except EtcdAccessError:
                # Reachable, but unusable until the credentials are fixed.
                outcome = "error"
                self._metrics.etcd_up.set(0)
                raise
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                self._metrics.etcd_seconds.labels(operation, outcome).observe(
                    time.perf_counter() - start
                )
            self._set_etcd_ok(True)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _invoke(self, index: int, method: Any, request: Any, deadline: float) -> Any:
        """One unary call to endpoint ``index`` with its token; a rejected token is renewed once.

        Every unary etcd call of the store passes here (the watch and lease keep-alive
        streams get their token in their own methods). ``deadline`` is on
        ``time.monotonic()``'s clock.
        """
        token = await self._token(index, deadline)
        try:
            return await method(
                request,
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=self._token_metadata(token),
            )
        except grpc.aio.AioRpcError as exc:
            if token is None or not _token_rejected(exc.code(), str(exc.details())):
                raise
        # etcd rejects a call over its token before applying it: retrying a write is safe.
        token = await self._renew_token(index, token, deadline)
        return await method(
            request,
            timeout=max(deadline - time.monotonic(), 0.001),
            metadata=self._token_metadata(token),
        )

    async def etcd_versions(self) -> list[tuple[str, str | None]]:
        """The etcd version each endpoint runs (``Maintenance.Status``), in endpoint order.

        None for an endpoint that gave no answer within the etcd timeout or refused the
        call: the versions are for the start-up log and its warnings, nothing depends on
        them.
        """
        if not self._channels:
            raise RuntimeError("Store is not connected")

        async def one(index: int) -> str | None:
            status = rpc.MaintenanceStub(self._channels[index]).Status
            deadline = time.monotonic() + self.etcd_timeout
            try:
                response = await self._invoke(index, status, rpc.StatusRequest(), deadline)
            except (grpc.aio.AioRpcError, EtcdAccessError, TimeoutError):
                return None
            return str(response.version)

        versions = await asyncio.gather(*(one(index) for index in range(len(self._channels))))
        return list(zip(self.endpoints, versions, strict=True))

    def _spent(self) -> bool:
        budget = _deadline.get()
        return budget is not None and budget[0] - time.monotonic() <= 0.001

    async def _range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
    ) -> Any:
        request = rpc.RangeRequest(
            key=key,
            range_end=range_end or b"",
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
        )
        return await self._call("range", "Range", request, idempotent=True)

    async def _txn(self, compare: list[Any], success: list[Any]) -> Any:
        response = await self._call("txn", "Txn", rpc.TxnRequest(compare=compare, success=success))
        if response.succeeded and self._known:
            # What a bundle, a revert or an expiry changed is no longer as last seen
            # (a write through ``write`` records its own result after this).
            start = len(self.prefix)
            for op in success:
                kind = op.WhichOneof("request")
                if kind == "request_put":
                    self._known.pop(op.request_put.key.decode(errors="replace")[start:], None)
                elif kind == "request_delete_range":
                    self._known.pop(
                        op.request_delete_range.key.decode(errors="replace")[start:], None
                    )
        return response

    async def ping(self) -> int:
        """Read etcd's current revision (a linearizable read); raise if unreachable."""
        response = await self._range(self.prefix.encode(), count_only=True)
        return int(response.header.revision)

    async def revision(self) -> int:
        """etcd's current revision."""
        return await self.ping()

    # -- break-glass overrides reported by agents ----------------------------------

    async def record_override(
        self,
        service: str,
        instance_id: str,
        *,
        active: bool,
        digest: str,
        actor: str,
        reason: str,
        expires_at: datetime | None,
        content: dict[str, Any] | None,
        actor_authenticated: bool = False,
    ) -> bool:
        """Audit a host's break-glass override once (by digest); True if written now.

        ``overrides/<service>/<instance>`` holds the digest of the override last
        audited for that instance, so reconnects and replicas do not repeat it.
        """
        path = f"overrides/{service}/{instance_id}"
        for _attempt in range(3):
            response = await self._range(self._abs(path))
            kv = response.kvs[0] if response.kvs else None
            known = bytes(kv.value).decode(errors="replace") if kv is not None else ""
            mod = int(kv.mod_revision) if kv is not None else 0
            if (active and known == digest) or (not active and kv is None):
                return False
            now = model.utcnow()
            entry = AuditEntry(
                id=new_audit_id(now),
                time=now,
                actor=actor or "unknown",
                actor_authenticated=actor_authenticated,
                action="override.applied" if active else "override.cleared",
                kind="override",
                scope=service,
                name=instance_id,
                key=self.prefix + path,
                reason=reason or "break-glass override on the host",
                after=content if active else None,
                expires_at=expires_at if active else None,
            )
            ops = [self._audit_op(entry)]
            if active:
                ops.append(self.put_op(self.prefix + path, digest.encode()))
            else:
                ops.append(self._delete_op(self._abs(path)))
            result = await self._txn([self._unchanged_since(path, mod)], ops)
            if result.succeeded:
                log.warning(
                    "override_reported",
                    service=service,
                    instance_id=instance_id,
                    active=active,
                    actor=actor,
                    reason=reason,
                )
                return True
        return False

    # -- watch, leases and raw keys (for the hub and presence) ------------------

    async def watch(
        self, start_revision: int
    ) -> AsyncGenerator[tuple[int, list[WatchEvent]], None]:
        """Changes under the prefix from ``start_revision`` on, one revision at a time.

        Yields ``(revision, events)`` in revision order; ``events`` is empty for a
        progress notification (etcd's current revision, nothing changed under the
        prefix). Raises :class:`CompactedError` when ``start_revision`` is no longer
        kept, and :class:`UnavailableError` when the stream breaks (resume from the
        last revision seen + 1). aetcd does not resume a broken watch by itself.

        With an etcd user the stream carries the endpoint's token. etcd checks it when
        the watch is created and cancels the watch at once if it rejects it: the token
        is then renewed and the watch created again, once (etcd 3.4 calls a dead token
        invalid, 3.5 answers "permission denied" as for a missing right: both are
        renewed). A watch created with a good token keeps delivering after the token
        dies; every new watch (the hub's resume after a break) takes the current token.
        A refused user, or a permission refused again with a new token, raises
        :class:`EtcdAccessError`.
        """
        if not self._channels:
            raise RuntimeError("Store is not connected")
        index = self._current
        stub = rpc.WatchStub(self._channels[index])
        start = self.prefix.encode()
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=start,
                range_end=_range_end(start),
                start_revision=start_revision,
                progress_notify=True,
            )
        )

        async def requests() -> AsyncIterator[Any]:
            yield create
            await asyncio.Event().wait()  # keep the stream open until cancelled

        stale: str | None = None
        delivered = False
        for attempt in range(2):
            deadline = time.monotonic() + self._timeout()[0]
            token = await self._stream_token(index, stale, deadline, "watch")
            call = stub.Watch(requests(), metadata=self._token_metadata(token))
            try:
                async with contextlib.aclosing(self._watch_responses(call)) as responses:
                    async for revision, batch in responses:
                        delivered = True
                        yield revision, batch
            except _TokenRejectedError as exc:
                if token is None or attempt > 0:
                    raise self._refused("watch", exc.code, exc.reason) from None
                if delivered:
                    # Created again from start_revision, it would deliver those again:
                    # the caller resumes from what it has.
                    raise UnavailableError(
                        self._unreachable("the watch's token was refused; log in again")
                    ) from None
                stale = token
                continue
            except grpc.aio.AioRpcError as exc:
                self._rotate(index)
                raise UnavailableError(self._unreachable(f"watch broke: {exc.details()}")) from None
            finally:
                call.cancel()
            raise UnavailableError(self._unreachable("the watch stream ended"))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stream_token(
        self, index: int, stale: str | None, deadline: float, what: str
    ) -> str | None:
        """The token for a new stream (renewed if ``stale``), errors as the streams raise them."""
        try:
            if stale is None:
                return await self._token(index, deadline)
            return await self._renew_token(index, stale, deadline)
        except grpc.aio.AioRpcError as exc:
            self._rotate(index)
            raise UnavailableError(
                self._unreachable(f"{what}: authenticating: {exc.details()}")
            ) from None
        except TimeoutError:
            raise UnavailableError(
                self._unreachable(f"{what}: no answer while authenticating")
            ) from None

    async def _watch_responses(
        self, call: Any
    ) -> AsyncGenerator[tuple[int, list[WatchEvent]], None]:
        """A watch stream's responses as ``(revision, events)``, as :meth:`watch` yields them.

        Raises:
            _TokenRejectedError: etcd cancelled the watch over its token or the user's
                permissions, before any event.
        """
        async for response in call:
            if response.compact_revision:
                raise CompactedError(int(response.compact_revision))
            if response.canceled:
                # etcd gives the gRPC error as text: "rpc error: code = Unauthenticated
                # desc = etcdserver: invalid auth token" (3.4). etcd 3.5 says "permission
                # denied" for a token it no longer knows as for a user without the right,
                # so a refusal is a possibly dead token: the caller renews it once, and
                # only a refusal of the new token is the user's permissions.
                reason = str(response.cancel_reason)
                if "permission denied" in reason:
                    raise _TokenRejectedError(grpc.StatusCode.PERMISSION_DENIED, reason)
                if "Unauthenticated" in reason or any(t in reason for t in _TOKEN_REJECTED):
                    raise _TokenRejectedError(grpc.StatusCode.UNAUTHENTICATED, reason)
                raise UnavailableError(f"etcd cancelled the watch: {reason}")
            self._set_etcd_ok(True)
            if not response.events:
                if not response.created:
                    yield int(response.header.revision), []
                continue
            batch: list[WatchEvent] = []
            revision = 0
            for event in response.events:
                kv = event.kv
                if kv.mod_revision != revision and batch:
                    yield revision, batch
                    batch = []
                revision = int(kv.mod_revision)
                batch.append(
                    WatchEvent(
                        path=kv.key.decode(errors="replace")[len(self.prefix) :],
                        value=None if event.type == rpc.Event.DELETE else bytes(kv.value),
                        mod_revision=revision,
                    )
                )
            if batch:
                yield revision, batch

    async def read_state(self) -> tuple[list[tuple[str, Any, int]], int]:
        """Every flag, shedding level and pin (validated; bad records skipped), and the revision.

        Three ranges read at one revision (not the whole prefix: the audit trail and
        bundles would make it large).
        """
        out = []
        revision = 0
        for path in ("flags/", "shedding/", "pins/"):
            start = self._abs(path)
            request = rpc.RangeRequest(key=start, range_end=_range_end(start), revision=revision)
            response = await self._call("range", "Range", request, idempotent=True)
            revision = revision or int(response.header.revision)
            for kv in response.kvs:
                rel = kv.key.decode(errors="replace")[len(self.prefix) :]
                key = self._key_for_path(rel)
                if key is None:
                    continue
                record, _valid = await self._decode(key, kv.value, kv.mod_revision)
                if record is not None:
                    out.append((rel, record, int(kv.mod_revision)))
        return out, revision

    async def decode_event(self, event: WatchEvent) -> tuple[str, Any] | None:
        """A watched change as (kind, record or None for a deletion); None if not agents' business.

        A record that does not parse gives the key's last good record, so agents
        only ever receive validated records.
        """
        if not event.path.startswith(("flags/", "shedding/", "pins/")):
            return None
        key = self._key_for_path(event.path)
        if key is None:
            return None
        if event.value is None:
            self._last_good.pop(key.path, None)
            return key.kind, None
        record, valid = await self._decode(key, event.value, event.mod_revision)
        if not valid:
            return None  # keep serving what agents have
        return key.kind, record

    def decode_audit(self, event: WatchEvent) -> AuditEntry | None:
        """A watched audit record (None, logged and counted, when it does not parse)."""
        if event.value is None:
            return None
        try:
            return AuditEntry.from_record(model.decode_record(event.value), event.mod_revision)
        except (RecordError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._metrics.invalid_records.labels("audit").inc()
            log.error("record_invalid", key=self.prefix + event.path, error=str(exc))
            return None

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        response = await self._call(
            "lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl), lease=True
        )
        return int(response.ID)

    async def keep_lease_alive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its remaining TTL (0: it expired)."""
        if not self._channels:
            raise RuntimeError("Store is not connected")
        index = self._current
        stub = self._leases[index]
        deadline = time.monotonic() + self._timeout()[0]

        async def one() -> AsyncIterator[Any]:
            yield rpc.LeaseKeepAliveRequest(ID=lease_id)

        stale: str | None = None
        for attempt in range(2):
            token = await self._stream_token(index, stale, deadline, "lease keep-alive")
            call = stub.LeaseKeepAlive(
                one(),
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=self._token_metadata(token),
            )
            try:
                async for response in call:
                    return int(response.TTL)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), str(exc.details())
                if _token_rejected(code, details) and token is not None and attempt == 0:
                    stale = token
                    continue
                if code is grpc.StatusCode.PERMISSION_DENIED or _token_rejected(code, details):
                    raise self._refused("lease keep-alive", code, details) from None
                self._rotate(index)
                raise UnavailableError(self._unreachable(f"lease keep-alive: {details}")) from None
            finally:
                call.cancel()
            return 0
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def put_op(key: str, value: bytes, *, lease: int = 0) -> Any:
        """A put of an absolute key, for :meth:`txn_raw`."""
        return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease))

    @staticmethod
    def delete_op(key: str) -> Any:
        """A delete of an absolute key, for :meth:`txn_raw`."""
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))

    async def txn_raw(self, ops: Sequence[Any]) -> int:
        """Several puts/deletes of absolute keys in one transaction; returns the revision."""
        response = await self._txn([], list(ops))
        return int(response.header.revision)

    async def put_raw(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Put an absolute key (outside the record layout: presence); returns the revision."""
        response = await self._call(
            "put", "Put", rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        )
        return int(response.header.revision)

    async def get_range_raw(self, start: str, end: str) -> list[tuple[str, bytes]]:
        """Every (key, value) with an absolute key in [start, end)."""
        response = await self._range(start.encode(), end.encode())
        return [(kv.key.decode(errors="replace"), bytes(kv.value)) for kv in response.kvs]

    async def get_prefix_raw(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every (key, value) under an absolute prefix."""
        start = prefix.encode()
        response = await self._range(start, _range_end(start))
        return [(kv.key.decode(errors="replace"), bytes(kv.value)) for kv in response.kvs]

    async def count_prefix_raw(self, prefix: str) -> int:
        """How many keys there are under an absolute prefix."""
        start = prefix.encode()
        return int((await self._range(start, _range_end(start), count_only=True)).count)

    async def delete_prefix_raw(self, prefix: str) -> int:
        """Delete every key under an absolute prefix; returns how many."""
        start = prefix.encode()
        response = await self._call(
            "delete", "DeleteRange", rpc.DeleteRangeRequest(key=start, range_end=_range_end(start))
        )
        return int(response.deleted)

    # -- keys --------------------------------------------------------------

    def _abs(self, path: str) -> bytes:
        return (self.prefix + path).encode()

    def _flag_key(self, scope: str, name: str) -> _Key:
        def parse(data: dict[str, Any]) -> Flag:
            flag = Flag.from_record(data)
            if (flag.scope, flag.name) != (scope, name):
                raise RecordError(f"record names {flag.scope}/{flag.name}, not {scope}/{name}")
            return flag

        return _Key(f"flags/{scope}/{name}", "flag", scope, name, parse)

    def _shedding_key(self, service: str) -> _Key:
        def parse(data: dict[str, Any]) -> Shedding:
            record = Shedding.from_record(data)
            if record.service != service:
                raise RecordError(f"record names service {record.service}, not {service}")
            return record

        return _Key(f"shedding/{service}", "shedding", service, "", parse)

    def _pin_key(self, service: str) -> _Key:
        def parse(data: dict[str, Any]) -> Pin:
            record = Pin.from_record(data)
            if record.service != service:
                raise RecordError(f"record names service {record.service}, not {service}")
            return record

        return _Key(f"pins/{service}", "pin", service, "", parse)

    def _known_good_key(self, service: str, version: str) -> _Key:
        def parse(data: dict[str, Any]) -> KnownGood:
            record = KnownGood.from_record(data)
            if (record.service, record.version) != (service, version):
                raise RecordError(
                    f"record names {record.service}/{record.version}, not {service}/{version}"
                )
            return record

        return _Key(f"known-good/{service}/{version}", "known_good", service, version, parse)

    def _key_for_path(self, path: str) -> _Key | None:
        """The key description for a relative path, or None for an unknown layout."""
        parts = path.split("/")
        try:
            if parts[0] == "flags" and len(parts) == 3:
                return self._flag_key(parts[1], parts[2])
            if parts[0] == "shedding" and len(parts) == 2:
                return self._shedding_key(parts[1])
            if parts[0] == "pins" and len(parts) == 2:
                return self._pin_key(parts[1])
            if parts[0] == "known-good" and len(parts) == 3:
                return self._known_good_key(parts[1], parts[2])
        except IndexError:
            return None
        return None

    # -- decoding with last-good fallback ------------------------------------

    async def _decode(self, key: _Key, raw: bytes, mod_revision: int) -> tuple[Any, bool]:
        """The record in ``raw`` and True; if it does not parse, the last good one and False."""
        try:
            record = key.parse(model.decode_record(raw))
        except (RecordError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._metrics.invalid_records.labels(key.kind).inc()
            if key.path not in self._last_good:
                self._last_good[key.path] = await self._recover_last_good(key)
            fallback = self._last_good[key.path]
            log.error(
                "record_invalid",
                key=self.prefix + key.path,
                mod_revision=mod_revision,
                error=str(exc),
                serving="last good record" if fallback is not None else "nothing (absent)",
            )
            return fallback, False
        self._last_good[key.path] = record
        return record, True

    async def _recover_last_good(self, key: _Key) -> Any:
        """The newest record the audit trail shows for ``key`` (None: absent or unknown).

        A replica that never saw the key's last good value (it restarted, or another
        replica wrote it) still must not serve a corrupted kill switch as absent.
        """
        target = self.prefix + key.path
        try:
            entries = await self._scan_audit(accept=lambda e: e.key == target, limit=1)
        except DeadlineExceededError:
            return None
        if not entries or entries[0].after is None:
            return None
        try:
            return key.parse(entries[0].after)
        except (RecordError, ValueError, TypeError, KeyError, AttributeError):
            return None

    async def _read(self, key: _Key) -> _Current:
        response = await self._range(self._abs(key.path))
        if not response.kvs:
            self._last_good.pop(key.path, None)
            current = _Current(None, 0)
        else:
            kv = response.kvs[0]
            record, valid = await self._decode(key, kv.value, kv.mod_revision)
            current = _Current(record, int(kv.mod_revision), None if valid else bytes(kv.value))
        self._know(key.path, current)
        return current

    async def _read_prefix(self, path_prefix: str) -> tuple[list[tuple[_Key, Any, int]], int]:
        start = self._abs(path_prefix)
        response = await self._range(start, _range_end(start))
        out: list[tuple[_Key, Any, int]] = []
        for kv in response.kvs:
            path = kv.key.decode(errors="replace")[len(self.prefix) :]
            key = self._key_for_path(path)
            if key is None:
                log.error("record_unexpected_key", key=kv.key.decode(errors="replace"))
                continue
            record, _valid = await self._decode(key, kv.value, kv.mod_revision)
            if record is not None:
                out.append((key, record, int(kv.mod_revision)))
        return out, int(response.header.revision)

    # -- the write path ------------------------------------------------------

    def _index_path(self, path: str, record: Any) -> str | None:
        """The expiry index entry of a record whose top layer is time-boxed."""
        expires = getattr(getattr(record, "meta", None), "expires_at", None)
        if expires is None:
            return None
        return f"expiries/{_ns(expires):020d}/{path}"

    def _record_ops(self, path: str, stored: _Current, new: Any) -> list[Any]:
        """The operations that replace ``stored`` by ``new`` (None: delete), index included."""
        target = self._abs(path)
        ops = [
            rpc.RequestOp(
                request_put=rpc.PutRequest(key=target, value=model.encode_record(new.to_record()))
            )
            if new is not None
            else rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=target))
        ]
        old_index = self._index_path(path, stored.record)
        new_index = self._index_path(path, new)
        if old_index != new_index:
            if old_index is not None:
                ops.append(
                    rpc.RequestOp(
                        request_delete_range=rpc.DeleteRangeRequest(key=self._abs(old_index))
                    )
                )
            if new_index is not None:
                index_value = model.encode_record(
                    {
                        "kind": "expiry",
                        "key": self.prefix + path,
                        "expires_at": model.format_time(new.meta.expires_at),
                    }
                )
                ops.append(
                    rpc.RequestOp(
                        request_put=rpc.PutRequest(key=self._abs(new_index), value=index_value)
                    )
                )
        return ops

    def _audit(
        self,
        key: _Key,
        decision: Decision,
        stored: _Current,
        opts: WriteOptions,
        now: datetime,
        bundle_id: str = "",
    ) -> AuditEntry:
        before: dict[str, Any] | None
        if stored.invalid is not None:
            before = {"invalid_record": stored.invalid.decode(errors="replace")[:4096]}
        else:
            before = stored.record.to_record() if stored.record is not None else None
        new = decision.new
        return AuditEntry(
            id=new_audit_id(now),
            time=now,
            actor=opts.actor,
            actor_authenticated=opts.actor_authenticated,
            action=decision.action,
            kind=key.kind,
            scope=key.scope,
            name=key.name,
            key=self.prefix + key.path,
            reason=opts.reason,
            incident=opts.incident,
            before=before,
            after=new.to_record() if new is not None else None,
            bundle_id=bundle_id,
            expires_at=new.meta.expires_at
            if new is not None and hasattr(new, "replaced")
            else None,
        )

    def _audit_op(self, entry: AuditEntry) -> Any:
        raw = model.encode_record(entry.to_record(), "audit record", limit=MAX_AUDIT_BYTES)
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=self._abs("audit/" + entry.id), value=raw)
        )

    @contextlib.asynccontextmanager
    async def _locked(self, paths: Sequence[str]) -> AsyncIterator[None]:
        """Writers of one key in this process take turns (in key order, so no deadlock).

        A burst of last-writer-wins writes then does not lose compare-and-set races
        to itself; races with other replicas are retried with jittered backoff.
        """
        locks = []
        for path in sorted(set(paths)):
            lock = self._key_locks.setdefault(path, _KeyLock())
            lock.users += 1
            locks.append((path, lock))
        acquired: list[_KeyLock] = []
        try:
            for _, lock in locks:
                await lock.lock.acquire()
                acquired.append(lock)
            yield
        finally:
            for lock in acquired:
                lock.lock.release()
            for path, lock in locks:
                lock.users -= 1
                if lock.users == 0:
                    self._key_locks.pop(path, None)

    async def write(self, plan: Plan, opts: WriteOptions) -> WriteOutcome[Any]:
        """Apply one key's write: decide on the key as known (read it if need be), and
        one compare-and-set transaction."""
        async with self._locked([plan.key.path]):
            known = self._known_for(plan.key, opts)
            contended = 0
            for _attempt in range(_MAX_CAS_ATTEMPTS + 1):
                if contended:
                    await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**contended)))  # noqa: S311 (jitter)
                outcome = await self._write_once(plan, opts, known)
                if outcome is not None:
                    return outcome
                if known is None:
                    contended += 1
                    if contended == _MAX_CAS_ATTEMPTS:
                        break
                # What this server knew was stale (another writer): read from now on,
                # at once the first time.
                known = None
        raise UnavailableError(
            f"{self.prefix + plan.key.path} is being changed by others too often: "
            f"gave up after {_MAX_CAS_ATTEMPTS} attempts; try again"
        )

    def _known_for(self, key: _Key, opts: WriteOptions) -> _Current | None:
        """The key as this server last saw it, where a write may start from that.

        Not for dry runs (they report, with no transaction to check what they read) nor
        for a caller's own compare-and-set (its revision is compared with etcd's)."""
        if opts.dry_run or opts.expected_mod_revision is not None:
            return None
        return self._known.get(key.path)

    def _know(self, path: str, current: _Current | None) -> None:
        if current is None or current.invalid is not None:
            self._known.pop(path, None)
            return
        if len(self._known) >= _KNOWN_MAX and path not in self._known:
            self._known.clear()
        self._known[path] = current

    async def _write_once(
        self, plan: Plan, opts: WriteOptions, known: _Current | None = None
    ) -> WriteOutcome[Any] | None:
        key = plan.key
        now = model.utcnow()
        stored = known
        decision: Decision | None = None
        if known is not None:
            # A refusal decided on what this server last saw (too many layers, say)
            # may not hold for what etcd has now: decide again on a read.
            with contextlib.suppress(ControlPlaneError):
                decision = plan.decide(known.record, now, opts)
        if decision is None or not decision.changed:
            # Only a successful transaction confirms what was known; "nothing to change"
            # is said on what etcd holds now.
            stored = await self._read(key)
            decision = plan.decide(stored.record, now, opts)
        assert stored is not None
        expected = opts.expected_mod_revision
        if expected is not None and expected != stored.mod_revision:
            raise ConflictError(self.prefix + key.path, expected, stored.mod_revision)
        if not opts.incident and decision.action.endswith(".clear") and stored.record is not None:
            # Clearing an incident's mitigation belongs to that incident's timeline.
            opts = replace(opts, incident=stored.record.meta.incident)
        if stored.invalid is not None and not decision.changed:
            # The bytes in etcd do not parse: write the record in force over them.
            decision = replace(
                decision, changed=True, summary=decision.summary + " (replaces an invalid record)"
            )
        hidden: tuple[str, ...] = ()
        if plan.overridden_flag:
            hidden = tuple(await self.services_overriding(plan.overridden_flag))
        base = {
            "dry_run": opts.dry_run,
            "previous": stored.record,
            "overridden_by": hidden,
            "summary": decision.summary,
            "key": self.prefix + key.path,
        }
        if not decision.changed:
            return WriteOutcome(
                changed=False, revision=0, mod_revision=stored.mod_revision,
                record=stored.record, **base,
            )  # fmt: skip
        ops = self._record_ops(key.path, stored, decision.new)
        audit = self._audit(key, decision, stored, opts, now)
        ops.append(self._audit_op(audit))
        if opts.dry_run:
            return WriteOutcome(
                changed=False, revision=0, mod_revision=stored.mod_revision,
                record=decision.new, restored=decision.restored, would_change=True, **base,
            )  # fmt: skip
        compare = self._unchanged_since(key.path, stored.mod_revision)
        response = await self._commit(compare, ops)
        if not response.succeeded:
            self._know(key.path, None)
            if expected is not None:
                now_stored = await self._read(key)
                raise ConflictError(self.prefix + key.path, expected, now_stored.mod_revision)
            return None
        revision = int(response.header.revision)
        self._remember(key.path, decision.new)
        self._know(key.path, _Current(decision.new, revision if decision.new is not None else 0))
        self._log_change(decision, audit, revision, opts)
        return WriteOutcome(
            changed=True, revision=revision,
            mod_revision=revision if decision.new is not None else 0,
            record=decision.new, restored=decision.restored, audit_id=audit.id, **base,
        )  # fmt: skip

    async def _commit(self, compare: Any, ops: list[Any]) -> Any:
        """One write's compare-and-set transaction, shared with others (group commit).

        With no transaction of ours at etcd, it goes at once, alone. Otherwise it
        waits for that one to return and goes with every write that came
        meanwhile (up to _BATCH_MAX_WRITES and _BATCH_MAX_BYTES), as one
        transaction: the writes then share a revision. Their keys differ (one
        writer per key in a process, ``_locked``). If a shared transaction fails
        a compare, each of its writes is made again on its own, which says whose
        compare failed. Under load this saves etcd and this server a call, a
        watch event and a raft entry per write; alone, it costs nothing.
        """
        if not self._committing:
            self._committing = True
            try:
                return await self._txn([compare], ops)
            finally:
                self._next_batch()
        size = compare.ByteSize() + sum(op.ByteSize() for op in ops)
        if size > _BATCH_MAX_BYTES:  # too big to share: alone, beside the others
            return await self._txn([compare], ops)
        timeout, caller = self._timeout()
        pending = _Pending(compare, ops, size)
        self._queued.append(pending)
        try:
            async with asyncio.timeout(timeout):
                response = await pending.done
        except TimeoutError:
            # As when a transaction of its own gets no answer in time: it may still
            # be applied (the outcome is unknown).
            if caller:
                raise DeadlineExceededError(
                    "the call's deadline ran out before etcd answered"
                ) from None
            raise UnavailableError(self._unreachable(f"no answer within {timeout:.2f}s")) from None
        finally:
            if not pending.done.done():
                pending.done.cancel()
        if response is _ALONE:
            return await self._txn([compare], ops)
        return response

    def _next_batch(self) -> None:
        """Send the queued writes' shared transaction, or say none is at etcd."""
        self._queued = [pending for pending in self._queued if not pending.done.done()]
        if not self._queued:
            self._committing = False
            return
        batch: list[_Pending] = []
        size = 0
        for pending in self._queued:
            if len(batch) == _BATCH_MAX_WRITES or size + pending.size > _BATCH_MAX_BYTES:
                break
            batch.append(pending)
            size += pending.size
        del self._queued[: len(batch)]
        task = asyncio.create_task(self._send_batch(batch), name="controlplane-store-batch")
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send_batch(self, batch: list[_Pending]) -> None:
        try:
            # Writers that gave up since (their deadline) are left out.
            batch = [pending for pending in batch if not pending.done.done()]
            if not batch:
                return
            # The etcd timeout, whoever waits: a writer with a shorter deadline stops
            # waiting by itself (DEADLINE_EXCEEDED) without failing the others, and only
            # etcd not answering within the timeout says it is unreachable.
            with self.budget(self.etcd_timeout):
                response = await self._txn(
                    [pending.compare for pending in batch],
                    [op for pending in batch for op in pending.ops],
                )
        except BaseException as exc:  # a cancel too: no writer may wait on for nothing
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(
                        _own_copy(exc)
                        if isinstance(exc, Exception)
                        else UnavailableError("the server is stopping")
                    )
            if not isinstance(exc, Exception):
                raise
        else:
            outcome = response if response.succeeded or len(batch) == 1 else _ALONE
            if len(batch) > 1:
                self._metrics.write_batch_size.observe(len(batch))
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_result(outcome)
        finally:
            self._next_batch()

    def _unchanged_since(self, path: str, mod_revision: int) -> Any:
        return rpc.Compare(
            key=self._abs(path),
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.MOD,
            mod_revision=mod_revision,
        )

    def _remember(self, path: str, record: Any) -> None:
        if record is not None:
            self._last_good[path] = record
        else:
            self._last_good.pop(path, None)

    def _log_change(
        self, decision: Decision, audit: AuditEntry, revision: int, opts: WriteOptions
    ) -> None:
        self._metrics.changes.labels(decision.action).inc()
        log.info(
            "change_written",
            action=decision.action,
            key=audit.key,
            revision=revision,
            actor=audit.actor,
            actor_authenticated=audit.actor_authenticated,
            reason=audit.reason,
            incident=audit.incident,
            summary=decision.summary,
            audit_id=audit.id,
            bundle_id=audit.bundle_id or None,
        )

    # -- expiry ------------------------------------------------------------------

    async def next_expiry(self) -> datetime | None:
        """When the earliest time-boxed change expires (None: none is)."""
        start = self._abs("expiries/")
        response = await self._range(start, _range_end(start), limit=1, keys_only=True)
        if not response.kvs:
            return None
        stamp = bytes(response.kvs[0].key)[len(start) :].split(b"/", 1)[0]
        if not stamp.isdigit():
            return model.utcnow()  # a bad entry: let expire_due remove it now
        return datetime.fromtimestamp(int(stamp) / 1e9, UTC)

    async def repair_expiry_index(self) -> int:
        """Recreate missing index entries of time-boxed records; return how many.

        A record written by hand, or an index key deleted, would otherwise never be
        restored by a server while agents switch on time by themselves.
        """
        rows, _ = await self.read_state()
        start = self._abs("expiries/")
        existing = {
            bytes(kv.key)
            for kv in (await self._range(start, _range_end(start), keys_only=True)).kvs
        }
        repaired = 0
        for path, record, mod in rows:
            index = self._index_path(path, record)
            if index is None or self._abs(index) in existing:
                continue
            value = model.encode_record(
                {"kind": "expiry", "key": self.prefix + path,
                 "expires_at": model.format_time(record.meta.expires_at)}
            )  # fmt: skip
            await self._txn(
                [self._unchanged_since(path, mod)],
                [rpc.RequestOp(request_put=rpc.PutRequest(key=self._abs(index), value=value))],
            )
            log.warning("expiry_index_repaired", key=self.prefix + path)
            repaired += 1
        return repaired

    async def expire_due(self, *, batch: int = 64) -> int:
        """Restore what every expired change replaced; return how many were restored.

        Each restore is one transaction with one audit record, compare-and-set on
        the key's mod revision, so that of several replicas exactly one writes it.
        """
        start = self._abs("expiries/")
        now = model.utcnow()
        end = self._abs(f"expiries/{_ns(now) + 1:020d}")
        response = await self._range(start, end, limit=batch, keys_only=True)
        restored = 0
        for kv in response.kvs:
            index_key = bytes(kv.key)
            stamp, _, path = index_key[len(start) :].decode(errors="replace").partition("/")
            key = self._key_for_path(path)
            if key is None or not stamp.isdigit():
                log.error("expiry_index_invalid", key=index_key.decode(errors="replace"))
                await self._txn([], [self._delete_op(index_key)])
                continue
            async with self._locked([key.path]):
                restored += await self._expire_one(key, index_key, int(stamp))
        return restored

    def _delete_op(self, key: bytes) -> Any:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))

    async def _expire_one(self, key: _Key, index_key: bytes, stamp: int) -> int:
        stored = await self._read(key)
        record = stored.record
        top = getattr(getattr(record, "meta", None), "expires_at", None)
        if top is None or _ns(top) != stamp:
            # The index entry outlived its record (rewritten, cleared, corrupted).
            await self._txn(
                [self._unchanged_since(key.path, stored.mod_revision)],
                [self._delete_op(index_key)],
            )
            return 0
        now = model.utcnow()
        label = f"{key.scope}: {key.kind.replace('_', '-')} {key.name}".rstrip()
        decision = decide_expiry(record, now, label)
        if not decision.changed:
            return 0
        opts = WriteOptions(
            reason=f"expiry of a time-boxed change: {record.meta.reason}",
            incident=record.meta.incident,
            actor=EXPIRY_ACTOR,
            actor_authenticated=True,
        )
        ops = self._record_ops(key.path, stored, decision.new)
        if self._index_path(key.path, record) is None:  # pragma: no cover - guarded above
            ops.append(self._delete_op(index_key))
        audit = self._audit(key, decision, stored, opts, now, bundle_id=record.meta.bundle_id)
        ops.append(self._audit_op(audit))
        response = await self._txn([self._unchanged_since(key.path, stored.mod_revision)], ops)
        if not response.succeeded:
            return 0  # another replica restored it, or a new write came first
        self._remember(key.path, decision.new)
        self._log_change(decision, audit, int(response.header.revision), opts)
        return 1

    # -- flags -----------------------------------------------------------------

    def plan_set_flag(self, scope: str, name: str, value: FlagValue) -> Plan:
        return Plan(
            self._flag_key(scope, name),
            lambda cur, now, o: semantics.decide_set_flag(cur, now, scope, name, value, o),
            overridden_flag=name if scope == GLOBAL_SCOPE else "",
        )

    def plan_clear_flag(self, scope: str, name: str, *, all_layers: bool = False) -> Plan:
        return Plan(
            self._flag_key(scope, name),
            lambda cur, now, o: semantics.decide_clear_flag(cur, now, name, all_layers=all_layers),
            overridden_flag=name if scope == GLOBAL_SCOPE else "",
        )

    async def set_flag(
        self, scope: str, name: str, value: FlagValue, opts: WriteOptions
    ) -> WriteOutcome[Flag]:
        """Set a flag for a scope (``global`` or a service)."""
        return await self.write(self.plan_set_flag(scope, name, value), opts)

    async def clear_flag(
        self, scope: str, name: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Flag]:
        """Clear a flag; a time-boxed layer restores what it replaced unless ``all_layers``."""
        return await self.write(self.plan_clear_flag(scope, name, all_layers=all_layers), opts)

    async def get_flag(self, scope: str, name: str) -> Stored[Flag] | None:
        """The flag of exactly this scope."""
        return self._stored(await self._read(self._flag_key(scope, name)))

    @staticmethod
    def _stored(current: _Current) -> Stored[Any] | None:
        if current.record is None:
            return None
        return Stored(current.record, current.mod_revision)

    async def get_effective_flag(self, service: str, name: str) -> Stored[Flag] | None:
        """The flag a service sees: its own entry, else the global one."""
        own = await self.get_flag(service, name)
        return own if own is not None else await self.get_flag(GLOBAL_SCOPE, name)

    async def list_flags(
        self, scope: str = "", *, effective: bool = False
    ) -> tuple[list[Stored[Flag]], int]:
        """Flags of one scope (all when empty); with ``effective``, what a service sees."""
        if not scope:
            rows, revision = await self._read_prefix("flags/")
            return [Stored(r, m) for _, r, m in rows], revision
        rows, revision = await self._read_prefix(f"flags/{scope}/")
        flags = [Stored(r, m) for _, r, m in rows]
        if effective and scope != GLOBAL_SCOPE:
            own = {f.record.name for f in flags}
            global_rows, revision = await self._read_prefix(f"flags/{GLOBAL_SCOPE}/")
            flags += [Stored(r, m) for _, r, m in global_rows if r.name not in own]
            flags.sort(key=lambda f: f.record.name)
        return flags, revision

    async def services_overriding(self, name: str) -> list[str]:
        """Services with an entry of their own for flag ``name`` (hiding the global one)."""
        start = self._abs("flags/")
        response = await self._range(start, _range_end(start), keys_only=True)
        services = []
        for kv in response.kvs:
            parts = kv.key.decode(errors="replace")[len(self.prefix) :].split("/")
            if len(parts) == 3 and parts[2] == name and parts[1] != GLOBAL_SCOPE:
                services.append(parts[1])
        return sorted(services)

    # -- shedding ----------------------------------------------------------------

    def plan_set_shedding(self, service: str, tier: Tier, percent: float) -> Plan:
        return Plan(
            self._shedding_key(service),
            lambda cur, now, o: semantics.decide_set_shedding(cur, now, service, tier, percent, o),
        )

    def plan_clear_shedding(self, service: str, *, all_layers: bool = False) -> Plan:
        return Plan(
            self._shedding_key(service),
            lambda cur, now, o: semantics.decide_clear_shedding(cur, now, all_layers=all_layers),
        )

    async def set_shedding(
        self, service: str, tier: Tier, percent: float, opts: WriteOptions
    ) -> WriteOutcome[Shedding]:
        """Set a service's shedding level."""
        return await self.write(self.plan_set_shedding(service, tier, percent), opts)

    async def clear_shedding(
        self, service: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Shedding]:
        """Stop shedding for a service (or restore the level a time-boxed one replaced)."""
        return await self.write(self.plan_clear_shedding(service, all_layers=all_layers), opts)

    async def get_shedding(self, service: str) -> Stored[Shedding] | None:
        """A service's shedding level."""
        return self._stored(await self._read(self._shedding_key(service)))

    async def list_shedding(self) -> tuple[list[Stored[Shedding]], int]:
        """Every service's shedding level."""
        rows, revision = await self._read_prefix("shedding/")
        return [Stored(r, m) for _, r, m in rows], revision

    # -- pins and known-good -------------------------------------------------------

    def plan_pin(self, service: str, version: str, *, action: str = "pin.set") -> Plan:
        return Plan(
            self._pin_key(service),
            lambda cur, now, o: semantics.decide_pin(cur, now, service, version, o, action=action),
        )

    def plan_unpin(self, service: str, *, all_layers: bool = False) -> Plan:
        return Plan(
            self._pin_key(service),
            lambda cur, now, o: semantics.decide_unpin(cur, now, all_layers=all_layers),
        )

    async def pin(
        self, service: str, version: str, opts: WriteOptions, *, action: str = "pin.set"
    ) -> WriteOutcome[Pin]:
        """Pin a service to a version; the pin records the one it replaced."""
        return await self.write(self.plan_pin(service, version, action=action), opts)

    async def unpin(
        self, service: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Pin]:
        """Remove a service's pin and say what it was."""
        return await self.write(self.plan_unpin(service, all_layers=all_layers), opts)

    async def get_pin(self, service: str) -> Stored[Pin] | None:
        """A service's pin."""
        return self._stored(await self._read(self._pin_key(service)))

    async def list_pins(self) -> tuple[list[Stored[Pin]], int]:
        """Every service's pin."""
        rows, revision = await self._read_prefix("pins/")
        return [Stored(r, m) for _, r, m in rows], revision

    async def mark_known_good(
        self, service: str, version: str, opts: WriteOptions
    ) -> WriteOutcome[KnownGood]:
        """Mark a version of a service known-good (a rollback target)."""
        plan = Plan(
            self._known_good_key(service, version),
            lambda cur, now, o: semantics.decide_mark(cur, now, service, version, o),
        )
        return await self.write(plan, opts)

    async def unmark_known_good(
        self, service: str, version: str, opts: WriteOptions
    ) -> WriteOutcome[KnownGood]:
        """Withdraw a known-good mark ("mark as bad")."""
        plan = Plan(
            self._known_good_key(service, version),
            lambda cur, now, o: semantics.decide_unmark(cur, now, version),
        )
        return await self.write(plan, opts)

    async def list_known_good(self, service: str) -> list[Stored[KnownGood]]:
        """A service's known-good versions, most recently marked first."""
        rows, _ = await self._read_prefix(f"known-good/{service}/")
        marks = [Stored(r, m) for _, r, m in rows]
        marks.sort(key=lambda s: (s.record.meta.set_at, s.mod_revision), reverse=True)
        return marks

    # -- bundles -----------------------------------------------------------------

    async def apply_bundle(
        self, name: str, plans: Sequence[Plan], changes: Sequence[dict[str, Any]],
        opts: WriteOptions,
    ) -> BundleOutcome:  # fmt: skip
        """Apply several changes in one transaction, recorded under ``bundles/<id>``.

        A bundle identical (same name, same changes) to one that is applied, not
        reverted and still fully in force is "unchanged" and answers that bundle.
        """
        paths = [plan.key.path for plan in plans]
        _check_bundle_shape(paths)
        fingerprint = _fingerprint(name, changes)
        async with self._locked(paths):
            for attempt in range(_MAX_CAS_ATTEMPTS):
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311 (jitter)
                # A time-boxed bundle applied again moves its expiry: not a no-op.
                twin = None if opts.expires_at else await self._applied_twin(fingerprint)
                if twin is not None:
                    return BundleOutcome(
                        changed=False, dry_run=opts.dry_run, revision=0, view=twin,
                        summary=f"bundle {name} is already applied as {twin.bundle.id}",
                    )  # fmt: skip
                outcome = await self._apply_bundle_once(name, plans, changes, fingerprint, opts)
                if outcome is not None:
                    return outcome
        raise UnavailableError(
            f"bundle {name}: its keys are being changed by others too often; try again"
        )

    async def _apply_bundle_once(
        self, name: str, plans: Sequence[Plan], changes: Sequence[dict[str, Any]],
        fingerprint: str, opts: WriteOptions,
    ) -> BundleOutcome | None:  # fmt: skip
        now = model.utcnow()
        bundle_id = new_bundle_id(now, name)
        bopts = replace(opts, bundle_id=bundle_id)
        currents = [await self._read(plan.key) for plan in plans]
        decisions = []
        for plan, current in zip(plans, currents, strict=True):
            decision = plan.decide(current.record, now, bopts)
            if current.invalid is not None and not decision.changed:
                decision = replace(decision, changed=True)
            decisions.append(decision)
        if not any(d.changed for d in decisions):
            return BundleOutcome(
                changed=False, dry_run=opts.dry_run, revision=0, view=None,
                summary=f"bundle {name}: every change is already in force",
            )  # fmt: skip
        ops: list[Any] = []
        entries = []
        audits = []
        for plan, current, decision in zip(plans, currents, decisions, strict=True):
            if not decision.changed:
                continue
            entries.append(
                BundleEntry(
                    path=plan.key.path,
                    kind=plan.key.kind,
                    before=current.record.to_record() if current.record is not None else None,
                    after=decision.new.to_record() if decision.new is not None else None,
                )
            )
            ops += self._record_ops(plan.key.path, current, decision.new)
            audit = self._audit(plan.key, decision, current, bopts, now, bundle_id=bundle_id)
            audits.append((decision, audit))
            ops.append(self._audit_op(audit))
        bundle = Bundle(
            id=bundle_id,
            name=name,
            changes=tuple(changes),
            meta=Meta.from_options(bopts, now),
            entries=tuple(entries),
            fingerprint=fingerprint,
        )
        ops.append(self._bundle_op(bundle))
        ops.append(
            rpc.RequestOp(
                request_put=rpc.PutRequest(
                    key=self._abs(f"bundle-fingerprints/{fingerprint}"), value=bundle_id.encode()
                )
            )
        )
        _check_txn_size(ops)
        # Its revert writes each old record twice (the key and the audit) and the
        # bundle record again: refuse now a bundle that could not be reverted.
        revert_bytes = sum(
            2 * len(json.dumps(e.before or {})) + len(json.dumps(e.after or {})) for e in entries
        ) + len(json.dumps(bundle.to_record()))
        if revert_bytes > _MAX_TXN_BYTES:
            raise InvalidArgumentError(
                "changes",
                f"reverting this bundle would take a {revert_bytes} byte transaction, over the "
                f"{_MAX_TXN_BYTES} byte budget under etcd's 1.5 MiB limit: split it",
            )
        summary = f"bundle {name}: " + "; ".join(
            f"{p.key.scope}: {d.summary}"
            for p, d in zip(plans, decisions, strict=True)
            if d.changed
        )
        if opts.dry_run:
            view = BundleView(bundle, model.BundleState.APPLIED, 0, ())
            return BundleOutcome(
                changed=False, dry_run=True, revision=0, view=view, summary=summary,
                would_change=True,
            )  # fmt: skip
        compares = [
            self._unchanged_since(plan.key.path, current.mod_revision)
            for plan, current in zip(plans, currents, strict=True)
        ]
        compares.append(self._unchanged_since(f"bundles/{bundle_id}", 0))
        response = await self._txn(compares, ops)
        if not response.succeeded:
            return None
        revision = int(response.header.revision)
        for entry, (decision, audit) in zip(entries, audits, strict=True):
            self._remember(entry.path, decision.new)
            self._log_change(decision, audit, revision, bopts)
        view = BundleView(bundle, model.BundleState.APPLIED, revision, ())
        return BundleOutcome(
            changed=True, dry_run=False, revision=revision, view=view, summary=summary,
            audit_ids=tuple(a.id for _, a in audits),
        )  # fmt: skip

    def _bundle_op(self, bundle: Bundle) -> Any:
        raw = model.encode_record(bundle.to_record(), "changes", limit=_MAX_BUNDLE_RECORD_BYTES)
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=self._abs(f"bundles/{bundle.id}"), value=raw)
        )

    async def _applied_twin(self, fingerprint: str) -> BundleView | None:
        """The bundle with this fingerprint, if it is applied and fully in force."""
        response = await self._range(self._abs(f"bundle-fingerprints/{fingerprint}"))
        if not response.kvs:
            return None
        view = await self.get_bundle(response.kvs[0].value.decode(errors="replace"))
        if view is not None and view.state is model.BundleState.APPLIED:
            return view
        return None

    async def _read_bundle(self, bundle_id: str) -> tuple[Bundle, Any] | None:
        response = await self._range(self._abs(f"bundles/{bundle_id}"))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        try:
            return Bundle.from_record(model.decode_record(kv.value)), kv
        except (RecordError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._metrics.invalid_records.labels("bundle").inc()
            log.error("record_invalid", key=self.prefix + f"bundles/{bundle_id}", error=str(exc))
            raise FailedPreconditionError(
                f"bundle {bundle_id}: its record in etcd does not parse ({exc}); "
                "revert its changes one by one"
            ) from None

    async def _tops(self) -> dict[str, tuple[Any, int]]:
        """Every mitigation record in force (pruned at now) with its mod revision, by path."""
        rows, _ = await self.read_state()
        now = model.utcnow()
        return {path: (semantics.prune_expired(rec, now), mod) for path, rec, mod in rows}

    @staticmethod
    def _holds(bundle: Bundle, entry: BundleEntry, top: Any) -> bool:
        """Whether a key still holds what the bundle put there (or still lacks what it cleared).

        Content, not mod revisions: a layer of someone else's that came and expired
        leaves the bundle's value in force, and that is not a change since.
        """
        if entry.after is None:
            return top is None
        meta = entry.after.get("meta") or {}
        return (
            top is not None
            and top.meta.bundle_id == (meta.get("bundle_id") or "")
            and model.format_time(top.meta.set_at) == meta.get("set_at")
        )

    def _view(
        self, bundle: Bundle, applied: int, tops: dict[str, tuple[Any, int]], now: datetime
    ) -> BundleView:
        overridden = tuple(
            e.path
            for e in bundle.entries
            if not self._holds(bundle, e, tops.get(e.path, (None, 0))[0])
        )
        expired = bundle.meta.expires_at is not None and bundle.meta.expires_at <= now
        if bundle.reverted is not None:
            state = model.BundleState.REVERTED
        elif expired and len(overridden) == len(bundle.entries):
            state = model.BundleState.EXPIRED
        elif overridden:
            state = model.BundleState.PARTIALLY_OVERRIDDEN
        else:
            state = model.BundleState.APPLIED
        if state is not model.BundleState.PARTIALLY_OVERRIDDEN:
            overridden = ()
        return BundleView(bundle, state, applied, overridden)

    async def get_bundle(self, bundle_id: str) -> BundleView | None:
        """A bundle and its state (applied, reverted, expired, partially overridden)."""
        found = await self._read_bundle(bundle_id)
        if found is None:
            return None
        bundle, kv = found
        return self._view(bundle, int(kv.create_revision), await self._tops(), model.utcnow())

    async def list_bundles(self, limit: int = 0) -> list[BundleView]:
        """Bundles, newest first (only the newest ``limit`` are read when given)."""
        start = self._abs("bundles/")
        keys = await self._range(start, _range_end(start), keys_only=True)
        wanted = [bytes(kv.key) for kv in keys.kvs]
        wanted.reverse()
        if limit:
            wanted = wanted[:limit]
        tops = await self._tops()
        now = model.utcnow()
        views = []
        for key in wanted:
            bundle_id = key.decode(errors="replace").rsplit("/", 1)[-1]
            try:
                found = await self._read_bundle(bundle_id)
            except FailedPreconditionError:
                continue
            if found is not None:
                views.append(self._view(found[0], int(found[1].create_revision), tops, now))
        return views

    async def revert_bundle(
        self, bundle_id: str, opts: WriteOptions, *, force: bool
    ) -> BundleOutcome:
        """Restore what each change of a bundle replaced, in one transaction.

        Refused with :class:`BundleConflictError` when any of its keys changed since,
        unless ``force``: then the newer values are overwritten and the audit says so.
        """
        found = await self._read_bundle(bundle_id)
        if found is None:
            raise NotFoundError(f"no bundle {bundle_id}")
        paths = [e.path for e in found[0].entries]
        async with self._locked(paths):
            for _attempt in range(_MAX_CAS_ATTEMPTS):
                outcome = await self._revert_once(bundle_id, opts, force=force)
                if outcome is not None:
                    return outcome
        raise UnavailableError(f"bundle {bundle_id}: its keys keep changing; try again")

    async def _revert_once(
        self, bundle_id: str, opts: WriteOptions, *, force: bool
    ) -> BundleOutcome | None:
        found = await self._read_bundle(bundle_id)
        if found is None:
            raise NotFoundError(f"no bundle {bundle_id}")
        bundle, bundle_kv = found
        now = model.utcnow()
        applied = int(bundle_kv.create_revision)
        if bundle.reverted is not None:
            view = self._view(bundle, applied, {}, now)
            return BundleOutcome(
                changed=False, dry_run=opts.dry_run, revision=0, view=view,
                summary=f"bundle {bundle_id} was already reverted "
                f"({model.format_time(bundle.reverted.set_at)}, by {bundle.reverted.actor})",
            )  # fmt: skip
        if bundle.meta.expires_at is not None and bundle.meta.expires_at <= now and not force:
            raise FailedPreconditionError(
                f"bundle {bundle_id} expired at {model.format_time(bundle.meta.expires_at)}: "
                "its changes no longer apply (unless someone made them permanent since); "
                "revert with force to restore what it replaced anyway"
            )
        if not opts.incident:
            opts = replace(opts, incident=bundle.meta.incident)  # the revert is the incident's
        keys = []
        for entry in bundle.entries:
            key = self._key_for_path(entry.path)
            if key is None:
                raise FailedPreconditionError(f"bundle {bundle_id}: unknown key {entry.path}")
            keys.append(key)
        currents = [await self._read(key) for key in keys]
        changed_since = [
            (entry.path, current.mod_revision)
            for entry, current in zip(bundle.entries, currents, strict=True)
            if not self._holds(bundle, entry, semantics.prune_expired(current.record, now))
        ]
        if changed_since and not force:
            raise BundleConflictError(bundle_id, changed_since)
        overwritten = {path for path, _ in changed_since}
        ops: list[Any] = []
        audits = []
        for entry, key, current in zip(bundle.entries, keys, currents, strict=True):
            before = key.parse(entry.before) if entry.before is not None else None
            restored = semantics.prune_expired(before, now)
            label = f"{key.kind.replace('_', ' ')} {key.name}".strip()
            summary = (
                f"{label} back to {semantics.describe_record(restored)}"
                if restored is not None
                else f"{label} removed"
            )
            decision = Decision(restored, f"{key.kind}.revert", summary, restored=restored)
            reason = opts.reason
            if entry.path in overwritten:
                reason += " (forced: overwrote a change made after the bundle)"
            entry_opts = replace(opts, reason=reason)
            ops += self._record_ops(entry.path, current, restored)
            audit = self._audit(key, decision, current, entry_opts, now, bundle_id=bundle_id)
            audits.append((entry, decision, audit, entry_opts))
            ops.append(self._audit_op(audit))
        reverted = replace(
            bundle, reverted=Meta.from_options(replace(opts, bundle_id=bundle_id), now)
        )
        ops.append(self._bundle_op(reverted))
        _check_txn_size(ops)
        summary = f"bundle {bundle.name} reverted: " + "; ".join(
            f"{k.scope}: {d.summary}" for (_, d, _, _), k in zip(audits, keys, strict=True)
        )
        if opts.dry_run:
            view = BundleView(reverted, model.BundleState.REVERTED, applied, ())
            return BundleOutcome(
                changed=False, dry_run=True, revision=0, view=view, summary=summary,
                would_change=True, overwritten=tuple(sorted(overwritten)),
            )  # fmt: skip
        compares = [
            self._unchanged_since(key.path, current.mod_revision)
            for key, current in zip(keys, currents, strict=True)
        ]
        compares.append(self._unchanged_since(f"bundles/{bundle_id}", int(bundle_kv.mod_revision)))
        response = await self._txn(compares, ops)
        if not response.succeeded:
            return None
        revision = int(response.header.revision)
        for entry, decision, audit, entry_opts in audits:
            self._remember(entry.path, decision.new)
            self._log_change(decision, audit, revision, entry_opts)
        view = BundleView(reverted, model.BundleState.REVERTED, applied, ())
        return BundleOutcome(
            changed=True, dry_run=False, revision=revision, view=view, summary=summary,
            overwritten=tuple(sorted(overwritten)), audit_ids=tuple(a.id for _, _, a, _ in audits),
        )  # fmt: skip

    # -- audit history and retention -------------------------------------------------

    async def list_history(
        self,
        *,
        service: str = "",
        incident: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Audit entries, newest first, filtered (a service's includes global changes)."""

        def accept(entry: AuditEntry) -> bool:
            if service and entry.scope not in (service, GLOBAL_SCOPE):
                return False
            return not incident or entry.incident == incident

        return await self._scan_audit(accept=accept, since=since, until=until, limit=limit)

    async def _scan_audit(
        self,
        *,
        accept: Callable[[AuditEntry], bool],
        limit: int,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AuditEntry]:
        """Audit entries newest first, walking back through time windows.

        etcd applies a range's limit only in key order (ascending), so the walk
        reads windows of time ascending and reverses them; windows shrink where
        records are dense and grow where they are sparse.
        """
        base = self._abs("audit/")
        lower = self._abs(f"audit/{_ns(since):020d}") if since else base
        upper = self._abs(f"audit/{_ns(until):020d}~") if until else _range_end(base)
        oldest = await self._range(lower, upper, limit=1, keys_only=True)
        if not oldest.kvs:
            return []
        lower = bytes(oldest.kvs[0].key)
        hi_key = upper
        hi_ns = _ns(until) if until else _ns(model.utcnow()) + 3_600_000_000_000
        window = 3_600_000_000_000  # 1 h
        entries: list[AuditEntry] = []
        while len(entries) < limit:
            lo_ns = max(hi_ns - window, 0)
            lo_key = max(lower, self._abs(f"audit/{lo_ns:020d}"))
            count = int((await self._range(lo_key, hi_key, count_only=True)).count)
            if count > 4 * _HISTORY_PAGE and window > 1_000_000:
                window //= 4
                continue
            page = await self._read_audit_window(lo_key, hi_key)
            for entry in reversed(page):
                if accept(entry):
                    entries.append(entry)
                    if len(entries) >= limit:
                        break
            if lo_key <= lower:
                break
            hi_key, hi_ns = lo_key, lo_ns
            if count < _HISTORY_PAGE:
                window *= 4
        return entries

    async def _read_audit_window(self, lo_key: bytes, hi_key: bytes) -> list[AuditEntry]:
        entries = []
        start = lo_key
        while start < hi_key:
            response = await self._range(start, hi_key, limit=_HISTORY_PAGE)
            for kv in response.kvs:
                try:
                    data = model.decode_record(kv.value)
                    entries.append(AuditEntry.from_record(data, kv.mod_revision))
                except (RecordError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    self._metrics.invalid_records.labels("audit").inc()
                    log.error("record_invalid", key=kv.key.decode(errors="replace"), error=str(exc))
            if not response.more or not response.kvs:
                break
            start = bytes(response.kvs[-1].key) + b"\0"
        return entries

    async def enforce_retention(self, retention: timedelta) -> int:
        """Delete audit records older than ``retention``; return how many."""
        cutoff = model.utcnow() - retention
        start = self._abs("audit/")
        end = self._abs(f"audit/{_ns(cutoff):020d}")
        response = await self._call(
            "delete", "DeleteRange", rpc.DeleteRangeRequest(key=start, range_end=end)
        )
        deleted = int(response.deleted)
        await self._prune_bundles(cutoff)
        if deleted:
            self._metrics.audit_deleted.inc(deleted)
            log.info("audit_retention", deleted=deleted, older_than=model.format_time(cutoff))
        return deleted

    async def _prune_bundles(self, cutoff: datetime) -> None:
        """Bundles older than the audit trail go with it, unless still (partly) in force."""
        start = self._abs("bundles/")
        old = await self._range(
            start, self._abs("bundles/" + _bundle_stamp(cutoff)), keys_only=True
        )
        if not old.kvs:
            return
        tops = await self._tops()
        now = model.utcnow()
        doomed = []
        for kv in old.kvs:
            bundle_id = kv.key.decode(errors="replace").rsplit("/", 1)[-1]
            try:
                found = await self._read_bundle(bundle_id)
            except FailedPreconditionError:
                continue
            if found is None:
                continue
            view = self._view(found[0], int(found[1].create_revision), tops, now)
            if view.state in (model.BundleState.REVERTED, model.BundleState.EXPIRED):
                doomed.append(bytes(kv.key))
        for i in range(0, len(doomed), 100):
            await self._txn([], [self._delete_op(key) for key in doomed[i : i + 100]])

    async def oldest_audit_revision(self) -> int | None:
        """The revision of the oldest audit record kept (None: none is)."""
        start = self._abs("audit/")
        response = await self._range(start, _range_end(start), limit=1)
        return int(response.kvs[0].mod_revision) if response.kvs else None

    async def delete_range_raw(self, start: str, end: str) -> int:
        """Delete the absolute keys in [start, end); returns how many."""
        response = await self._call(
            "delete",
            "DeleteRange",
            rpc.DeleteRangeRequest(key=start.encode(), range_end=end.encode()),
        )
        return int(response.deleted)

    async def count_active(self) -> dict[str, int]:
        """How many flags, shedding levels and pins are in force."""
        counts = {}
        for kind, path in (("flag", "flags/"), ("shedding", "shedding/"), ("pin", "pins/")):
            start = self._abs(path)
            response = await self._range(start, _range_end(start), count_only=True)
            counts[kind] = int(response.count)
        return counts
