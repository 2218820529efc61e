"""Who may do what: identities, roles, the auth file, and the gRPC interceptor enforcing them.

The auth file (YAML or JSON; ``--auth-file``) lists identities::

    identities:
      - name: oncall
        role: operator
        token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
      - name: checkout-agents
        role: agent
        services: [checkout]
        token_sha256: [<hash of the current token>, <hash of the next one>]
        max_streams: 5000
      - name: deploy-pipeline
        role: admin
        cert_subject: "CN=deploy-pipeline,O=Example"

Only SHA-256 hashes of tokens are stored (``controlplane token`` makes a token and its
hash). A client certificate's subject (RFC 4514, as ``openssl x509 -noout -subject
-nameopt RFC2253`` prints it) can be an identity when the server requires client
certificates (``--tls-client-ca``). A token, when sent, decides the identity.

Roles:

- ``viewer``: reads (state, status, history, timeline, watch).
- ``agent``: the ``Sync`` stream only, for the services listed (``"*"``: all).
- ``operator``: viewer + every mitigation write (flags, shedding, pins, rollback, bundles).
- ``admin``: operator + known-good marks and unmarks (deploy pipelines).
- ``trigger``: fires and resolves triggers (Alertmanager's webhook), nothing else.

Health checks need no credentials; reflection needs any identity. A method that no rule
names is refused (``PERMISSION_DENIED``), so a new RPC is closed until it is classified.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import hashlib
import hmac
import inspect
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog
import yaml

from controlplane._files import UnsafeFileError, read_guarded
from controlplane.api.v1 import agent_pb2, mitigation_pb2
from controlplane.errors import PermissionDeniedError
from controlplane.transport import AUTHORIZATION

log = structlog.get_logger("controlplane.auth")


class Role(enum.StrEnum):
    VIEWER = "viewer"
    AGENT = "agent"
    OPERATOR = "operator"
    ADMIN = "admin"
    TRIGGER = "trigger"


class Access(enum.Enum):
    """What a method needs."""

    OPEN = "open"  # health checks: no credentials
    ANY = "any"  # reflection: any identity
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    SYNC = "sync"
    FIRE = "fire"


ROLES_FOR: dict[Access, frozenset[Role]] = {
    Access.ANY: frozenset(Role),
    Access.READ: frozenset({Role.VIEWER, Role.OPERATOR, Role.ADMIN}),
    Access.WRITE: frozenset({Role.OPERATOR, Role.ADMIN}),
    Access.ADMIN: frozenset({Role.ADMIN}),
    Access.SYNC: frozenset({Role.AGENT}),
    Access.FIRE: frozenset({Role.TRIGGER, Role.OPERATOR, Role.ADMIN}),
}

_MITIGATION = mitigation_pb2.DESCRIPTOR.services_by_name["MitigationService"]
_AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
_FLAG_SYNC = "flagd.sync.v1.FlagSyncService"

_WRITES = {
    "SetFlag", "ClearFlag", "SetShedding", "ClearShedding", "PinVersion", "UnpinVersion",
    "Rollback", "ApplyBundle", "RevertBundle", "SetTrigger", "DeleteTrigger",
    "SetTriggerEnabled",
}  # fmt: skip
_FIRES = {"FireTrigger", "ResolveTrigger"}
_ADMIN_WRITES = {"MarkKnownGood", "UnmarkKnownGood"}
_READS = {
    "GetFlag", "ListFlags", "GetShedding", "ListShedding", "GetPin", "ListPins",
    "ListKnownGood", "ListBundles", "GetBundle", "GetStatus", "ListServices", "ListHistory",
    "WatchChanges", "WaitApplied", "GetTimeline", "ListNotifications", "GetTrigger",
    "ListTriggers",
}  # fmt: skip


OFREP_EVALUATE = "/ofrep.v1/EvaluateFlag"
OFREP_BULK = "/ofrep.v1/EvaluateFlags"
OFREP_EVENTS = "/ofrep.v1/EventStream"
OFREP_METHODS = (OFREP_EVALUATE, OFREP_BULK, OFREP_EVENTS)
"""OFREP's routes as the rules name them."""
ALERTMANAGER = "/alertmanager.v4/Notify"
"""Alertmanager's webhook (``POST /v1/alertmanager``) as the rules name it."""


