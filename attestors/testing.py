"""In-memory stand-ins for the host, for testing attestor plugins without a server.

A plugin's unit tests build it with ``configure(config, FakeHost())`` and run ``attest`` with a
``ScriptedContext`` playing the workload::

    host = FakeHost(now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    plugin = MyAttestor.configure({"key": "value"}, host)
    ctx = ScriptedContext(answer=lambda nonce: sign(nonce))
    attested = await plugin.attest(evidence, ctx)
    assert ctx.payloads == [...]

``FakeHost`` behaves as the real host does for one attestor instance: join tokens are single-use
and expire, and ``claim_once`` refuses a key until its claim expires. It keeps everything in
memory and imports nothing but ``attestors.api``, so third-party plugins can use it too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from attestors.api import AttestationRefused, PeerCredentials

__all__ = ["DEFAULT_NOW", "FakeHost", "ScriptedContext"]

DEFAULT_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

Answer = bytes | Callable[[bytes], bytes] | Callable[[bytes], Awaitable[bytes]]


def _aware(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(dt.UTC)


@dataclass(slots=True)
class _JoinToken:
    spiffe_id: str
    expires_at: dt.datetime
    used: bool = False


class FakeHost:
    """``HostServices`` for one plugin instance, held in memory, with a clock set by the test.

    ``now()`` returns the time given at construction (or set later with ``set_now`` and
    ``advance``); it moves only when told to.
    """

    def __init__(self, now: dt.datetime = DEFAULT_NOW) -> None:
        self._now = _aware(now, "now")
        self._tokens: dict[str, _JoinToken] = {}
        self._claims: dict[str, dt.datetime] = {}

    # --- the clock ---

    def now(self) -> dt.datetime:
        return self._now

    def set_now(self, when: dt.datetime) -> None:
        self._now = _aware(when, "now")

    def advance(self, delta: dt.timedelta) -> None:
        self._now += delta

    # --- join tokens ---

    def add_join_token(self, secret: str, spiffe_id: str, expires_at: dt.datetime) -> str:
        """Make ``secret`` a join token for ``spiffe_id``; return its digest (what the plugin
        passes to ``consume_join_token``: SHA-256 hex of the secret)."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if digest in self._tokens:
            raise ValueError("this join token was already added")
        self._tokens[digest] = _JoinToken(spiffe_id, _aware(expires_at, "expires_at"))
        return digest

    def join_token_used(self, secret: str) -> bool:
        """Whether the token made from ``secret`` has been consumed."""
        token = self._tokens.get(hashlib.sha256(secret.encode()).hexdigest())
        if token is None:
            raise KeyError("no such join token")
        return token.used

    async def consume_join_token(self, token_digest: str) -> str:
        short = token_digest[:8]
        token = self._tokens.get(token_digest)
        if token is None:
            raise AttestationRefused("JOIN_TOKEN_UNKNOWN", f"join token {short}… is unknown")
        if token.used:
            raise AttestationRefused("JOIN_TOKEN_USED", f"join token {short}… was already used")
        if token.expires_at <= self._now:
            raise AttestationRefused("JOIN_TOKEN_EXPIRED", f"join token {short}… has expired")
        token.used = True
        return token.spiffe_id

    # --- single-use claims ---

    async def claim_once(self, key: str, expires_at: dt.datetime) -> bool:
        expires_at = _aware(expires_at, "expires_at")
        current = self._claims.get(key)
        if current is not None and current > self._now:
            return False
        self._claims[key] = expires_at
        return True

    def claimed(self, key: str) -> bool:
        """Whether ``key`` is claimed now (a claim lapses at its ``expires_at``)."""
        until = self._claims.get(key)
        return until is not None and until > self._now


class ScriptedContext:
    """``AttestContext`` played by a test: records every challenge and answers it.

    ``answer`` is the workload's reply: fixed bytes, or a function (plain or ``async``) of the
    challenge payload. Without one, any challenge fails the test with ``AssertionError``: a
    plugin that should not ask for a round is caught asking. ``peer`` is what the kernel said
    about the caller on the local socket; None, as on a network endpoint, by default.
    """

    def __init__(
        self, answer: Answer | None = None, *, peer: PeerCredentials | None = None
    ) -> None:
        self._answer = answer
        self._peer = peer
        self.payloads: list[bytes] = []
        self.responses: list[bytes] = []

    @property
    def peer(self) -> PeerCredentials | None:
        return self._peer

    @property
    def rounds(self) -> int:
        return len(self.payloads)

    async def challenge(self, payload: bytes) -> bytes:
        self.payloads.append(payload)
        if self._answer is None:
            raise AssertionError("the plugin sent a challenge, and this context expects none")
        if isinstance(self._answer, bytes):
            response = self._answer
        else:
            result = self._answer(payload)
            response = await result if inspect.isawaitable(result) else result
        if not isinstance(response, bytes):
            raise TypeError("the scripted answer must be bytes")
        self.responses.append(response)
        return response
