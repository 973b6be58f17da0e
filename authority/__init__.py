"""A SPIFFE credential authority for autonomous agents: attest, exchange, revoke, account."""

__version__ = "0.1.0"