def _method_rules() -> dict[str, Access]:
    rules: dict[str, Access] = {}
    for method in _MITIGATION.methods:
        name = method.name
        access = (
            Access.WRITE
            if name in _WRITES
            else Access.ADMIN
            if name in _ADMIN_WRITES
            else Access.READ
            if name in _READS
            else Access.FIRE
            if name in _FIRES
            else None
        )
        if access is not None:
            rules[f"/{_MITIGATION.full_name}/{name}"] = access
    rules[f"/{_AGENT.full_name}/Sync"] = Access.SYNC
    # OpenFeature's flagd providers: sync clients are agents (the service they select
    # is checked as the agents' own).
    for name in ("SyncFlags", "FetchAllFlags", "GetMetadata"):
        rules[f"/{_FLAG_SYNC}/{name}"] = Access.SYNC
    # OFREP on the HTTP listener: its clients are agents of the service they evaluate.
    for name in OFREP_METHODS:
        rules[name] = Access.SYNC
    rules[ALERTMANAGER] = Access.FIRE
    for name in ("Check", "Watch", "List"):
        rules[f"/grpc.health.v1.Health/{name}"] = Access.OPEN
    for service in (
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ):
        rules[f"/{service}/ServerReflectionInfo"] = Access.ANY
    return rules


METHOD_RULES: dict[str, Access] = _method_rules()
"""Full method name (``/package.Service/Method``) -> what it needs; absent: refused."""

_SENDS_FIRST = frozenset({f"/{_AGENT.full_name}/Sync"})
"""Client-streaming methods whose clients write a message before reading any."""
REFUSAL_READ_SECONDS = 1.0

STREAMING_METHODS = frozenset(
    {
        f"/{_AGENT.full_name}/Sync",
        f"/{_MITIGATION.full_name}/WatchChanges",
        f"/{_FLAG_SYNC}/SyncFlags",
        OFREP_EVENTS,
    }
)
"""The long-lived streams that ``max_streams`` counts."""


# ---------------------------------------------------------------- the auth file


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the entry and the field."""


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_SERVICE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ALL_SERVICES = "*"
_KEYS = {"name", "role", "token_sha256", "cert_subject", "services", "max_streams"}


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: its name (the audit actor), role and limits."""

    name: str
    role: Role
    services: frozenset[str] = frozenset()  # agents: what they may sync; "*": all
    max_streams: int | None = None  # None: the server's default

    def may(self, access: Access) -> bool:
        return access is Access.OPEN or self.role in ROLES_FOR[access]

    def may_sync(self, service: str) -> bool:
        return self.role is Role.AGENT and (
            _ALL_SERVICES in self.services or service in self.services
        )


@dataclass(frozen=True)
class AuthConfig:
    """A parsed auth file."""

    identities: tuple[Identity, ...]
    tokens: tuple[tuple[bytes, Identity], ...] = field(repr=False)  # (sha256 digest, who)
    subjects: Mapping[str, Identity] = field(default_factory=dict)
    source: str = ""

    def by_token(self, token: str) -> Identity | None:
        """The identity of ``token``."""
        return self.by_digest(token_digest(token))

    def by_digest(self, digest: bytes) -> Identity | None:
        """The identity of a token's SHA-256, comparing with every hash in constant time."""
        found: Identity | None = None
        for known, identity in self.tokens:
            # No early exit: the time taken does not say which entry matched.
            if hmac.compare_digest(known, digest):
                found = identity
        return found

    def by_subject(self, subject: str) -> Identity | None:
        return self.subjects.get(subject)

    def resolve(self, credential: Credential) -> Identity | None:
        """Who ``credential`` is under this configuration (None: nobody)."""
        kind, value = credential
        if kind == "token" and isinstance(value, bytes):
            return self.by_digest(value)
        if kind == "subject" and isinstance(value, str):
            return self.by_subject(value)
        return None


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token."""
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as the auth file holds it."""
    return token_digest(token).hex()


