"""Who may use the console: one-time sign-in codes and server-side sessions, with no I/O.

A sign-in code is minted over the admin socket (``Admin.CreateConsoleSignIn``, so only whoever
may use the admin socket can mint one) for a named operator; only its SHA-256 is kept, it
lives minutes and is spent on first use. A session is an opaque random cookie value; the
server keeps its SHA-256 with the operator, the expiry and the CSRF token bound to it, so
signing out (or a restart) makes the cookie worthless. Time is passed in by the caller's clock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from authority.clock import Clock
from authority.errors import InvalidArgument, ResourceExhausted

MAX_SIGNIN_TTL = dt.timedelta(minutes=15)
DEFAULT_SIGNIN_TTL = dt.timedelta(minutes=5)
MAX_PENDING_CODES = 1000
MAX_SESSIONS = 10_000
_OPERATOR_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_operator_name(name: str) -> str:
    """An operator's name as given to ``console login --operator``: what approvals record."""
    if not 1 <= len(name) <= 64 or not set(name) <= _OPERATOR_CHARS:
        raise InvalidArgument(
            "an operator name is 1-64 of letters, digits and . _ @ -", reason="BAD_OPERATOR"
        )
    return name


@dataclass(frozen=True, slots=True)
class Operator:
    """Who acts: ``name`` goes into approvals' decided_by and the audit's actor."""

    name: str
    how: str  # "link" (a sign-in code) or "certificate" (an X.509-SVID of an operator entry)
    cert_sha256: str = ""  # for "certificate": the session holds only on that certificate

    @property
    def actor(self) -> str:
        """What approvals record as decided_by: the name given to ``console login`` for a
        link, the SPIFFE ID for a certificate."""
        return self.name


@dataclass(frozen=True, slots=True)
class Session:
    operator: Operator
    csrf: str
    created_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class _Code:
    operator: Operator
    expires_at: dt.datetime


class ConsoleAuth:
    """Sign-in codes and sessions, held in this process (a restart signs everyone out)."""

    def __init__(self, clock: Clock, session_ttl: dt.timedelta) -> None:
        self._clock = clock
        self._session_ttl = session_ttl
        self._codes: dict[str, _Code] = {}  # sha256(code) -> what it signs in
        self._sessions: dict[str, Session] = {}  # sha256(cookie value) -> session

    def _prune(self, now: dt.datetime) -> None:
        self._codes = {k: c for k, c in self._codes.items() if c.expires_at > now}
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}

    def mint_code(self, operator: str, ttl: dt.timedelta | None = None) -> tuple[str, dt.datetime]:
        """A fresh single-use code for ``operator`` (returned once, kept only as its hash)."""
        ttl = ttl or DEFAULT_SIGNIN_TTL
        if not dt.timedelta(seconds=1) <= ttl <= MAX_SIGNIN_TTL:
            raise InvalidArgument("a sign-in link lives between 1s and 15m", reason="BAD_TTL")
        now = self._clock.now()
        self._prune(now)
        if len(self._codes) >= MAX_PENDING_CODES:
            raise ResourceExhausted("too many unused sign-in links", reason="TOO_MANY_LINKS")
        code = secrets.token_urlsafe(32)
        expires = now + ttl
        self._codes[digest(code)] = _Code(Operator(check_operator_name(operator), "link"), expires)
        return code, expires

    def redeem(self, code: str) -> Operator | None:
        """The operator a code signs in, once; None for an unknown, spent or expired code."""
        found = self._codes.pop(digest(code), None)
        if found is None or found.expires_at <= self._clock.now():
            return None
        return found.operator

    def open_session(self, operator: Operator) -> tuple[str, Session]:
        """A new session: (cookie value, session). The cookie value is not kept."""
        now = self._clock.now()
        self._prune(now)
        if len(self._sessions) >= MAX_SESSIONS:
            raise ResourceExhausted("too many console sessions", reason="TOO_MANY_SESSIONS")
        value = secrets.token_urlsafe(32)
        session = Session(operator, secrets.token_urlsafe(32), now, now + self._session_ttl)
        self._sessions[digest(value)] = session
        return value, session

    def session(self, value: str) -> Session | None:
        """The live session a cookie value names, or None (unknown, signed out or expired)."""
        if not value:
            return None
        key = digest(value)
        found = self._sessions.get(key)
        if found is None:
            return None
        if found.expires_at <= self._clock.now():
            del self._sessions[key]
            return None
        return found

    def close(self, value: str) -> None:
        self._sessions.pop(digest(value), None)

    def close_all(self, operator_name: str) -> int:
        """Sign an operator out everywhere; how many sessions ended."""
        keys = [k for k, s in self._sessions.items() if s.operator.name == operator_name]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def drop_codes(self, operator_name: str) -> int:
        """Forget the unused sign-in codes made for an operator; how many."""
        keys = [k for k, c in self._codes.items() if c.operator.name == operator_name]
        for key in keys:
            del self._codes[key]
        return len(keys)

    @staticmethod
    def csrf_ok(session: Session, token: str) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf, token)
