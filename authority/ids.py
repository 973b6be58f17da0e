"""SPIFFE IDs and trust domains, parsed once and validated on construction.

The rules are those of the SPIFFE ID standard: scheme ``spiffe``; a trust domain of lower-case
letters, digits, ``.``, ``-`` and ``_`` with no port or user info; path segments of letters, digits,
``.``, ``-`` and ``_``, none empty, ``.`` or ``..``; no trailing slash, query or fragment; at most
2048 bytes in all.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from authority.errors import InvalidSpiffeId

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def _check_trust_domain(name: str) -> None:
    if not isinstance(name, str):
        raise InvalidSpiffeId("trust domain must be a string")
    if not name:
        raise InvalidSpiffeId("trust domain is empty")
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    bad = sorted(set(name) - _TD_CHARS)
    if bad:
        if ":" in bad:
            raise InvalidSpiffeId("trust domain must not carry a port")
        if "@" in bad:
            raise InvalidSpiffeId("trust domain must not carry user info")
        raise InvalidSpiffeId(
            "trust domain may hold only lower-case letters, digits, '.', '-' and '_' "
            f"(found {''.join(bad)!r})"
        )


def _check_path(path: str) -> None:
    if not isinstance(path, str):
        raise InvalidSpiffeId("path must be a string")
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeId("path must start with '/'")
    if path.endswith("/"):
        raise InvalidSpiffeId("path must not end with '/'")
    for segment in path[1:].split("/"):
        if not segment:
            raise InvalidSpiffeId("path has an empty segment")
        if segment in {".", ".."}:
            raise InvalidSpiffeId("path must not have '.' or '..' segments")
        bad = sorted(set(segment) - _PATH_CHARS)
        if bad:
            raise InvalidSpiffeId(
                "path segments may hold only letters, digits, '.', '-' and '_' "
                f"(found {''.join(bad)!r})"
            )


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept ``example.org`` or ``spiffe://example.org``."""
        if text.startswith(SCHEME_PREFIX):
            sid = SpiffeId.parse(text)
            if sid.path:
                raise InvalidSpiffeId("a trust domain ID has no path")
            return sid.trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise InvalidSpiffeId("trust_domain must be a TrustDomain")
        _check_path(self.path)
        if len(self.uri.encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not isinstance(text, str):
            raise InvalidSpiffeId("SPIFFE ID must be a string")
        if len(text.encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
        if not text:
            raise InvalidSpiffeId("SPIFFE ID is empty")
        if not text.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeId("SPIFFE ID must start with 'spiffe://' (scheme is lower case)")
        rest = text[len(SCHEME_PREFIX) :]
        if "?" in rest:
            raise InvalidSpiffeId("SPIFFE ID must not have a query")
        if "#" in rest:
            raise InvalidSpiffeId("SPIFFE ID must not have a fragment")
        authority, slash, path = rest.partition("/")
        return cls(TrustDomain(authority), slash + path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain, *segments: str) -> SpiffeId:
        """Each argument is one segment: a ``/`` inside one is refused, not split."""
        for segment in segments:
            if not isinstance(segment, str) or "/" in segment:
                raise InvalidSpiffeId(f"path segment {segment!r} must be a string without '/'")
        return cls(trust_domain, "".join("/" + s for s in segments))

    @property
    def uri(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return self.uri