def _as_list(value: Any, where: str, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise AuthFileError(f"{where}: {what} must be a string or a list of strings")


def parse_auth(data: Any, source: str = "auth file") -> AuthConfig:
    """Validate a loaded auth document.

    Raises:
        AuthFileError: naming the entry (by position and name) and the field.
    """
    if not isinstance(data, dict) or set(data) - {"identities"}:
        raise AuthFileError(f"{source}: expected a mapping with one key, 'identities'")
    entries = data.get("identities")
    if not isinstance(entries, list) or not entries:
        raise AuthFileError(f"{source}: 'identities' must be a non-empty list")
    identities: list[Identity] = []
    tokens: list[tuple[bytes, Identity]] = []
    subjects: dict[str, Identity] = {}
    seen_hashes: dict[str, str] = {}
    names: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        where = f"{source}: identity #{index}"
        if not isinstance(entry, dict):
            raise AuthFileError(f"{where}: must be a mapping")
        name = entry.get("name")
        if isinstance(name, str) and name:
            where = f"{where} ({name!r})"
        unknown = sorted(str(k) for k in set(entry) - _KEYS)
        if unknown:
            raise AuthFileError(
                f"{where}: unknown field(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(_KEYS))})"
            )
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise AuthFileError(
                f"{where}: name is required: 1-128 characters A-Z, a-z, 0-9, '.', '_', ':', "
                "'@', '/' and '-'"
            )
        if name in names:
            raise AuthFileError(f"{where}: name {name!r} is used twice")
        names.add(name)
        try:
            role = Role(str(entry.get("role")))
        except ValueError:
            raise AuthFileError(
                f"{where}: role must be one of {', '.join(r.value for r in Role)}"
            ) from None
        services = _as_list(entry.get("services"), where, "services")
        if role is Role.AGENT:
            if not services:
                raise AuthFileError(
                    f"{where}: an agent identity needs 'services' (the services it may "
                    'sync, or "*" for all)'
                )
            for service in services:
                if service != _ALL_SERVICES and not (
                    isinstance(service, str) and _SERVICE_RE.fullmatch(service)
                ):
                    raise AuthFileError(f"{where}: services: {service!r} is not a service name")
        elif services:
            raise AuthFileError(f"{where}: only agent identities have 'services'")
        max_streams = entry.get("max_streams")
        if max_streams is not None and (
            isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1
        ):
            raise AuthFileError(f"{where}: max_streams must be a positive integer")
        identity = Identity(name, role, frozenset(services), max_streams)
        hashes = _as_list(entry.get("token_sha256"), where, "token_sha256")
        certs = _as_list(entry.get("cert_subject"), where, "cert_subject")
        if not hashes and not certs:
            raise AuthFileError(f"{where}: needs token_sha256 or cert_subject (or both)")
        for value in hashes:
            if not isinstance(value, str) or not _HASH_RE.fullmatch(value.strip().lower()):
                raise AuthFileError(
                    f"{where}: token_sha256 must be 64 hex digits (the SHA-256 of the token, "
                    "never the token itself; see `controlplane token`)"
                )
            digest = value.strip().lower()
            if digest in seen_hashes:
                raise AuthFileError(
                    f"{where}: a token hash is also listed for {seen_hashes[digest]!r}"
                )
            seen_hashes[digest] = name
            tokens.append((bytes.fromhex(digest), identity))
        for subject in certs:
            if not isinstance(subject, str) or not subject.strip():
                raise AuthFileError(f"{where}: cert_subject must be a non-empty string")
            subject = subject.strip()
            if subject in subjects:
                raise AuthFileError(
                    f"{where}: cert_subject {subject!r} is also listed for "
                    f"{subjects[subject].name!r}"
                )
            subjects[subject] = identity
        identities.append(identity)
    return AuthConfig(tuple(identities), tuple(tokens), subjects, source)


def load_auth_file(path: Path) -> AuthConfig:
    """Read and validate the auth file (``.json``: JSON; anything else: YAML).

    Raises:
        AuthFileError: it cannot be read, someone else than its owner (this user or
            root) can change it or its directory, it does not parse or is invalid.
    """
    try:
        raw, _ = read_guarded(path, "the auth file")
        text = raw.decode("utf-8")
    except UnsafeFileError as exc:
        raise AuthFileError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise AuthFileError(f"auth file {path} does not parse: {exc}") from None
    return parse_auth(data, str(path))


# ---------------------------------------------------------------- per call

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "controlplane_identity", default=None
)
"""The caller of the RPC being served; None with authentication off."""


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _needed(access: Access) -> str:
    roles = sorted(ROLES_FOR[access], key=list(Role).index)
    names = [r.value for r in roles]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _method_name(method: str) -> str:
    return method.rpartition("/")[2] or method


