"""graft.v1 over gRPC, what server and client share: the response mapping in both directions
(so service.protocol.grpc and service.client cannot drift apart) and the protocol's constants."""

from service import schemas
from service.stubs.graft.v1 import classifier_pb2 as pb

# Trailing-metadata key that carries GraftError.code, so GraftClient can raise the exact
# subclass (INVALID_ARGUMENT alone cannot tell a bad image from a bad request).
ERROR_CODE_KEY = "graft-error-code"


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
                in_distribution=result.in_distribution,  # None leaves the optional field unset
                ood_score=result.ood_score,
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
                in_distribution=(
                    result.in_distribution if result.HasField("in_distribution") else None
                ),
                ood_score=result.ood_score if result.HasField("ood_score") else None,
            )
            for result in response.results
        ],
    )
