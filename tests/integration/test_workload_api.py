"""The SPIFFE Workload API, driven by a raw gRPC client (grpcio with the project's generated
stubs), on the authority's own socket and on a node agent's (each test that applies to both runs
twice). This test process is the workload: the kernel names it.

py-spiffe as the client is in ``tests/conformance/test_py_spiffe_workload_api.py``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from authority._pb import authority_v1_authority_pb2 as apb
from authority._pb import spiffe_workload_pb2 as wpb
from authority._pb import spiffe_workload_pb2_grpc as wgrpc
from authority.agent import NodeAgent
from authority.client import WorkloadClient
from authority.config import Config
from tests.conformance.verifiers import verify_client
from tests.helpers import (
    AGENT_ID,
    Running,
    authority_command,
    running_agent,
    running_authority,
    serve_process,
    short_socket_dir,
    split_der,
    wait_held,
)
from tests.helpers import test_config as make_config
from tests.security._attack import reason_of

HEADER = (("workload.spiffe.io", "true"),)
TD = "spiffe://example.org"
UID = os.getuid()
EXE = os.path.realpath(f"/proc/{os.getpid()}/exe")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Api:
    running: Running
    socket: Path
    agent: NodeAgent | None = None  # set when a node agent serves the API

    async def entry(
        self, path: str, *selectors: str, x509_ttl: int = 0, force: bool = False
    ) -> str:
        """Create the entry (a node entry of the agent, with one); with an agent, wait until
        it holds an SVID for it."""
        created = await self.running.admin().stub.CreateEntry(
            apb.CreateEntryRequest(
                spiffe_id=f"{TD}/{path}",
                selectors=[apb.Selector(type="unix", value=s) for s in selectors],
                x509_ttl_seconds=x509_ttl,
                parent_id=AGENT_ID if self.agent else "",
                force=force,
            )
        )
        if self.agent is not None:
            await wait_held(self.agent, created.id)
        return created.id

    async def revoke(self, kind: str, target: str) -> None:
        """Revoke; with an agent, return once its feed has the revocation (a relying service
        sees it as soon, the stream tests time what the workload sees)."""
        response = await self.running.admin().stub.Revoke(
            apb.RevokeRequest(kind=kind, target=target, reason="test")
        )
        if self.agent is not None:
            head = max(r.seq for r in response.revocations)
            async with asyncio.timeout(2.0):
                while self.agent.feed_seq < head:  # noqa: ASYNC110 - a counter, no event
                    await asyncio.sleep(0.005)

    async def rotate(self) -> None:
        await self.running.admin().stub.RotateCA(apb.RotateCARequest())

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix:{self.socket}")


def _config(tmp_path: Path, socket_dir: Path) -> Config:
    return dataclasses.replace(
        make_config(tmp_path / "data", socket_dir, min_ttl=dt.timedelta(seconds=4)),
        workload_api_socket=socket_dir / "workload.sock",
    )


@pytest.fixture(params=["authority", "agent"])
async def api(
    request: pytest.FixtureRequest, tmp_path: Path, socket_dir: Path
) -> AsyncIterator[Api]:
    async with running_authority(_config(tmp_path, socket_dir)) as running:
        if request.param == "authority":
            yield Api(running, socket_dir / "workload.sock")
            return
        agent_socket = socket_dir / "agent.sock"
        async with running_agent(running, agent_socket, tmp_path / "agent") as agent:
            yield Api(running, agent_socket, agent)


@pytest.fixture
async def own_api(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Api]:
    """The authority's own Workload API alone (for what concerns its attestor instance)."""
    async with running_authority(_config(tmp_path, socket_dir)) as running:
        yield Api(running, socket_dir / "workload.sock")


async def _next(call: Any, within: float = 3.0) -> Any:
    async with asyncio.timeout(within):
        message = await call.read()
    assert isinstance(message, Message), "the stream ended"
    return message


# --- the definition --------------------------------------------------------------------------


