"""JWT-SVID requests the authority must refuse: a JWT-SVID without an audience is a bearer token
for anyone, so no audience, an empty one, or too many are INVALID_ARGUMENT."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from tests.helpers import Running
from tests.security._attack import AGENT, CALL_TIMEOUT, assert_status, rpc_error

BAD_AUDIENCES: dict[str, tuple[list[str], str]] = {
    "no-audience": ([], "NO_AUDIENCE"),
    "empty-string": ([""], "NO_AUDIENCE"),
    "empty-among-valid": (["svc", ""], "NO_AUDIENCE"),
    "too-many": ([f"svc-{i}" for i in range(9)], "INVALID_ARGUMENT"),
    "too-long": (["a" * 257], "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIENCES))
async def test_jwt_svid_with_bad_audience_is_refused(
    authority: Running, tmp_path: Path, case: str
) -> None:
    audience, reason = BAD_AUDIENCES[case]
    holder = await authority.attested(AGENT, tmp_path / "svid")
    stub = await holder.mtls_stub()
    # The control: the same caller gets a token for a proper audience.
    assert (await holder.fetch_jwt(["svc"])).token

    err = await rpc_error(
        stub.FetchJWTSVID(pb.FetchJWTSVIDRequest(audience=audience), timeout=CALL_TIMEOUT)
    )

    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, reason)
