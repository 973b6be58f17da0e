"""The middleware's rule table and refusal answers, without a server (the real thing over TLS
is tests/integration/test_asgi_middleware.py)."""

from __future__ import annotations

import json

import pytest

from authority.asgi import Route, refusal
from authority.errors import (
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)


def test_a_route_matches_its_method_and_path_and_fills_the_resource() -> None:
    route = Route("GET", "/metrics/{env}/{name}", "read", "metrics/{env}/{name}")
    params = route.match("GET", "/metrics/prod/cpu")
    assert params == {"env": "prod", "name": "cpu"}
    assert route.resource_for(params) == "metrics/prod/cpu"
    assert route.match("POST", "/metrics/prod/cpu") is None
    assert route.match("GET", "/metrics/prod/cpu/extra") is None  # {name} is one segment
    assert route.match("GET", "/metrics/prod") is None
    rest = Route("*", "/files/{path:path}", "read", "files/{path}")
    found = rest.match("DELETE", "/files/a/b/c.txt")
    assert found == {"path": "a/b/c.txt"}
    assert rest.resource_for(found) == "files/a/b/c.txt"
    assert Route("GET", "/ping", "read").resource_for({}) is None
    # Regular-expression characters in the literal part are literal.
    assert Route("GET", "/a.b", "read").match("GET", "/axb") is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("get", "/x", "read"), "upper-case"),
        (("GET", "x", "read"), "starts with"),
        (("GET", "/x", "Read"), "lower-case"),
        (("GET", "/{a}/{a}", "read"), "twice"),
        (("GET", "/x", "read", "things/{missing}"), "lacks"),
        (("GET", "/{a", "read"), "parameters"),
    ],
)
def test_a_bad_route_is_refused_when_declared(args: tuple[str, ...], match: str) -> None:
    with pytest.raises(Exception, match=match):
        Route(*args)


def test_refusals_follow_rfc_6750() -> None:
    status, headers, body = refusal(Unauthenticated("none", reason="TOKEN_MISSING"), "api")
    assert status == 401
    assert dict(headers)[b"www-authenticate"] == b'Bearer realm="api"'
    assert json.loads(body) == {
        "error": "invalid_token",
        "reason": "TOKEN_MISSING",
        "message": "none",
    }

    status, headers, _ = refusal(Unauthenticated('bad "x"', reason="TOKEN_EXPIRED"), "api")
    assert (status, dict(headers)[b"www-authenticate"]) == (
        401,
        b'Bearer realm="api", error="invalid_token", error_description="bad \'x\'"',
    )
    status, headers, _ = refusal(PermissionDenied("other", reason="TOKEN_CNF_MISMATCH"), "api")
    assert status == 401
    assert b'error="invalid_token"' in dict(headers)[b"www-authenticate"]
    status, headers, _ = refusal(PermissionDenied("scope", reason="TOKEN_SCOPE"), "api")
    assert status == 403
    assert b'error="insufficient_scope"' in dict(headers)[b"www-authenticate"]
    status, headers, _ = refusal(InvalidArgument("bad", reason="BAD_RESOURCE"), "api")
    assert status == 400
    assert b'error="invalid_request"' in dict(headers)[b"www-authenticate"]
    status, headers, _ = refusal(Unavailable("stale", reason="REVOCATION_FEED_STALE"), "api")
    assert status == 503
    assert dict(headers)[b"retry-after"] == b"1"
    assert b"www-authenticate" not in dict(headers)
    status, _, body = refusal(Internal("secret detail"), "api")
    assert status == 500
    assert b"secret detail" not in body