def test_definition_is_the_standard_one() -> None:
    """Same messages, field numbers, types and service as py-spiffe's copy of the standard."""
    from google.protobuf import descriptor_pb2
    from spiffe._proto import workload_pb2 as theirs

    ours_fd, theirs_fd = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    wpb.DESCRIPTOR.CopyToProto(ours_fd)
    theirs.DESCRIPTOR.CopyToProto(theirs_fd)
    assert not ours_fd.package
    assert list(ours_fd.message_type) == list(theirs_fd.message_type)
    assert list(ours_fd.service) == list(theirs_fd.service)
    methods = wpb.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"].methods
    assert {m.full_name for m in methods} == {
        "SpiffeWorkloadAPI.FetchX509SVID",
        "SpiffeWorkloadAPI.FetchX509Bundles",
        "SpiffeWorkloadAPI.FetchJWTSVID",
        "SpiffeWorkloadAPI.FetchJWTBundles",
        "SpiffeWorkloadAPI.ValidateJWTSVID",
    }


@pytest.mark.parametrize("implementation", ["upb", "python"])
@pytest.mark.parametrize("spiffe_first", [True, False])
def test_generated_code_coexists_with_py_spiffe(implementation: str, spiffe_first: bool) -> None:
    """py-spiffe registers the same message names in the default descriptor pool; ours lives in
    a private pool, so both import in one process, either order, either protobuf runtime."""
    ours = (
        "from authority._pb import spiffe_workload_pb2 as ours, spiffe_workload_grpc, "
        "spiffe_workload_pb2_grpc\n"
    )
    theirs = "import spiffe\nfrom spiffe._proto import workload_pb2 as theirs\n"
    check = (
        "m = ours.X509SVIDResponse(svids=[ours.X509SVID(spiffe_id='spiffe://a/b', hint='h')])\n"
        "m.federated_bundles['spiffe://c'] = b'der'\n"
        "back = theirs.X509SVIDResponse.FromString(m.SerializeToString())\n"
        "assert back.svids[0].hint == 'h' and back.federated_bundles['spiffe://c'] == b'der'\n"
        "v = ours.ValidateJWTSVIDResponse(spiffe_id='spiffe://a/b')\n"
        "v.claims.update({'aud': ['x'], 'exp': 1})\n"
        "back = theirs.ValidateJWTSVIDResponse.FromString(v.SerializeToString())\n"
        "assert back.claims['exp'] == 1\n"
        "from google.protobuf import descriptor_pool\n"
        "assert ours.DESCRIPTOR.pool is not descriptor_pool.Default()\n"
        "from google.protobuf.internal import api_implementation\n"
        f"assert api_implementation.Type() == {implementation!r}\n"
    )
    code = (theirs + ours if spiffe_first else ours + theirs) + check
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=ROOT,
        env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- refusals --------------------------------------------------------------------------------


async def test_every_call_requires_the_header(api: Api) -> None:
    await api.entry("w", f"uid:{UID}")
    async with api.channel() as channel:
        stub = wgrpc.SpiffeWorkloadAPIStub(channel)
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: _next(stub.FetchX509SVID(wpb.X509SVIDRequest())),
            lambda: _next(stub.FetchX509Bundles(wpb.X509BundlesRequest())),
            lambda: _next(stub.FetchJWTBundles(wpb.JWTBundlesRequest())),
            lambda: stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["a"])),
            lambda: stub.ValidateJWTSVID(wpb.ValidateJWTSVIDRequest(audience="a", svid="x.y.z")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "workload.spiffe.io" in (err.value.details() or "")
        # A wrong value is no better than none.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.FetchJWTSVID(
                wpb.JWTSVIDRequest(audience=["a"]), metadata=(("workload.spiffe.io", "yes"),)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_caller_no_entry_matches_is_denied(api: Api) -> None:
    await api.entry("someone-else", f"uid:{UID + 4242}")
    await api.entry("other-binary", f"uid:{UID}", "path:/usr/bin/not-this-one")
    async with api.channel() as channel:
        stub = wgrpc.SpiffeWorkloadAPIStub(channel)
        for call in (
            lambda: _next(stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=HEADER)),
            lambda: _next(stub.FetchX509Bundles(wpb.X509BundlesRequest(), metadata=HEADER)),
            lambda: _next(stub.FetchJWTBundles(wpb.JWTBundlesRequest(), metadata=HEADER)),
            lambda: stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["a"]), metadata=HEADER),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "no identity issued"


