"""``sample``: a test attestor plugin shipped as its own distribution.

The evidence is a shared secret; the instance is configured with its SHA-256 (never the secret
itself) and the name of the one workload that holds it. It depends on ``attestors.api`` only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from attestors.api import (
    AttestationRefused,
    AttestContext,
    Attested,
    ConfigError,
    HostServices,
    require_keys,
)

__all__ = ["SampleAttestor"]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_SECRET_BYTES = 1024


class SampleAttestor:
    plugin_name: ClassVar[str] = "sample"

    def __init__(self, secret_digest: str, workload_name: str) -> None:
        self._digest = secret_digest
        self._name = workload_name

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        require_keys(
            config,
            allowed={"secret_digest", "workload_name"},
            required={"secret_digest", "workload_name"},
        )
        digest = config["secret_digest"]
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ConfigError("secret_digest must be a SHA-256 digest in lower-case hex")
        name = config["workload_name"]
        if not isinstance(name, str) or not name:
            raise ConfigError("workload_name must be a non-empty string")
        try:
            Attested(selectors=(("name", name),))
        except ValueError as exc:
            raise ConfigError(f"workload_name: {exc}") from None
        return cls(digest, name)

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested:
        if not evidence or len(evidence) > MAX_SECRET_BYTES:
            raise AttestationRefused("SAMPLE_MALFORMED", "the secret is empty or too long")
        digest = hashlib.sha256(evidence).hexdigest()
        if not hmac.compare_digest(digest, self._digest):
            raise AttestationRefused("SAMPLE_MISMATCH", "the secret does not match")
        return Attested(selectors=(("name", self._name),))