Credential = tuple[str, str | bytes]
"""How a caller proved who it is: ``("token", sha256 digest)`` or ``("subject", subject)``."""


def authenticate(
    config: AuthConfig,
    metadata: Iterable[tuple[str, Any]],
    auth_context: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
) -> tuple[Identity, Credential]:
    """Who is calling: the bearer token's identity, else the client certificate's.

    Raises:
        AuthError: UNAUTHENTICATED, saying what was wrong (never echoing a token).
    """
    header: str | None = None
    for key, value in metadata:
        if key == AUTHORIZATION:
            if header is not None:
                raise AuthError(
                    grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header"
                )
            header = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed authorization metadata: expected 'Bearer <token>'",
            )
        digest = token_digest(token.strip())
        identity = config.by_digest(digest)
        if identity is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        return identity, ("token", digest)
    if callable(auth_context):  # read only when no token was sent
        auth_context = auth_context()
    subjects = auth_context.get("x509_subject") or []
    if subjects:
        raw = subjects[0]
        subject = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        identity = config.by_subject(subject)
        if identity is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"client certificate {subject!r} is not an identity in the auth file, "
                "and no token was sent",
            )
        return identity, ("subject", subject)
    raise AuthError(
        grpc.StatusCode.UNAUTHENTICATED,
        "no credentials: send the metadata 'authorization: Bearer <token>'"
        " (cpctl: CPCTL_TOKEN or --token-file)",
    )


def authorize(identity: Identity, method: str) -> None:
    """Raise PERMISSION_DENIED unless ``identity`` may call ``method``."""
    access = METHOD_RULES.get(method)
    if access is None:
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any role")
    if not identity.may(access):
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{identity.name} (role {identity.role.value}) may not call "
            f"{_method_name(method)}: it needs the {_needed(access)} role",
        )


def check_sync_service(service: str) -> None:
    """Inside Sync: raise PERMISSION_DENIED unless the caller may sync ``service``."""
    identity = current_identity.get()
    if identity is None or identity.may_sync(service):
        return
    allowed = ", ".join(sorted(identity.services)) or "no service"
    raise PermissionDeniedError(f"{identity.name} may sync {allowed}, not {service}")


# ---------------------------------------------------------------- streams


@dataclass(eq=False)
class _Stream:
    identity: Identity
    credential: Credential = field(repr=False)
    task: asyncio.Task[Any] | None
    revoked: str | None = None


