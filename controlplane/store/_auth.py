"""etcd's own authentication: a token per endpoint, renewed when etcd drops it.

etcd takes a ``token`` metadata entry from ``Authenticate``; the store gets one per
endpoint when first needed (etcd's default "simple" tokens belong to the member that
issued them) and sends it with every call. When etcd rejects a token (restarted, auth
disabled and enabled, the user's password changed, idle past ``--auth-token-ttl``)
the caller renews it here and retries once: etcd rejects such a call before applying
it, so a write is never applied twice. Passwords and tokens never appear in logs,
errors, reprs or metrics; errors name the user.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc
import structlog
from aetcd import rpc

from controlplane.errors import EtcdAccessError
from controlplane.metrics import ServerMetrics
from controlplane.store._security import EtcdSecurity

log = structlog.get_logger("controlplane.store")

# etcd's answers (3.4 and 3.5) to a call whose token it does not accept; each is given
# before the call is applied, so the call can be retried with a new token.
_TOKEN_REJECTED = (
    "invalid auth token",  # UNAUTHENTICATED: unknown or expired token, auth re-enabled
    "user name is empty",  # INVALID_ARGUMENT: no token (auth was enabled after we looked)
    "revision of auth store is old",  # INVALID_ARGUMENT: auth changed while in flight
)


def names_dead_token(details: str) -> bool:
    """Whether etcd's words say it does not accept the token sent."""
    return any(text in details for text in _TOKEN_REJECTED)


def token_rejected(code: grpc.StatusCode, details: str) -> bool:
    """Whether etcd refused a call over its token (not over the user's rights)."""
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return True
    return code is grpc.StatusCode.INVALID_ARGUMENT and names_dead_token(details)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("token", token),) if token else None


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


class Tokens:
    """The token of each etcd endpoint (none without an etcd user).

    ``stubs`` are the endpoints' Auth stubs, in endpoint order; one authentication
    per endpoint at a time.
    """

    def __init__(
        self,
        security: EtcdSecurity,
        endpoints: Sequence[str],
        stubs: Sequence[Any],
        metrics: ServerMetrics,
    ) -> None:
        self.security = security
        self.endpoints = list(endpoints)
        self._stubs = list(stubs)
        self._metrics = metrics
        # Per endpoint: the token ("" when etcd has auth off); absent until first needed.
        self._tokens: dict[int, str] = {}
        self._locks = [asyncio.Lock() for _ in self._stubs]
        self._auth_off_logged = False

    async def token(self, index: int, deadline: float) -> str | None:
        """The token for calls to endpoint ``index``; None without an etcd user."""
        if not self.security.uses_auth:
            return None
        token = self._tokens.get(index)
        if token is None:
            token = await self.renew(index, None, deadline)
        return token

    async def renew(self, index: int, stale: str | None, deadline: float) -> str:
        """Authenticate at endpoint ``index`` unless another call replaced ``stale`` meanwhile.

        One authentication per endpoint at a time: when a token dies, every call in
        flight sees it rejected, and each Authenticate is a raft write in etcd.

        Raises:
            EtcdAccessError: etcd refused the user name or password.
            grpc.aio.AioRpcError: etcd did not answer (left to the caller's handling).
            TimeoutError: ``deadline`` passed while waiting for another call's renewal.
        """
        async with asyncio.timeout_at(_loop_time(deadline)), self._locks[index]:
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
            response = await self._stubs[index].Authenticate(
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
