"""Sign-in links, minted for the admin socket's ``Admin.CreateConsoleSignIn``, and audited."""

from __future__ import annotations

import datetime as dt

from authority.audit import AuditEvent
from authority.clock import Clock
from authority.console.auth import ConsoleAuth, digest
from authority.store import Store

ADMIN_ACTOR = "admin-socket"


class SignInLinks:
    """Mints ``<console_url>/signin?code=...`` links. The code is returned once; the audit
    records who it is for and a prefix of its hash, never the code."""

    def __init__(self, auth: ConsoleAuth, public_url: str, store: Store, clock: Clock) -> None:
        self._auth = auth
        self._clock = clock
        self._url = public_url.rstrip("/")
        self._store = store

    async def mint(self, operator: str, ttl: dt.timedelta | None) -> tuple[str, dt.datetime]:
        code, expires = self._auth.mint_code(operator, ttl)
        event = AuditEvent(
            "console.signin_link",
            self._clock.now(),
            actor=ADMIN_ACTOR,
            subject=operator,
            details={"code_sha256_prefix": digest(code)[:12], "expires_at": expires.isoformat()},
        )
        await self._store.append_audit([event])
        return f"{self._url}/signin?code={code}", expires

    async def end_sessions(self, operator: str, actor: str = ADMIN_ACTOR) -> tuple[int, int]:
        """Sign ``operator`` out of every session and drop its unused links: (sessions, links)."""
        sessions = self._auth.close_all(operator)
        links = self._auth.drop_codes(operator)
        event = AuditEvent(
            "console.sessions_ended",
            self._clock.now(),
            actor=actor,
            subject=operator,
            details={"sessions": sessions, "links": links},
        )
        await self._store.append_audit([event])
        return sessions, links
