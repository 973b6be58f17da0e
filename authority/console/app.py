"""The operators' console as an ASGI application (Starlette, Jinja2 with autoescaping).

Every page needs a session; every POST needs the session's CSRF token in its form and an
Origin (and Sec-Fetch-Site, when the browser sends it) of the console itself. Responses carry a
Content-Security-Policy without inline script, and may not be framed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from authority.audit import AuditEvent
from authority.console.auth import ConsoleAuth, Operator, Session
from authority.console.views import ConsoleData, human_seconds
from authority.errors import AuthorityError
from authority.httpserve import peer_certificate_der

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make Origin "null"
    "cache-control": "no-store",
}
GRANT_CHOICES = (5, 10, 15, 30, 60)  # minutes offered for an approval


def _time(value: dt.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


class Console:
    """The console's routes over ``data`` (what it shows) and ``auth`` (who may see it)."""

    def __init__(
        self,
        data: ConsoleData,
        auth: ConsoleAuth,
        *,
        public_url: str,
        secure: bool,
    ) -> None:
        self.data = data
        self.auth = auth
        self.public_url = public_url.rstrip("/")
        parts = urlsplit(self.public_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.secure = secure
        # __Host- cookies must be Secure, host-only and for Path=/: the browser enforces it.
        self.cookie = "__Host-console" if secure else "console_session"
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.env.filters["time"] = _time
        self.env.globals["human_seconds"] = human_seconds
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/signin", self.signin_page, methods=["GET"]),
                Route("/signin", self.signin, methods=["POST"]),
                Route("/signin/certificate", self.signin_certificate, methods=["POST"]),
                Route("/signout", self.signout, methods=["POST"]),
                Route("/approvals", self.approvals),
                Route("/approvals/{approval_id}", self.approval),
                Route("/approvals/{approval_id}/approve", self.approve, methods=["POST"]),
                Route("/approvals/{approval_id}/deny", self.deny, methods=["POST"]),
                Route("/tasks/{task_id:path}", self.task),
                Route("/trust", self.trust),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            ]
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if self.secure:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    # --- rendering and guards ---------------------------------------------------------------

    def render(
        self, name: str, session: Session | None, status: int = 200, **values: Any
    ) -> HTMLResponse:
        template = self.env.get_template(name)
        html = template.render(session=session, console_url=self.public_url, **values)
        return HTMLResponse(html, status_code=status)

    async def _session(self, request: Request) -> Session | None:
        session = self.auth.session(request.cookies.get(self.cookie, ""))
        if session is None:
            return None
        if session.operator.how == "certificate":
            # A certificate's session holds only on a connection presenting that certificate,
            # and only while it is still an operator's (revoked, entry deleted or no longer
            # admin: refused at the next request).
            der = peer_certificate_der(request.scope) or b""
            if hashlib.sha256(der).hexdigest() != session.operator.cert_sha256:
                return None
            if await self._operator_certificate(der) != session.operator.name:
                return None
        return session

    def _refuse_signin(self, request: Request, message: str) -> HTMLResponse:
        return self.render(
            "signin.html", None, status=401, message=message, code="", next=request.url.path
        )

    def _same_origin(self, request: Request) -> bool:
        """A state-changing request comes from the console's own pages: its Origin is the
        console's, and the browser did not mark it cross-site."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        return origin == self.origin

    async def _guarded_post(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        if not self._same_origin(request):
            log.warning("console: refused a cross-origin POST to %s", request.url.path)
            return self.render(
                "error.html", None, status=403, message="Cross-origin request refused."
            )
        session = await self._session(request)
        if session is None:
            return self._refuse_signin(request, "Sign in first.")
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        if not self.auth.csrf_ok(session, form.get("csrf", "")):
            log.warning("console: refused a POST without its CSRF token to %s", request.url.path)
            return self.render(
                "error.html", session, status=403, message="Missing or wrong form token."
            )
        return session, form

    # --- sign in and out --------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return RedirectResponse("/approvals", status_code=303)

    async def signin_page(self, request: Request) -> Response:
        # The link's GET spends nothing (link scanners and previews fetch links): a button
        # POSTs the code.
        code = request.query_params.get("code", "")
        return self.render("signin.html", None, message="", code=code)

    async def _signed_in(self, operator: Operator) -> Response:
        value, _ = self.auth.open_session(operator)
        await self.data.store.append_audit(
            [
                AuditEvent(
                    "console.signed_in",
                    self.data.now(),
                    actor=operator.actor,
                    subject=operator.actor,
                    details={"how": operator.how},
                )
            ]
        )
        response = RedirectResponse("/approvals", status_code=303)
        response.set_cookie(
            self.cookie,
            value,
            max_age=None,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )
        log.info("console: %s signed in (%s)", operator.actor, operator.how)
        return response

    async def signin(self, request: Request) -> Response:
        if not self._same_origin(request):
            return self.render(
                "error.html", None, status=403, message="Cross-origin request refused."
            )
        form = await request.form()
        code = form.get("code")
        operator = self.auth.redeem(code) if isinstance(code, str) and code else None
        if operator is None:
            log.warning("console: a sign-in link was refused (unknown, used or expired)")
            return self._refuse_signin(
                request, "This sign-in link is unknown, expired or already used."
            )
        return await self._signed_in(operator)

    async def signin_certificate(self, request: Request) -> Response:
        if not self._same_origin(request):
            return self.render(
                "error.html", None, status=403, message="Cross-origin request refused."
            )
        der = peer_certificate_der(request.scope)
        spiffe_id = await self._operator_certificate(der)
        if der is None or spiffe_id is None:
            return self._refuse_signin(
                request, "No certificate of an operator entry was presented on this connection."
            )
        operator = Operator(spiffe_id, "certificate", hashlib.sha256(der).hexdigest())
        return await self._signed_in(operator)

    async def _operator_certificate(self, der: bytes | None) -> str | None:
        """The SPIFFE ID of the connection's client certificate (TLS verified it against the
        bundle) when it is an X.509-SVID the authority stands behind (``authenticate``: issued
        here, valid now, its entry and attestor still there, nothing revoked) under an entry
        marked admin (``entry create --admin``)."""
        if not der:
            return None
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        try:
            caller = await self.data.authority.authenticate(pem)
        except AuthorityError as exc:
            log.warning("console: a client certificate was refused: %s", exc.reason)
            return None
        if not caller.identity.admin:
            log.warning("console: %s is not an operator (its entry is not admin)", caller.spiffe_id)
            return None
        return caller.spiffe_id.uri

    async def signout(self, request: Request) -> Response:
        guarded = await self._guarded_post(request)
        if isinstance(guarded, Response):
            return guarded
        self.auth.close(request.cookies.get(self.cookie, ""))
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(
            self.cookie, path="/", secure=self.secure, httponly=True, samesite="strict"
        )
        return response

    # --- pages ----------------------------------------------------------------------------

    async def _page(self, request: Request) -> Session | Response:
        session = await self._session(request)
        if session is None:
            return self._refuse_signin(request, "Sign in to use the console.")
        return session

    async def approvals(self, request: Request) -> Response:
        session = await self._page(request)
        if isinstance(session, Response):
            return session
        pending, decided = await self.data.approvals()
        name = "approvals_list.html" if request.query_params.get("fragment") else "approvals.html"
        return self.render(name, session, pending=pending, decided=decided)

    async def approval(self, request: Request) -> Response:
        session = await self._page(request)
        if isinstance(session, Response):
            return session
        view = await self.data.approval(request.path_params["approval_id"])
        if view is None:
            return self.render("error.html", session, status=404, message="No such approval.")
        return self.render(
            "approval.html",
            session,
            view=view,
            grants=GRANT_CHOICES,
            flash=request.query_params.get("done", ""),
        )

    async def _decide(
        self, request: Request, act: Callable[[str, dict[str, str], Operator], Awaitable[object]]
    ) -> Response:
        guarded = await self._guarded_post(request)
        if isinstance(guarded, Response):
            return guarded
        session, form = guarded
        approval_id = request.path_params["approval_id"]
        try:
            await act(approval_id, form, session.operator)
        except (AuthorityError, ValueError) as exc:
            view = await self.data.approval(approval_id)
            if view is None:
                return self.render("error.html", session, status=404, message="No such approval.")
            return self.render(
                "approval.html",
                session,
                status=409,
                view=view,
                grants=GRANT_CHOICES,
                flash="",
                error=str(exc),
            )
        return RedirectResponse(f"/approvals/{approval_id}?done=1", status_code=303)

    async def approve(self, request: Request) -> Response:
        async def act(approval_id: str, form: dict[str, str], operator: Operator) -> object:
            minutes = int(form.get("minutes", "0") or 0)
            if minutes not in GRANT_CHOICES:
                raise ValueError("choose a duration offered")
            return await self.data.exchange.approve(
                approval_id,
                grant=dt.timedelta(minutes=minutes),
                note=form.get("note", ""),
                by=operator.actor,
            )

        return await self._decide(request, act)

    async def deny(self, request: Request) -> Response:
        async def act(approval_id: str, form: dict[str, str], operator: Operator) -> object:
            return await self.data.exchange.deny(
                approval_id, reason=form.get("reason", ""), by=operator.actor
            )

        return await self._decide(request, act)

    async def task(self, request: Request) -> Response:
        session = await self._page(request)
        if isinstance(session, Response):
            return session
        task_id = request.path_params["task_id"]
        try:
            records, verification = await self.data.trace(task_id)
        except AuthorityError as exc:
            return self.render("error.html", session, status=400, message=str(exc))
        return self.render(
            "task.html", session, task_id=task_id, records=records, verification=verification
        )

    async def trust(self, request: Request) -> Response:
        session = await self._page(request)
        if isinstance(session, Response):
            return session
        return self.render("trust.html", session, **await self.data.trust_domain())
