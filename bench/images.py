"""The benchmark's request payloads: real 256x256 leaf photos, read once into memory."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "plantvillage-apple"
_SUFFIXES = {".jpg", ".jpeg", ".png"}


def data_dir() -> Path:
    """GRAFT_BENCH_DATA, else ../shared/datasets/plantvillage-apple beside the checkout."""
    return Path(os.environ.get("GRAFT_BENCH_DATA", DEFAULT_DATA))


def shown(path: Path) -> str:
    """A path as the committed reports print it: relative to the checkout, so no report
    carries the layout of the machine that ran the benchmark."""
    return os.path.relpath(os.path.abspath(path), REPO_ROOT)


def image_paths(root: Path, count: int) -> list[Path]:
    """`count` files taken round-robin across class folders (sorted, so every run sends the
    same images in the same order)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"benchmark images not found at {root}: set GRAFT_BENCH_DATA to a folder of "
            "class sub-folders of JPEGs (e.g. plantvillage-apple)"
        )
    per_class = [
        sorted(p for p in d.iterdir() if p.suffix.lower() in _SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir()
    ]
    per_class = [files for files in per_class if files]
    if not per_class:
        raise FileNotFoundError(f"no .jpg/.png images under {root}/<class>/")
    picked: list[Path] = []
    index = 0
    while len(picked) < count and any(index < len(files) for files in per_class):
        picked.extend(files[index] for files in per_class if index < len(files))
        index += 1
    return picked[:count]


def load_images(root: Path, count: int) -> list[bytes]:
    return [p.read_bytes() for p in image_paths(root, count)]