async def test_jwt_svid_needs_an_audience_and_one_of_the_callers_ids(api: Api) -> None:
    await api.entry("w", f"uid:{UID}")
    async with api.channel() as channel:
        stub = wgrpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.FetchJWTSVID(wpb.JWTSVIDRequest(), metadata=HEADER)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.FetchJWTSVID(
                wpb.JWTSVIDRequest(audience=["a"], spiffe_id=f"{TD}/not-mine"), metadata=HEADER
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_methods_outside_the_standard_are_unimplemented(api: Api) -> None:
    async with api.channel() as channel:
        call = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchWitnessSVID",
            request_serializer=bytes,
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"", metadata=HEADER)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- X.509-SVIDs -----------------------------------------------------------------------------


async def test_fetch_x509_svid_by_uid_path_and_hash(api: Api) -> None:
    exe_sha256 = hashlib.sha256(await asyncio.to_thread(Path(EXE).read_bytes)).hexdigest()
    by_uid = await api.entry("by-uid", f"uid:{UID}")
    await api.entry("by-binary", f"path:{EXE}", f"sha256:{exe_sha256}")
    async with api.channel() as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER
        )
        reply = await _next(call)
        call.cancel()
    assert sorted(s.spiffe_id for s in reply.svids) == [f"{TD}/by-binary", f"{TD}/by-uid"]
    roots = split_der(reply.svids[0].bundle)
    for svid in reply.svids:
        leaf, *intermediates = split_der(svid.x509_svid)
        key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert key.public_key() == leaf.public_key()
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [svid.spiffe_id]
        issuer = next(r for r in roots if r.subject == leaf.issuer)
        leaf.verify_directly_issued_by(issuer)
        assert not intermediates
        assert svid.bundle == reply.svids[0].bundle
    # Recorded as an attestation: identity, issuance and audit.
    assert api.running.server.authority is not None
    records = await api.running.server.authority.audit_records(limit=10_000)
    attested = [json.loads(r.details_json) for r in records if r.kind == "attest.succeeded"]
    attested = [d for d in attested if d.get("entry_id")]  # not the agent's own attestation
    assert {d["entry_id"] for d in attested} >= {by_uid}
    if api.agent is None:
        assert all(d["endpoint"] == "workload_api" and d["pid"] == os.getpid() for d in attested)
    else:  # the agent asked for the entry's SVID; the authority never saw the workload
        assert all(d["endpoint"] == "node_agent" and "pid" not in d for d in attested)
    issued = [r for r in records if r.kind == "x509.issued"]
    assert {r.subject for r in issued} >= {f"{TD}/by-uid", f"{TD}/by-binary"}


async def test_x509_stream_rotates_before_half_life(api: Api) -> None:
    await api.entry("short", f"uid:{UID}", x509_ttl=6)
    async with api.channel() as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER
        )
        first = await _next(call)
        began = time.monotonic()
        second = await _next(call, within=6.0)
        waited = time.monotonic() - began
        call.cancel()
    old, new = split_der(first.svids[0].x509_svid)[0], split_der(second.svids[0].x509_svid)[0]
    assert new.serial_number != old.serial_number
    assert 2.0 <= waited <= 4.5  # half of 6 s, give or take the scheduler
    assert new.not_valid_after_utc > old.not_valid_after_utc
    assert first.svids[0].x509_svid_key != second.svids[0].x509_svid_key
    assert api.running.server.authority is not None
    records = await api.running.server.authority.audit_records(limit=10_000)
    assert any(r.kind == "x509.renewed" and r.subject == f"{TD}/short" for r in records)


