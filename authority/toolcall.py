"""What binds a task token to one MCP tool call: names, the intent, the argument digest.

Shared by the three places that must agree byte for byte: the authority (Exchange derives the
intent from a ``ToolCall`` and decides it), the gateway (it recomputes the digest of the call it
is asked to forward and compares it with the token's) and the agent's client library (it asks
for the token of the exact call it is about to make).

- the intent of a call of tool ``T`` on the server named ``S`` at the gateway is the action
  ``tools.call`` on the resource ``mcp/S/T``, with the one frozen parameter
  ``mcp.arguments_sha256``;
- the arguments' digest is the lower-case hex SHA-256 of their RFC 8785 (JSON Canonicalization
  Scheme) serialisation: UTF-8, object members sorted by UTF-16 code units, no insignificant
  white space, numbers in their shortest ECMAScript form (so ``1.0`` and ``1`` are one value, as
  they are to JSON itself). Absent arguments are the empty object. The ``rfc8785`` library does
  the serialisation;
- arguments are a JSON object of bounded size and depth, with no duplicate member names, and
  no number JSON cannot carry (NaN, infinities) or that an IEEE double cannot hold exactly as an
  integer beyond 2**53 (two different integers must never share a digest).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import rfc8785

from authority.errors import InvalidArgument
from authority.models import json_depth

ACTION = "tools.call"
RESOURCE_KIND = "mcp"
ARGUMENTS_PARAMETER = "mcp.arguments_sha256"
PARAMETER_PREFIX = "mcp."  # reserved: only the authority sets parameters under it
MAX_ARGUMENTS_BYTES = 64 * 1024
MAX_ARGUMENTS_DEPTH = 16
MAX_SAFE_INTEGER = 2**53 - 1
SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # as the MCP specification advises
BAD_TOOL_CALL = "BAD_TOOL_CALL"


def check_server(name: str) -> str:
    if not isinstance(name, str) or not SERVER_NAME.fullmatch(name):
        raise InvalidArgument(
            "an MCP server's name is 1..63 lower-case letters, digits, '_' or '-'",
            reason=BAD_TOOL_CALL,
        )
    return name


def check_tool(name: str) -> str:
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            "a tool's name is 1..128 letters, digits, '_', '-' or '.'", reason=BAD_TOOL_CALL
        )
    return name


def resource(server: str, tool: str) -> str:
    """The resource a call of ``tool`` on ``server`` acts on: ``mcp/<server>/<tool>``."""
    return f"{RESOURCE_KIND}/{check_server(server)}/{check_tool(tool)}"


def parse_resource(name: str) -> tuple[str, str] | None:
    """(server, tool) of a tool-call resource, or None when ``name`` is not one."""
    kind, _, rest = name.partition("/")
    server, _, tool = rest.partition("/")
    if kind != RESOURCE_KIND or not SERVER_NAME.fullmatch(server) or not TOOL_NAME.fullmatch(tool):
        return None
    return server, tool


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgument(f"member {key[:64]!r} appears twice", reason=BAD_TOOL_CALL)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise InvalidArgument(f"{name} is not a JSON number", reason=BAD_TOOL_CALL)


def _check_numbers(value: Any) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise InvalidArgument(
                "an integer argument must lie within +-(2**53 - 1)", reason=BAD_TOOL_CALL
            )
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument("arguments hold only finite numbers", reason=BAD_TOOL_CALL)
    elif isinstance(value, Mapping):
        for item in value.values():
            _check_numbers(item)
    elif isinstance(value, list):
        for item in value:
            _check_numbers(item)


def parse_arguments(text: str | bytes) -> dict[str, Any]:
    """A call's arguments from their JSON text: an object ("" is the empty one), bounded, with no
    duplicate member. Anything else is ``InvalidArgument`` (BAD_TOOL_CALL)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("arguments are not UTF-8", reason=BAD_TOOL_CALL) from None
    if not text.strip():
        return {}
    if len(text.encode()) > MAX_ARGUMENTS_BYTES:
        raise InvalidArgument(
            f"arguments are at most {MAX_ARGUMENTS_BYTES} bytes of JSON", reason=BAD_TOOL_CALL
        )
    if json_depth(text) > MAX_ARGUMENTS_DEPTH:
        raise InvalidArgument(
            f"arguments nest at most {MAX_ARGUMENTS_DEPTH} levels", reason=BAD_TOOL_CALL
        )
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ValueError as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise InvalidArgument(f"arguments are not JSON: {exc}", reason=BAD_TOOL_CALL) from None
    return check_arguments(value)


def check_arguments(value: object) -> dict[str, Any]:
    """``value`` (already parsed) as call arguments: a JSON object whose numbers are finite and
    whose integers are exact as doubles; None is the empty object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument("a tool call's arguments are a JSON object", reason=BAD_TOOL_CALL)
    _check_numbers(value)
    return value


def canonical(arguments: Mapping[str, Any] | None) -> bytes:
    """RFC 8785 canonical JSON of ``arguments`` (None: ``{}``)."""
    try:
        return rfc8785.dumps(dict(arguments or {}))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"arguments cannot be canonicalised: {exc}", reason=BAD_TOOL_CALL
        ) from None


def arguments_digest(arguments: Mapping[str, Any] | None) -> str:
    """The digest a token's ``mcp.arguments_sha256`` carries for these arguments."""
    return hashlib.sha256(canonical(check_arguments(dict(arguments or {})))).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of one tool on one MCP server, with its exact arguments."""

    server: str
    tool: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_server(self.server)
        check_tool(self.tool)
        object.__setattr__(self, "arguments", check_arguments(dict(self.arguments)))

    @classmethod
    def from_json(cls, server: str, tool: str, arguments_json: str | bytes) -> ToolCall:
        return cls(server, tool, parse_arguments(arguments_json))

    @property
    def resource(self) -> str:
        return resource(self.server, self.tool)

    @property
    def digest(self) -> str:
        return arguments_digest(self.arguments)

    def arguments_json(self) -> str:
        """The arguments as canonical JSON text (what an Exchange request carries)."""
        return canonical(self.arguments).decode()

    def parameters(self) -> dict[str, str]:
        """The frozen parameters of the call's intent."""
        return {ARGUMENTS_PARAMETER: self.digest}
