"""Request and response shapes shared by HTTP, gRPC and the Python client."""

from pydantic import BaseModel, Field

DEFAULT_TOP_K = 5  # classes ranked per image when a request does not say how many
# The label of an image flagged out of distribution when the request (or the model's policy)
# asks for `reject_unknown`; graft_predictions_total counts it under this label too.
UNKNOWN_LABEL = "unknown"


class TopClass(BaseModel):
    label: str
    score: float


class ImageResult(BaseModel):
    label: str = Field(
        description="Top-1 class, or `unknown` for an image out of distribution when the "
        "request asks for `reject_unknown` (or the model's policy does)."
    )
    score: float = Field(description="Top-1 probability (of the first class in `top_k`).")
    top_k: list[TopClass] = Field(description="The k most probable classes, most probable first.")
    in_distribution: bool | None = Field(
        None,
        description="Whether the image looks like the training images (its ood_score is within "
        "the version's threshold); null for versions trained without the flag.",
    )
    ood_score: float | None = Field(
        None,
        description="How far the image's features are from the training images' (higher: "
        "further); null for versions trained without the flag.",
    )


class ClassifyResponse(BaseModel):
    model: str
    version: int
    results: list[ImageResult] = Field(description="One result per image, in request order.")


class ImageExplanation(BaseModel):
    label: str = Field(
        description="Top-1 class, the one the heatmap explains; `unknown` for an image out of "
        "distribution when the request asks for `reject_unknown` (or the model's policy does)."
    )
    score: float = Field(description="Top-1 probability.")
    top_k: list[TopClass] = Field(description="The k most probable classes, most probable first.")
    in_distribution: bool | None = Field(
        None, description="Whether the image looks like the training data; null: not measured."
    )
    heatmap_png: str = Field(
        description="Base64 PNG, grayscale, at the model's image size: the Grad-CAM heatmap of "
        "the top-1 class on the backbone's last convolutional block (white: what decided it).",
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/png"},
    )
    overlay_png: str = Field(
        description="Base64 PNG: the heatmap's colours (blue to red) over the image, resized "
        "to the model's image size.",
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/png"},
    )


class ExplainResponse(BaseModel):
    model: str
    version: int
    explanations: list[ImageExplanation] = Field(
        description="One explanation per image, in request order."
    )


class ErrorBody(BaseModel):
    """What every failed HTTP request returns: a machine-readable code and a human message."""

    error: str = Field(description="Stable error code, e.g. `unsupported_media_type`.")
    message: str = Field(description="What went wrong and what to do about it.")
