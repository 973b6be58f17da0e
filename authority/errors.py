"""One error tree for the whole authority.

Every error carries a stable ``reason`` (an upper-case identifier safe to log and to match on) and a
human message. The gRPC adapter maps each family to one status code in one table
(``authority.api.status``); domain code never imports grpc.
"""

from __future__ import annotations


class AuthorityError(Exception):
    """Base of every error the authority raises on purpose."""

    reason: str = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class InvalidArgument(AuthorityError):
    """Malformed input: the request can never succeed as sent."""

    reason = "INVALID_ARGUMENT"


class InvalidSpiffeId(InvalidArgument):
    reason = "INVALID_SPIFFE_ID"


class InvalidCsr(InvalidArgument):
    reason = "INVALID_CSR"


class Unauthenticated(AuthorityError):
    """A credential is missing, malformed, expired or not ours."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(AuthorityError):
    """A valid caller whose proof or request is refused."""

    reason = "PERMISSION_DENIED"


class AttestationFailed(PermissionDenied):
    reason = "ATTESTATION_FAILED"


class NotFound(AuthorityError):
    """The thing does not exist for this caller (never says "exists but not yours")."""

    reason = "NOT_FOUND"


class AlreadyExists(AuthorityError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(AuthorityError):
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(AuthorityError):
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(AuthorityError):
    reason = "UNAVAILABLE"


class Internal(AuthorityError):
    """A bug or an unexpected state; the client sees a generic message."""

    reason = "INTERNAL"


class ProfileViolation(Internal):
    """Something the authority issued does not meet its own profile; it is never returned."""

    reason = "PROFILE_VIOLATION"