async def test_streams_follow_a_ca_rotation(api: Api) -> None:
    await api.entry("w", f"uid:{UID}")
    async with api.channel() as channel:
        stub = wgrpc.SpiffeWorkloadAPIStub(channel)
        svids = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=HEADER)
        x509_bundles = stub.FetchX509Bundles(wpb.X509BundlesRequest(), metadata=HEADER)
        jwt_bundles = stub.FetchJWTBundles(wpb.JWTBundlesRequest(), metadata=HEADER)
        first = await _next(svids)
        assert len(split_der(first.svids[0].bundle)) == 1
        assert len(split_der((await _next(x509_bundles)).bundles[TD])) == 1
        assert len(json.loads((await _next(jwt_bundles)).bundles[TD])["keys"]) == 1

        await api.rotate()  # prepare: the new keys join the bundle
        began = time.monotonic()
        assert len(split_der((await _next(svids, 1.0)).svids[0].bundle)) == 2
        assert len(split_der((await _next(x509_bundles, 1.0)).bundles[TD])) == 2
        jwks = json.loads((await _next(jwt_bundles, 1.0)).bundles[TD])
        assert len(jwks["keys"]) == 2
        assert all(k["use"] == "jwt-svid" and k["kid"] for k in jwks["keys"])
        assert time.monotonic() - began < 1.0

        await api.rotate()  # activate: the SVID is re-issued by the new key
        third = await _next(svids, 2.0)
        old_leaf = split_der(first.svids[0].x509_svid)[0]
        new_leaf = split_der(third.svids[0].x509_svid)[0]
        assert new_leaf.issuer != old_leaf.issuer
        for call in (svids, x509_bundles, jwt_bundles):
            call.cancel()


async def test_revoked_identity_leaves_the_stream_within_a_second(api: Api) -> None:
    await api.entry("keep", f"uid:{UID}")
    await api.entry("doomed", f"uid:{UID}")
    async with api.channel() as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER
        )
        first = await _next(call)
        assert [s.spiffe_id for s in first.svids] == [f"{TD}/doomed", f"{TD}/keep"]

        began = time.monotonic()
        await api.revoke("subject", f"{TD}/doomed")
        second = await _next(call, 1.0)
        assert time.monotonic() - began < 1.0
        assert [s.spiffe_id for s in second.svids] == [f"{TD}/keep"]
        assert second.svids[0].x509_svid == first.svids[1].x509_svid  # the rest is unchanged

        await api.revoke("subject", f"{TD}/keep")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _next(call, 1.0)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # And a new caller gets nothing for either (the revoked entry stays revoked too).
    async with api.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _next(
                wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                    wpb.X509SVIDRequest(), metadata=HEADER
                )
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_entry_created_while_streaming_is_picked_up(api: Api) -> None:
    await api.entry("first", f"uid:{UID}")
    async with api.channel() as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER
        )
        assert len((await _next(call)).svids) == 1
        await api.entry("second", f"uid:{UID}")
        later = await _next(call, 7.0)
        assert sorted(s.spiffe_id for s in later.svids) == [f"{TD}/first", f"{TD}/second"]
        call.cancel()


async def test_entry_updated_while_streaming_is_followed(api: Api) -> None:
    """``entry update`` is pushed like a creation: an entry whose selectors no longer match
    this workload leaves its stream, and comes back when they match again."""
    await api.entry("stays", f"uid:{UID}")
    moving = await api.entry("moving", f"uid:{UID}")
    admin = api.running.admin().stub

    async def update(uid: int) -> None:
        await admin.UpdateEntry(
            apb.UpdateEntryRequest(
                id=moving,
                replace_selectors=True,
                selectors=[apb.Selector(type="unix", value=f"uid:{uid}")],
            )
        )

    async with api.channel() as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER
        )
        first = await _next(call)
        assert sorted(s.spiffe_id for s in first.svids) == [f"{TD}/moving", f"{TD}/stays"]
        await update(UID + 4242)
        gone = await _next(call, 7.0)
        assert [s.spiffe_id for s in gone.svids] == [f"{TD}/stays"]
        await update(UID)
        back = await _next(call, 7.0)
        assert sorted(s.spiffe_id for s in back.svids) == [f"{TD}/moving", f"{TD}/stays"]
        call.cancel()


# --- the attestor instance ---------------------------------------------------------------------


