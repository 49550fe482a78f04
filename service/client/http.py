"""graft from Python: `GraftClient(url)` over HTTP, `GraftClient.grpc(target)` over gRPC.

    with GraftClient("http://localhost:3000") as client:
        response = client.classify(["leaf.jpg", open("b.png", "rb").read()], top_k=3)
        print(response.results[0].label)

Failures raise the `service.errors.GraftError` subclass the server reported (from the
`ErrorBody` code), so `except ModelNotFound:` works the same over HTTP and gRPC.
"""

from collections.abc import Sequence
from types import TracebackType

import httpx

from service.client.grpc import GrpcClient
from service.client.inputs import Image, image_name, read_image
from service.errors import GraftError, error_from_code
from service.schemas import DEFAULT_TOP_K, ClassifyResponse, ErrorBody


class GraftClient:
    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)

    @staticmethod
    def grpc(target: str, *, timeout_s: float = 30.0) -> GrpcClient:
        """The same `classify` over gRPC, e.g. `GraftClient.grpc("localhost:50051")`."""
        return GrpcClient(target, timeout_s=timeout_s)

    def classify(
        self,
        images: Sequence[Image],
        *,
        model: str | None = None,
        version: int | None = None,
        top_k: int = DEFAULT_TOP_K,
        reject_unknown: bool | None = None,
    ) -> ClassifyResponse:
        """Classify encoded images (bytes or file paths) in one request, results in order;
        `reject_unknown` True labels the images out of distribution `unknown` (None: the
        model's policy)."""
        files = [
            ("images", (image_name(image, i), read_image(image))) for i, image in enumerate(images)
        ]
        fields = {"model": model, "version": version, "top_k": top_k}
        data = {key: str(value) for key, value in fields.items() if value is not None}
        if reject_unknown is not None:
            data["reject_unknown"] = "true" if reject_unknown else "false"
        response = self._http.post("/classify", files=files, data=data)
        if response.status_code != 200:
            raise _error(response)
        return ClassifyResponse.model_validate_json(response.content)

    def ready(self) -> bool:
        """True once the server's default model is loaded and warm."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "GraftClient":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _error(response: httpx.Response) -> GraftError:
    try:
        body = ErrorBody.model_validate_json(response.content)
    except ValueError:
        return GraftError(f"HTTP {response.status_code}: {response.text[:200]}")
    return error_from_code(body.error, body.message)
