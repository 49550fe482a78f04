"""`graft explain IMAGE... --name N`: why a published version decided what it decided.

Per image: the top classes and the Grad-CAM heatmap of the top-1 class, written as two PNGs
(the heatmap over the image, and the raw heatmap in grey), one JSON line; the last line is a
JSON summary. It runs the version's own `explain` signature, which is what `POST /explain`
runs on the server.
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from service.errors import GraftError
from service.gateway.results import image_result
from service.image_check import check_image
from service.schemas import DEFAULT_TOP_K
from service.settings import GraftSettings
from service.store.promotion import resolve_served
from service.store.repository import ModelRepository
from training.cli_errors import fail, one_line_errors
from training.commands_models import ModelRoot, Name
from training.default_model import DEFAULT_MODEL

OVERLAY_SUFFIX = ".overlay.png"
HEATMAP_SUFFIX = ".heatmap.png"


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)


@one_line_errors(OSError, ValueError)
def explain(
    images: Annotated[list[Path], typer.Argument(help="JPEG / PNG / BMP / GIF files.")],
    name: Name = DEFAULT_MODEL,
    model_root: ModelRoot = Path("models"),
    version: Annotated[
        int | None, typer.Option("--version", help="Default: the pinned, else the newest promoted.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the PNGs (created if missing).")
    ] = Path("explanations"),
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="Classes per image.")
    ] = DEFAULT_TOP_K,
) -> None:
    """Explain each image's top-1 class with a Grad-CAM heatmap; one JSON line per image.

    Writes OUT/<image>.overlay.png (the heatmap over the image as the model saw it) and
    OUT/<image>.heatmap.png (the heatmap in grey: white is what decided the class).
    """
    from training.explain import load_explainer, render

    repository = ModelRepository(model_root)
    version = resolve_served(repository, name, version)  # what /explain naming none gets
    manifest = repository.verify(name, version)
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    explainer = load_explainer(repository.version_dir(name, version), f"{name} v{version}")
    out.mkdir(parents=True, exist_ok=True)
    max_pixels = GraftSettings().max_image_pixels
    failures = 0
    for path, stem in zip(images, _stems(images), strict=True):
        try:
            # The service's own checks: format sniffing, pixel limit, EXIF orientation.
            checked = check_image(path.read_bytes(), max_pixels=max_pixels)
            outputs = explainer([checked.data])
        except GraftError as exc:
            typer.echo(f"error: {path}: {exc.message}", err=True)
            failures += 1
            continue
        explanation = render(checked.data, outputs["probabilities"][0], outputs["heatmap"][0])
        overlay, heatmap = out / f"{stem}{OVERLAY_SUFFIX}", out / f"{stem}{HEATMAP_SUFFIX}"
        overlay.write_bytes(explanation.overlay_png)
        heatmap.write_bytes(explanation.heatmap_png)
        result = image_result(explanation.probabilities, manifest.labels, top_k).model_dump()
        line: dict[str, Any] = {"image": str(path), **result}
        typer.echo(json.dumps({**line, "overlay": str(overlay), "heatmap": str(heatmap)}))
    summary = {
        "model": name,
        "version": version,
        "explained": len(images) - failures,
        "failed": failures,
        "out": str(out),
    }
    typer.echo(json.dumps(summary))
    if failures:
        raise typer.Exit(1)


def _stems(images: list[Path]) -> list[str]:
    """Each image's file name without its suffix, made unique with `-2`, `-3`... (two images
    may share one: photos/a.jpg and more/a.png)."""
    used: set[str] = set()
    stems = []
    for path in images:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems
