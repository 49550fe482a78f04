"""graft's gRPC server: runs beside BentoML's HTTP server in the entry service process.

BentoML's new service API has no gRPC, so a grpcio asyncio server shares the entry service's
event loop and Gateway: gRPC requests go through the same validation, version manager and
adaptive batches as HTTP ones. It serves graft.v1.ImageClassifier,
tensorflow.serving.PredictionService, inference.GRPCInferenceService (the Open Inference
Protocol, service/protocol/v2), grpc.health.v1.Health and server reflection.
"""

import logging

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_reflection.v1alpha import reflection

from service.gateway import Gateway
from service.protocol.grpc.classifier import ImageClassifierServicer
from service.protocol.grpc.health import GatewayHealthServicer
from service.protocol.grpc.tfserving import PredictionServicer
from service.protocol.v2.grpc_servicer import SERVICE as V2_SERVICE
from service.protocol.v2.grpc_servicer import InferenceServicer
from service.settings import GraftSettings
from service.stubs.graft.v1 import classifier_pb2, classifier_pb2_grpc
from service.stubs.kserve import grpc_predict_v2_pb2_grpc
from service.stubs.tensorflow_serving.apis import (
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

log = logging.getLogger(__name__)

CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["ImageClassifier"].full_name
# Importing prediction_service_pb2 also registers its file for reflection: the stock
# *_pb2_grpc module alone does not load it.
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name[
    "PredictionService"
].full_name
MODEL_SERVICES = (CLASSIFIER_SERVICE, PREDICTION_SERVICE, V2_SERVICE)
DEFAULT_GRACE_S = 5.0


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _options(settings: GraftSettings) -> list[tuple[str, int]]:
    return [
        # Larger messages are refused by grpc core with RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        # A second server on the same port must fail loudly, not silently share it.
        ("grpc.so_reuseport", 0),
        # One connection cannot open calls without bound (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
        # Idle connections are closed (GOAWAY), so that sockets do not pile up.
        ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * 1000)),
    ]


def _bind(server: grpc.aio.Server, address: str) -> None:
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot listen for gRPC on {address} ({exc}); is another server using the port? "
            "Choose another with --grpc-port / GRAFT_GRPC_PORT, or 0 to turn gRPC off"
        ) from exc


async def start_grpc_server(gateway: Gateway, settings: GraftSettings) -> grpc.aio.Server:
    """Start serving on settings.host:settings.grpc_port; stop it with `stop_grpc_server`."""
    # Calls beyond the cap get RESOURCE_EXHAUSTED from grpc itself, before any handler runs.
    server = grpc.aio.server(
        options=_options(settings), maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs
    )
    classifier_pb2_grpc.add_ImageClassifierServicer_to_server(
        ImageClassifierServicer(gateway), server
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(gateway), server
    )
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(gateway), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(
        GatewayHealthServicer(gateway, MODEL_SERVICES), server
    )
    reflection.enable_server_reflection(
        (*MODEL_SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    address = grpc_address(settings.host, settings.grpc_port)
    _bind(server, address)
    await server.start()
    log.info("gRPC listening on %s", address)
    return server


async def stop_grpc_server(server: grpc.aio.Server, grace_s: float = DEFAULT_GRACE_S) -> None:
    """Refuse new calls and give in-flight ones `grace_s` seconds to finish."""
    await server.stop(grace_s)
