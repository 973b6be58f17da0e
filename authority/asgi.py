"""Task tokens on plain HTTP services: an ASGI middleware (Starlette, FastAPI, any ASGI app).

The HTTP sibling of ``authority.relying.TaskTokenInterceptor``, with the same verifier
(``TaskTokenVerifier``: signature, issuer, audience, time, ``cnf``, exact action, resource,
revocation, fail-closed on a stale feed):

- ``Route("GET", "/metrics/{env}/{name}", "read", "metrics/{env}/{name}")``: a request whose
  method and path match is admitted only with a token for that action, on the resource the
  template names once filled from the path's parameters (``{name}`` is one path segment,
  ``{name:path}`` the rest of the path). The first matching route decides. A template of
  ``None`` checks the action alone;
- the token comes from ``Authorization: Bearer <token>``; the certificate it must be bound to
  from the connection's TLS (``authority.httpserve.peer_certificate_der``: the ASGI TLS
  extension). Without a client certificate every token is refused (``TOKEN_UNBOUND``);
- ``public`` path patterns pass without a token; any other request matching no route is
  refused (403 ``ROUTE_NOT_ALLOWED``);
- refusals follow RFC 6750 (and RFC 8705 for the certificate binding): 401 with
  ``WWW-Authenticate: Bearer error="invalid_token"`` for a missing, bad, expired, revoked or
  unbound token (a missing one gets the challenge without an error code, as §3.1 asks), 403
  with ``error="insufficient_scope"`` for another action or a resource outside the token's,
  400 ``invalid_request`` for a path that names no valid resource, 503 (``Retry-After``) while
  the revocation feed is stale or the task-token keys cannot be had. The body is JSON:
  ``{"error": ..., "reason": "TOKEN_EXPIRED", "message": ...}``; the reason is the verifier's;
- the handler finds the verified ``TaskToken`` in ``request.state.task_token`` (Starlette) or
  ``scope["state"]["task_token"]``: ``task_token(scope)``.

Tokens are never logged: a refusal is one INFO line with the reason, the route and a digest
prefix of the token.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from authority import tokens
from authority.audit import digest
from authority.errors import (
    AuthorityError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from authority.httpserve import AsgiApp, Receive, Scope, Send, peer_certificate_der
from authority.relying import TaskTokenVerifier, bearer_token
from authority.tokens import TaskToken

log = logging.getLogger(__name__)

__all__ = ["Route", "TaskTokenMiddleware", "refusal", "task_token"]

STATE_KEY = "task_token"
_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")
_METHOD = re.compile(r"^(\*|[A-Z]+)$")
# Reasons answered 401 invalid_token even though the verifier calls them PermissionDenied:
# a token bound to another certificate is not a token for this caller (RFC 8705 §3).
_INVALID_TOKEN = frozenset({"TOKEN_CNF_MISMATCH"})


def _compile(pattern: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A path pattern (``/a/{x}/{rest:path}``) as a regular expression and its names."""
    if not pattern.startswith("/"):
        raise ValueError(f"a path pattern starts with '/': {pattern!r}")
    names: list[str] = []
    out, last = "^", 0
    for match in _PARAMETER.finditer(pattern):
        name, rest = match.group(1), match.group(2)
        if name in names:
            raise ValueError(f"{pattern!r} names {{{name}}} twice")
        names.append(name)
        out += re.escape(pattern[last : match.start()])
        out += f"(?P<{name}>.+)" if rest else f"(?P<{name}>[^/]+)"
        last = match.end()
    literal = pattern[last:]
    if "{" in literal or "}" in literal or any("{" in p or "}" in p for p in names):
        raise ValueError(f"{pattern!r}: parameters are {{name}} or {{name:path}}")
    return re.compile(out + re.escape(literal) + "$"), tuple(names)


