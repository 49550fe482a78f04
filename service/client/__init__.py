"""graft from Python: `GraftClient(url)` over HTTP, `GraftClient.grpc(target)` over gRPC.

The client side imports nothing of the server: only the shared schemas, errors and gRPC stubs.
"""

from service.client.grpc import GrpcClient
from service.client.http import GraftClient

__all__ = ["GraftClient", "GrpcClient"]
