"""The local endpoint: the Workload service's attestation on a Unix socket, served by grpclib
(``grpclib_server.UnixSocketServer``: message size and malformed wire input refused there).

grpcio's server does not expose a Unix-socket peer's credentials; grpclib's stream keeps its
transport, whose socket answers ``SO_PEERCRED`` (pid, uid, gid recorded by the kernel at
connect) and ``SO_PEERPIDFD`` (a pidfd for exactly the process that connected, Linux >= 6.5).
On older kernels the pid is pinned with ``pidfd_open`` and the ``unix`` attestor rejects a
process that started after the connection (a reused PID). Only Attest, GetBundle,
GetServerInfo and Ping are served here; SVID-authenticated calls use mutual TLS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from typing import Any

import grpclib.exceptions
import grpclib.server
from grpclib.const import Status

from attestors.api import PeerCredentials
from authority._pb import authority_v1_authority_grpc as pb_grpclib
from authority._pb import authority_v1_authority_pb2 as pb
from authority.api.convert import attest_params, attest_response, bundle_to_pb
from authority.api.grpclib_server import peer_cred
from authority.api.status import fail_grpclib_stream
from authority.errors import AuthorityError, Internal, InvalidArgument
from authority.service import Authority

log = logging.getLogger(__name__)

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_UNIMPLEMENTED = "served only on the mutual-TLS endpoint"

Stream = grpclib.server.Stream[Any, Any]


def _pid_of_pidfd(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as fh:
        for line in fh:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


def peer_credentials(stream: Stream) -> PeerCredentials:
    """The kernel's word on who is at the other end of this stream's Unix socket."""
    # grpclib keeps the transport on its Peer object; it has no public accessor for the socket.
    transport = stream.peer._transport
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        raise Internal("the local endpoint is not on a Unix socket")
    connected_at = time.clock_gettime(time.CLOCK_BOOTTIME)
    pid, uid, gid = peer_cred(sock)
    pidfd: int | None
    try:
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        pinned = _pid_of_pidfd(pidfd)
        if pinned > 0:
            pid = pinned
    except OSError:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    return PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=pidfd, connected_at=connected_at)


class _Context:
    def __init__(self, stream: Stream, peer: PeerCredentials) -> None:
        self._stream = stream
        self.peer = peer

    async def challenge(self, payload: bytes) -> bytes:
        await self._stream.send_message(pb.AttestResponse(challenge=payload))
        reply = await self._stream.recv_message()
        if reply is None:
            raise InvalidArgument("the stream ended before the challenge was answered")
        if reply.WhichOneof("step") != "challenge_response":
            raise InvalidArgument("expected a challenge_response")
        return bytes(reply.challenge_response)


class LocalWorkloadService(pb_grpclib.WorkloadBase):
    def __init__(self, authority: Authority, info: pb.ServerInfo) -> None:
        self._authority = authority
        self._info = info

    async def Attest(self, stream: Stream) -> None:
        peer: PeerCredentials | None = None
        try:
            peer = peer_credentials(stream)
            params = attest_params(await stream.recv_message())
            result = await self._authority.attest(
                attestor=params.attestor,
                evidence=params.evidence,
                csr=params.csr,
                challenger=_Context(stream, peer),
                spiffe_id_hint=params.spiffe_id_hint,
            )
            await stream.send_message(attest_response(result, self._authority.ca.bundle()))
        except AuthorityError as exc:
            await fail_grpclib_stream(stream, exc)
        except Exception:
            log.exception("unhandled error in local Attest")
            await fail_grpclib_stream(stream, Internal("unexpected"))
        finally:
            if peer is not None and peer.pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(peer.pidfd)

    async def GetBundle(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(bundle_to_pb(self._authority.ca.bundle()))

    async def GetServerInfo(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(self._info)

    async def Ping(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(pb.PingResponse())

    async def RenewX509SVID(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def FetchJWTSVID(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def Exchange(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def Delegate(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def EndTask(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def GetApproval(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def GetTaskKeys(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def WatchRevocations(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def SyncAgent(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def SignAgentSVIDs(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def FetchAgentJWTSVID(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def ListCallableTools(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)

    async def RecordToolCalls(self, stream: Stream) -> None:
        raise grpclib.exceptions.GRPCError(Status.UNIMPLEMENTED, _UNIMPLEMENTED)
