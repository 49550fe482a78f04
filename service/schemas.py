"""Request and response shapes shared by HTTP, gRPC and the Python client."""

from pydantic import BaseModel, Field

DEFAULT_TOP_K = 5  # classes ranked per image when a request does not say how many


class TopClass(BaseModel):
    label: str
    score: float


class ImageResult(BaseModel):
    label: str = Field(description="Top-1 class.")
    score: float = Field(description="Top-1 probability.")
    top_k: list[TopClass] = Field(description="The k most probable classes, most probable first.")


class ClassifyResponse(BaseModel):
    model: str
    version: int
    results: list[ImageResult] = Field(description="One result per image, in request order.")


class ErrorBody(BaseModel):
    """What every failed HTTP request returns: a machine-readable code and a human message."""

    error: str = Field(description="Stable error code, e.g. `unsupported_media_type`.")
    message: str = Field(description="What went wrong and what to do about it.")
