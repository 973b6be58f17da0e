"""``authority gateway``: an MCP gateway that admits a tool call only with a task token for that
exact call (the token's resource ``mcp/<server>/<tool>``, its argument digest, bound to the
caller's certificate), cuts streamed calls whose token is revoked, shows each caller only the
tools it may call, and records every call in the authority's audit chain.

- ``config``: the TOML configuration (``load``), every error naming its key;
- ``app``: the ASGI application (per-request checks, relaying, refusals in the MCP
  authorization specification's shape);
- ``audit``: the batched, bounded ``RecordToolCalls`` queue;
- ``run``: the program (its SVID from the Workload API, the authority over mutual TLS).
"""
