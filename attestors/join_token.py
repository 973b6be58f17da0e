"""``join_token``: a single-use, expiring secret that an operator created for one SPIFFE ID.

The evidence is the token itself. The host keeps only its SHA-256 digest and marks it used
atomically, so a token works once; the identity it grants is the one it was created for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from attestors.api import AttestationRefused, AttestContext, Attested, HostServices, require_keys

MAX_TOKEN_CHARS = 256


class JoinTokenAttestor:
    plugin_name: ClassVar[str] = "join_token"
    selector_kinds: ClassVar[frozenset[str]] = frozenset({"spiffe_id"})

    def __init__(self, host: HostServices) -> None:
        self._host = host

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        require_keys(config, allowed=set(), required=set())
        return cls(host)

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested:
        if not evidence or len(evidence) > MAX_TOKEN_CHARS:
            raise AttestationRefused("JOIN_TOKEN_MALFORMED", "the join token is empty or too long")
        try:
            token = evidence.decode("ascii")
        except UnicodeDecodeError:
            raise AttestationRefused(
                "JOIN_TOKEN_MALFORMED", "the join token is not ASCII"
            ) from None
        digest = hashlib.sha256(token.encode()).hexdigest()
        spiffe_id = await self._host.consume_join_token(digest)
        return Attested(
            selectors=(("spiffe_id", spiffe_id),),
            bound_spiffe_id=spiffe_id,
            can_reattest=False,
        )