async def test_a_registered_instance_is_used_and_its_svids_work_at_the_authority(
    own_api: Api, tmp_path: Path
) -> None:
    """With a ``unix`` instance registered under ``workload_api_attestor``, its configuration
    applies, and the SVIDs (recorded as its attestations) authenticate over mutual TLS."""
    api = own_api
    admin = api.running.admin().stub
    await admin.RegisterAttestor(
        apb.RegisterAttestorRequest(
            name="unix", plugin="unix", config_json='{"hash_executable": false}'
        )
    )
    exe_sha256 = hashlib.sha256(await asyncio.to_thread(Path(EXE).read_bytes)).hexdigest()
    await api.entry("by-uid", f"uid:{UID}")
    await api.entry("by-hash", f"uid:{UID}", f"sha256:{exe_sha256}")  # hashing is off: no match
    async with api.channel() as channel:
        call = wgrpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wpb.X509SVIDRequest(), metadata=HEADER
        )
        reply = await _next(call)
        call.cancel()
    assert [s.spiffe_id for s in reply.svids] == [f"{TD}/by-uid"]
    svid = reply.svids[0]
    key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in split_der(svid.x509_svid))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in split_der(svid.bundle))
    async with WorkloadClient(
        api.running.address, bundle, svid_chain_pem=pem, svid_key_pem=key_pem
    ) as holder:
        assert (await holder.fetch_jwt(["svc"])).spiffe_id == f"{TD}/by-uid"
        renewed = await holder.renew(ec.generate_private_key(ec.SECP256R1()))
        assert renewed.spiffe_id == f"{TD}/by-uid"

    # Unregistering the instance revokes what it granted, here too.
    await admin.UnregisterAttestor(apb.UnregisterAttestorRequest(name="unix"))
    async with api.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wgrpc.SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                wpb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_instance_of_another_plugin_under_that_name_is_refused(own_api: Api) -> None:
    api = own_api
    await api.running.admin().stub.RegisterAttestor(
        apb.RegisterAttestorRequest(name="unix", plugin="join_token")
    )
    # A join_token instance produces no uid selector: the entry is made with force.
    await api.entry("w", f"uid:{UID}", force=True)
    async with api.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wgrpc.SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                wpb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- JWT-SVIDs -------------------------------------------------------------------------------


