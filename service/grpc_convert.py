"""graft.v1 ClassifyResponse <-> service.schemas.ClassifyResponse, both directions in one place
so the server (grpc_classifier) and the client (grpc_client) cannot drift apart."""

from service import schemas
from service.grpc_stubs.graft.v1 import classifier_pb2 as pb


def to_proto(response: schemas.ClassifyResponse, request_id: str = "") -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=response.model,
        version=response.version,
        request_id=request_id,
        results=[
            pb.ImageResult(
                label=result.label,
                score=result.score,
                top_classes=[pb.TopClass(label=c.label, score=c.score) for c in result.top_k],
            )
            for result in response.results
        ],
    )


def from_proto(response: pb.ClassifyResponse) -> schemas.ClassifyResponse:
    return schemas.ClassifyResponse(
        model=response.model,
        version=response.version,
        results=[
            schemas.ImageResult(
                label=result.label,
                score=result.score,
                top_k=[schemas.TopClass(label=c.label, score=c.score) for c in result.top_classes],
            )
            for result in response.results
        ],
    )