DEFAULT_STREAM_LIMITS: dict[Role, int] = {
    Role.AGENT: 20_000,
    Role.VIEWER: 100,
    Role.OPERATOR: 100,
    Role.ADMIN: 100,
}
"""Open streams per identity in one server process, by role, when neither the auth file
(``max_streams``) nor ``--max-streams-per-identity`` says otherwise. An agent identity
serves a service's whole fleet (the benchmarks run 5,000 agents on one token); a person
or a dashboard watches with a few streams. Each stream costs the server about 40 KiB."""


class Streams:
    """The open streams per identity: their limit, and ending revoked ones.

    ``default_limit``: every identity's limit unless the auth file gives its own;
    None: :data:`DEFAULT_STREAM_LIMITS` by role.
    """

    def __init__(self, default_limit: int | None) -> None:
        self.default_limit = default_limit
        self._open: dict[str, set[_Stream]] = {}

    def limit(self, identity: Identity) -> int:
        """How many streams ``identity`` may hold open in this process."""
        by_role = DEFAULT_STREAM_LIMITS[identity.role]
        return identity.max_streams or self.default_limit or by_role

    def count(self, name: str) -> int:
        return len(self._open.get(name, ()))

    @contextlib.contextmanager
    def hold(self, identity: Identity, credential: Credential) -> Iterator[_Stream]:
        limit = self.limit(identity)
        streams = self._open.setdefault(identity.name, set())
        if len(streams) >= limit:
            raise AuthError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{identity.name} already has {len(streams)} open streams, its limit "
                "(max_streams in the auth file, else --max-streams-per-identity, else "
                f"{DEFAULT_STREAM_LIMITS[identity.role]} for the {identity.role} role)",
            )
        stream = _Stream(identity, credential, asyncio.current_task())
        streams.add(stream)
        try:
            yield stream
        finally:
            streams.discard(stream)
            if not streams:
                self._open.pop(identity.name, None)

    def revoke_changed(self, config: AuthConfig) -> int:
        """End the streams whose credential ``config`` no longer grants as it did.

        A stream goes on when its token (or certificate subject) still maps to the same
        identity with at least the rights it had; a removed token, another role or fewer
        services end it with UNAUTHENTICATED, and the client reconnects with what it now
        has. Returns how many were ended.
        """
        ended = 0
        for streams in list(self._open.values()):
            for stream in list(streams):
                if stream.revoked is not None or stream.task is None:
                    continue
                now = config.resolve(stream.credential)
                if now is not None and _keeps_rights(stream.identity, now):
                    # Same rights or more (a raised limit, a service added): it goes on.
                    stream.identity = now
                    continue
                stream.revoked = (
                    f"the credentials of {stream.identity.name} were revoked"
                    if now is None
                    else f"the rights of {stream.identity.name} changed: reconnect"
                )
                stream.task.cancel()
                ended += 1
        return ended


def _keeps_rights(old: Identity, new: Identity) -> bool:
    """Whether ``new`` allows all that ``old`` did (same name and role, services kept)."""
    if (new.name, new.role) != (old.name, old.role):
        return False
    return _ALL_SERVICES in new.services or old.services <= new.services


# ---------------------------------------------------------------- the interceptor


REFUSALS_LOGGED_PER_SECOND = 20
"""``rpc_refused`` lines per second at most (a fleet with a revoked token, a scanner);
the refusals beyond are counted in one line per second, and all in the metric."""


class _RateLimit:
    """At most ``per_second`` events a second; says how many it held back, once a second."""

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._second = 0
        self._allowed = 0
        self._held = 0

    def allow(self) -> bool:
        second = int(self._clock())
        if second != self._second:
            if self._held:
                log.info("rpc_refused_not_logged", count=self._held, seconds=1)
            self._second, self._allowed, self._held = second, 0, 0
        if self._allowed < self.per_second:
            self._allowed += 1
            return True
        self._held += 1
        return False