@dataclass(frozen=True)
class Route:
    """Requests of ``method`` (``*``: any) on ``path`` need a token for ``action`` on the
    resource ``resource`` names, its ``{parameters}`` taken from the path (None: no resource
    check, the action alone)."""

    method: str
    path: str
    action: str
    resource: str | None = None
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _METHOD.fullmatch(self.method):
            raise ValueError(f"method {self.method!r} is an upper-case HTTP method or '*'")
        tokens.check_action(self.action)
        regex, names = _compile(self.path)
        object.__setattr__(self, "_regex", regex)
        object.__setattr__(self, "_names", names)
        if self.resource is not None:
            used = {m.group(1) for m in _PARAMETER.finditer(self.resource)}
            if unknown := used - set(names):
                raise ValueError(
                    f"resource {self.resource!r} uses {sorted(unknown)} that {self.path!r} lacks"
                )

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The path's parameters when this route covers the request; else None."""
        if self.method not in ("*", method):
            return None
        found = self._regex.match(path)
        return None if found is None else found.groupdict()

    def resource_for(self, params: Mapping[str, str]) -> str | None:
        if self.resource is None:
            return None
        return _PARAMETER.sub(lambda m: params[m.group(1)], self.resource)


def task_token(scope: Scope) -> TaskToken:
    """The task token the middleware verified for this request."""
    token = scope.get("state", {}).get(STATE_KEY)
    if not isinstance(token, TaskToken):
        raise Unauthenticated("no verified task token for this request", reason="TOKEN_MISSING")
    return token


def refusal(exc: AuthorityError, realm: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of the answer to a refused request."""
    if isinstance(exc, Unavailable):
        status, error = 503, "temporarily_unavailable"
    elif isinstance(exc, Unauthenticated) or exc.reason in _INVALID_TOKEN:
        status, error = 401, "invalid_token"
    elif isinstance(exc, PermissionDenied):
        status, error = 403, "insufficient_scope"
    elif isinstance(exc, InvalidArgument):
        status, error = 400, "invalid_request"
    else:
        status, error = 500, "server_error"
    message = exc.message if not isinstance(exc, Internal) else "internal error"
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    if status in (401, 403, 400):
        challenge = f'Bearer realm="{realm}"'
        if exc.reason != "TOKEN_MISSING":  # RFC 6750 §3.1: no error code without a token
            description = message.replace("\\", "").replace('"', "'")[:200]
            challenge += f', error="{error}", error_description="{description}"'
        headers.append((b"www-authenticate", challenge.encode("ascii", "replace")))
    if status == 503:
        headers.append((b"retry-after", b"1"))
    body = json.dumps({"error": error, "reason": exc.reason, "message": message}).encode()
    return status, headers, body


class TaskTokenMiddleware:
    """Enforces task tokens on an ASGI application's HTTP routes (see the module's docstring)."""

    def __init__(
        self,
        app: AsgiApp,
        verifier: TaskTokenVerifier,
        routes: Sequence[Route],
        *,
        public: Iterable[str] = (),
    ) -> None:
        self.app = app
        self._verifier = verifier
        self._routes = tuple(routes)
        self._public = tuple(_compile(p)[0] for p in public)
        self._realm = verifier.audience

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if any(p.match(path) for p in self._public):
            await self.app(scope, receive, send)
            return
        if kind != "http":  # websockets: only where declared public
            await send({"type": "websocket.close", "code": 1008})
            return
        method: str = scope.get("method", "GET")
        ref = "-"
        try:
            route, params = self._route(method, path)
            headers = [(k.decode("latin-1"), v) for k, v in scope.get("headers", ())]
            text = bearer_token(headers)
            ref = digest(text)[:16]
            token = await self._verifier.verify(
                text,
                action=route.action,
                resource=route.resource_for(params),
                peer_cert_der=peer_certificate_der(scope),
            )
        except AuthorityError as exc:
            log.info(
                "task token refused: %s %s reason=%s token_sha256=%s",
                method,
                path[:200],
                exc.reason,
                ref,
            )
            await self._refuse(send, exc)
            return
        scope.setdefault("state", {})[STATE_KEY] = token
        log.debug("task token accepted: %s %s jti=%s", method, path[:200], token.jti)
        await self.app(scope, receive, send)

    def _route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        for route in self._routes:
            params = route.match(method, path)
            if params is not None:
                return route, params
        raise PermissionDenied(
            f"{method} {path[:200]} is not open to task tokens", reason="ROUTE_NOT_ALLOWED"
        )

    async def _refuse(self, send: Send, exc: AuthorityError) -> None:
        status, headers, body = refusal(exc, self._realm)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
