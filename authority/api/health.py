"""grpc.health.v1 on the authority's gRPC servers: grpcio-health-checking's asyncio servicer, with
``List`` answered.

The library's servicer leaves ``List`` to its generated base, which raises
``NotImplementedError``: every call logged a traceback (an unauthenticated log amplifier on the
TCP ports). Here it lists the services this servicer knows, as the health protocol defines.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):  # type: ignore[name-defined,misc]
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in dict(self._server_status).items()
            }
        )


__all__ = ["HealthServicer"]