Behaviour = Callable[..., Any]
if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Authenticate and authorize every call before its handler runs.

    The identity is in :data:`current_identity` while the handler runs. ``config`` can be
    replaced at any time (SIGHUP); calls in flight keep the identity they started with.
    """

    def __init__(self, config: AuthConfig, streams: Streams) -> None:
        self.config = config
        self.streams = streams
        self.on_denied: Callable[[str, str], None] | None = None  # (method, code)
        self._refusal_log = _RateLimit(REFUSALS_LOGGED_PER_SECOND)
        self._wrapped: dict[str, tuple[Handler, Handler | None]] = {}

    async def intercept_service(  # type: ignore[override]  # None: UNIMPLEMENTED, as gRPC's own
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _admit(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Identity, Credential] | None:
        """The caller's identity and credential (None for an open method), or AuthError."""
        if METHOD_RULES.get(method) is Access.OPEN:
            return None
        identity, credential = authenticate(
            self.config, context.invocation_metadata() or (), context.auth_context
        )
        authorize(identity, method)
        return identity, credential

    def refused(self, method: str, error: AuthError, peer: str, **fields: Any) -> None:
        """Count a refusal and log it (at most REFUSALS_LOGGED_PER_SECOND lines a second);
        the HTTP listener's refusals go through here too."""
        if self.on_denied is not None:
            self.on_denied(_method_name(method), error.code.name)
        if self._refusal_log.allow():
            log.info(
                "rpc_refused",
                method=_method_name(method),
                code=error.code.name,
                error=error.message,
                peer=peer,
                **fields,
            )

    async def _deny(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], error: AuthError
    ) -> NoReturn:
        self.refused(method, error, context.peer())
        if method in _SENDS_FIRST:
            # The client writes its first message before it reads: take it (briefly)
            # before refusing, or its write can race the refusal and it sees an
            # INTERNAL "Internal error from Core" instead of why it was refused.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REFUSAL_READ_SECONDS):
                    await context.read()
        await context.abort(error.code, error.message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _admitted(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        """Run the handler inside: with the caller's identity in :data:`current_identity`
        and, for a long-lived stream, one of its identity's places (which a reload
        revoking the credential ends with UNAUTHENTICATED). A refusal aborts the call."""
        try:
            admitted = self._admit(method, context)
        except AuthError as error:
            await self._deny(method, context, error)
        if admitted is None:  # an open method (health checks)
            yield
            return
        identity, credential = admitted
        token = current_identity.set(identity)
        try:
            if method not in STREAMING_METHODS:
                yield
                return
            try:
                held = self.streams.hold(identity, credential)
                stream = held.__enter__()
            except AuthError as error:
                await self._deny(method, context, error)
            try:
                yield
            except asyncio.CancelledError:
                if stream.revoked is None:
                    raise
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, stream.revoked)
            finally:
                held.__exit__(None, None, None)
        finally:
            current_identity.reset(token)

    def _wrap(self, method: str, handler: Handler) -> Handler | None:
        """``handler`` with its behaviour run inside :meth:`_admitted`."""
        admitted = self._admitted
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for attribute, make in kinds:
            behaviour = getattr(handler, attribute)
            if behaviour is None:
                continue
            if inspect.isasyncgenfunction(behaviour):
                # Streamed responses are written from the call's own task, so that a
                # revocation (or a client going away) while gRPC is sending reaches
                # the handler, and the generator closes in the context it ran in.

                async def streamed(request: Any, context: Any, _b: Behaviour = behaviour) -> None:
                    async with (
                        admitted(method, context),
                        contextlib.aclosing(_b(request, context)) as responses,
                    ):
                        async for response in responses:
                            await context.write(response)

                new: Behaviour = streamed
            else:

                async def new(request: Any, context: Any, _b: Behaviour = behaviour) -> Any:
                    async with admitted(method, context):
                        return await _b(request, context)

            return make(
                new,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # A kind of handler this does not know: refused (UNIMPLEMENTED), never run unchecked.
        log.error("rpc_handler_unknown", method=_method_name(method))
        return None