def _forge(claims: dict[str, Any], kid: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_validate_jwt_svid_accepts_ours_and_refuses_the_rest(api: Api) -> None:
    await api.entry("w", f"uid:{UID}")
    async with api.channel() as channel:
        stub = wgrpc.SpiffeWorkloadAPIStub(channel)
        fetched = await stub.FetchJWTSVID(
            wpb.JWTSVIDRequest(audience=["svc-a", "svc-b"]), metadata=HEADER
        )
        assert [s.spiffe_id for s in fetched.svids] == [f"{TD}/w"]
        token = fetched.svids[0].svid

        valid = await stub.ValidateJWTSVID(
            wpb.ValidateJWTSVIDRequest(audience="svc-b", svid=token), metadata=HEADER
        )
        assert valid.spiffe_id == f"{TD}/w"
        returned = MessageToDict(valid.claims)
        assert returned["sub"] == f"{TD}/w"
        assert returned["aud"] == ["svc-a", "svc-b"]
        assert returned["exp"] > time.time()

        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        head, body, signature = token.split(".")
        refused = {
            "wrong audience": ("svc-c", token),
            "forged with our kid": ("svc-a", _forge(claims, header["kid"])),
            "alg none": ("svc-a", f"{_b64({'alg': 'none', 'kid': header['kid']})}.{body}."),
            "claims swapped": (
                "svc-a",
                f"{head}.{_b64({**claims, 'sub': f'{TD}/admin'})}.{signature}",
            ),
            "unknown key": ("svc-a", _forge(claims, "not-in-the-bundle")),
            "garbage": ("svc-a", "not-a-jwt"),
        }
        for name, (audience, candidate) in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ValidateJWTSVID(
                    wpb.ValidateJWTSVIDRequest(audience=audience, svid=candidate),
                    metadata=HEADER,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name

        # After a revocation of its subject, the authority no longer vouches for it.
        await api.revoke("subject", f"{TD}/w")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ValidateJWTSVID(
                wpb.ValidateJWTSVIDRequest(audience="svc-a", svid=token), metadata=HEADER
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_fetch_jwt_svid_for_each_identity_or_the_one_asked(api: Api) -> None:
    await api.entry("one", f"uid:{UID}")
    await api.entry("two", f"path:{EXE}")
    async with api.channel() as channel:
        stub = wgrpc.SpiffeWorkloadAPIStub(channel)
        both = await stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
        assert [s.spiffe_id for s in both.svids] == [f"{TD}/one", f"{TD}/two"]
        one = await stub.FetchJWTSVID(
            wpb.JWTSVIDRequest(audience=["a"], spiffe_id=f"{TD}/two"), metadata=HEADER
        )
        assert [s.spiffe_id for s in one.svids] == [f"{TD}/two"]
        claims = jwt.decode(one.svids[0].svid, options={"verify_signature": False})
        assert claims["sub"] == f"{TD}/two"
        assert claims["aud"] == ["a"]
    assert api.running.server.authority is not None
    records = await api.running.server.authority.audit_records(limit=10_000)
    jwt_records = [json.loads(r.details_json) for r in records if r.kind == "jwt.issued"]
    assert all("token" not in d for d in jwt_records)
    if api.agent is None:
        assert len(jwt_records) == 3
        assert all(d["attestor"] == "unix" for d in jwt_records)
    else:  # the agent answered the second ask for /two from its cache
        assert len(jwt_records) == 2
        assert all(d["agent"] == AGENT_ID for d in jwt_records)


# --- the command ------------------------------------------------------------------------------


def _workload_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*authority_command(), "workload", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_option_serves_the_workload_api(tmp_path: Path) -> None:
    """``authority serve --workload-api-socket``, a process of its own: the kernel names this
    (another) process to it."""
    socket_dir = short_socket_dir()
    socket = socket_dir / "api.sock"
    try:
        with serve_process(tmp_path / "data", "--workload-api-socket", str(socket)) as served:
            served.cli(
                "entry", "create", "--spiffe-id", f"{TD}/cli", "--selector", f"unix:uid:{UID}"
            )
            assert socket.stat().st_mode & 0o777 == 0o666
            with grpc.insecure_channel(f"unix:{socket}") as channel:
                stub = wgrpc.SpiffeWorkloadAPIStub(channel)
                reply = stub.FetchJWTSVID(
                    wpb.JWTSVIDRequest(audience=["a"]), metadata=HEADER, timeout=10
                )
            assert [s.spiffe_id for s in reply.svids] == [f"{TD}/cli"]
            assert reply.svids[0].svid not in served.log()  # tokens are never logged

            # The project's own client finds the socket through SPIFFE_ENDPOINT_SOCKET.
            env = {**served.env(), "SPIFFE_ENDPOINT_SOCKET": f"unix://{socket}"}
            out = tmp_path / "fetched"
            fetched = _workload_cli(env, "fetch", "--out", str(out))
            assert fetched.returncode == 0, fetched.stderr
            leaf, *rest = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
            roots = x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())
            sans, _ = verify_client(leaf, roots, rest)
            assert sans == [x509.UniformResourceIdentifier(f"{TD}/cli")]
            assert (out / "svid.key").stat().st_mode & 0o777 == 0o600
            token = _workload_cli(env, "fetch-jwt", "--audience", "svc")
            assert token.returncode == 0, token.stderr
            claims = jwt.decode(token.stdout.strip(), options={"verify_signature": False})
            assert claims["sub"] == f"{TD}/cli"
            assert claims["aud"] == ["svc"]
            unset = {k: v for k, v in env.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
            missing = _workload_cli(unset, "fetch-jwt", "--audience", "svc")
            assert missing.returncode != 0
            assert "SPIFFE_ENDPOINT_SOCKET" in missing.stderr
        assert not socket.exists()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


async def test_entries_may_name_the_configured_workload_api_attestor(
    tmp_path: Path, socket_dir: Path
) -> None:
    """``workload_api_attestor = "local"``: entries for the authority's own Workload API name
    ``local:uid:...`` without an instance registered, and ``unix:`` is then an attestor no
    workload can present (refused SELECTOR_UNKNOWN_ATTESTOR)."""
    config = dataclasses.replace(_config(tmp_path, socket_dir), workload_api_attestor="local")
    async with running_authority(config) as running:
        admin = running.admin().stub
        created = await admin.CreateEntry(
            apb.CreateEntryRequest(
                spiffe_id=f"{TD}/local-one",
                selectors=[apb.Selector(type="local", value=f"uid:{UID}")],
            )
        )
        assert created.id
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.CreateEntry(
                apb.CreateEntryRequest(
                    spiffe_id=f"{TD}/unix-one",
                    selectors=[apb.Selector(type="unix", value=f"uid:{UID}")],
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(err.value) == "SELECTOR_UNKNOWN_ATTESTOR"
