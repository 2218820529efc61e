"""The control plane's error tree; each class knows its gRPC status code.

Errors are raised in the domain (model, store) and converted to gRPC statuses
at one boundary, the gRPC services in ``controlplane.server``::

    ControlPlaneError                 INTERNAL
     ├── InvalidArgumentError         INVALID_ARGUMENT   bad input; nothing written
     ├── NotFoundError                NOT_FOUND
     ├── ConflictError                ABORTED            compare-and-set mismatch
     ├── BundleConflictError          ABORTED            a bundle's keys changed since
     ├── FailedPreconditionError      FAILED_PRECONDITION
     ├── UnavailableError             UNAVAILABLE        etcd unreachable
     │    ├── EtcdAccessError                             etcd refused the server's own credentials
     │    └── CompactedError                              a watch asked for a compacted revision
     ├── DeadlineExceededError        DEADLINE_EXCEEDED  the caller's deadline ran out first
     └── PermissionDeniedError        PERMISSION_DENIED  the caller's role does not allow it
"""

from __future__ import annotations

import grpc


class ControlPlaneError(Exception):
    """Base of every error the control plane raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(ControlPlaneError):
    """Input that breaks a rule. The message names the field and the rule."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class NotFoundError(ControlPlaneError):
    """The named record does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class ConflictError(ControlPlaneError):
    """A compare-and-set write found another mod revision than expected."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, key: str, expected: int, current: int) -> None:
        super().__init__(
            f"{key} changed: expected mod revision {expected}, current mod revision {current}"
            + (" (the key does not exist)" if current == 0 else "")
        )
        self.key = key
        self.expected = expected
        self.current = current


class BundleConflictError(ControlPlaneError):
    """A bundle cannot be reverted safely: some of its keys changed since it was applied."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, bundle_id: str, changed: list[tuple[str, int]]) -> None:
        keys = ", ".join(f"{path} (now mod revision {rev})" for path, rev in changed)
        super().__init__(
            f"bundle {bundle_id}: changed since it was applied: {keys}; nothing was reverted. "
            "Revert with force to overwrite them (the audit records what it overwrote)"
        )
        self.bundle_id = bundle_id
        self.changed = changed


class FailedPreconditionError(ControlPlaneError):
    """The request is valid but the state does not allow it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(ControlPlaneError):
    """etcd did not answer in time; the outcome of a write may be unknown."""

    code = grpc.StatusCode.UNAVAILABLE


class EtcdAccessError(UnavailableError):
    """etcd refused the control server itself: its user/password, its token, or a permission.

    Also raised for a TLS file (``--etcd-ca``, ``--etcd-cert``, ``--etcd-key``) that cannot be
    read. Nothing was written. For the callers etcd is as good as unreachable until an operator
    fixes the credentials, hence UNAVAILABLE. Messages name the user, never the password.
    """


class CompactedError(UnavailableError):
    """A watch asked for a revision etcd no longer keeps; re-read everything."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {compact_revision}")
        self.compact_revision = compact_revision


class DeadlineExceededError(ControlPlaneError):
    """The caller's own deadline, shorter than the etcd timeout, ran out first."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDeniedError(ControlPlaneError):
    """The caller is known but its role or services do not allow this."""

    code = grpc.StatusCode.PERMISSION_DENIED
