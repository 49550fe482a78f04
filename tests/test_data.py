"""Scanning, validation, splitting, the tf.data pipeline and the metrics maths."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from training_images import make_dataset, shape_image

from training.evaluate import classification_metrics
from training.pipeline import class_weights, image_dataset
from training.preprocess import decode_and_resize, decode_rgb
from training.scan import DataError, Dataset, Sample, scan
from training.split import split


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("shapes"), per_class={"circle": 10, "square": 6, "triangle": 4}
    )


def test_scan_finds_sorted_classes_and_every_format(shapes: Path, tmp_path: Path) -> None:
    dataset = scan(shapes, tmp_path)
    assert dataset.classes == ["circle", "square", "triangle"]
    assert dataset.counts() == [10, 6, 4]
    assert {s.path.suffix for s in dataset.samples} == {".jpeg", ".png", ".bmp", ".gif"}
    assert dataset.rejected == []
    assert dataset.fingerprint.startswith("sha256:")


def test_fingerprint_is_stable_and_tracks_content(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", per_class=3)
    first = scan(root, tmp_path / "w").fingerprint
    assert scan(root, tmp_path / "w").fingerprint == first
    target = root / "circle" / "000.jpeg"
    shape_image("circle", np.random.default_rng(99)).save(target, format="JPEG")
    assert scan(root, tmp_path / "w").fingerprint != first


def _write_corrupt_files(folder: Path) -> None:
    good = io.BytesIO()
    shape_image("circle", np.random.default_rng(1)).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "notes.txt").write_text("not an image at all\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def test_corrupt_and_unsupported_files_are_reported_not_raised(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", per_class=4)
    _write_corrupt_files(root / "circle")
    (root / "square" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored entirely
    dataset = scan(root, tmp_path / "w")
    assert dataset.counts() == [4, 4, 4]
    rejected = sorted(r.path.name for r in dataset.rejected)
    assert rejected == ["empty.png", "fake.png", "notes.txt", "truncated.jpg"]
    summary = dataset.rejected_summary(first=2)
    assert summary.startswith("skipped 4 unreadable or unsupported file(s)")
    assert "and 2 more" in summary


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("empty", "no class sub-folders"),
        ("one_class", "only one class"),
        ("only_corrupt", "no readable images"),
        ("tiny_class", "at least 2 readable images"),
    ],
)
def test_untrainable_folders_raise_a_clear_error(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "d"
    if layout == "file":
        root.write_text("x")
    elif layout == "empty":
        root.mkdir()
    elif layout == "one_class":
        make_dataset(root, per_class=3, classes=("circle",))
    elif layout == "only_corrupt":
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            _write_corrupt_files(root / name)
    elif layout == "tiny_class":
        make_dataset(root, per_class={"circle": 3, "square": 1})
    with pytest.raises(DataError, match=message):
        scan(root, tmp_path / "w")


def test_exif_rotated_jpeg_is_trained_upright_like_serving(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", per_class=2)
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(root / "circle" / "phone.jpg", format="JPEG", exif=exif)
    dataset = scan(root, tmp_path / "w")
    phone = next(s for s in dataset.samples if s.path.name == "phone.jpg")
    assert phone.source is not None and phone.source.parent == tmp_path / "w"
    assert decode_rgb(phone.path.read_bytes()).shape == (20, 40, 3)  # as stored
    assert decode_rgb(phone.decode_path.read_bytes()).shape == (40, 20, 3)  # as displayed


def _dataset(per_class: dict[str, int]) -> Dataset:
    samples = [
        Sample(Path(f"/d/{name}/{i}.png"), label)
        for label, (name, count) in enumerate(per_class.items())
        for i in range(count)
    ]
    return Dataset(Path("/d"), list(per_class), samples)


def test_split_is_stratified_disjoint_and_complete() -> None:
    dataset = _dataset({"a": 100, "b": 50, "c": 20, "d": 2})
    parts = split(dataset, seed=3)
    everything = parts.train + parts.val + parts.test
    assert sorted(map(str, (s.path for s in everything))) == sorted(
        str(s.path) for s in dataset.samples
    )

    def count(samples: list[Sample], label: int) -> int:
        return sum(s.label == label for s in samples)

    assert [count(parts.test, c) for c in range(4)] == [10, 5, 2, 1]
    assert [count(parts.val, c) for c in range(4)] == [10, 5, 2, 0]
    assert [count(parts.train, c) for c in range(4)] == [80, 40, 16, 1]


def test_split_is_deterministic_per_seed() -> None:
    dataset = _dataset({"a": 30, "b": 30})
    first, again = split(dataset, seed=7), split(dataset, seed=7)
    other = split(dataset, seed=8)
    assert first.test == again.test and first.train == again.train
    assert first.test != other.test


def test_max_per_class_caps_training_but_keeps_the_test_set() -> None:
    dataset = _dataset({"a": 100, "b": 40})
    full, few = split(dataset, seed=1), split(dataset, seed=1, max_per_class=10)
    assert few.test == full.test
    assert [sum(s.label == c for s in few.train) for c in range(2)] == [10, 10]
    assert [sum(s.label == c for s in few.val) for c in range(2)] == [2, 2]
    with pytest.raises(DataError, match="at least 1"):
        split(dataset, max_per_class=0)


def test_split_manifest_round_trips(shapes: Path, tmp_path: Path) -> None:
    dataset = scan(shapes, tmp_path)
    parts = split(dataset, seed=5)
    manifest = json.loads(parts.write(dataset, tmp_path / "r" / "split.json").read_text())
    assert manifest["classes"] == dataset.classes and manifest["seed"] == 5
    assert manifest["fingerprint"] == dataset.fingerprint
    listed = {
        (row["path"], row["label"]) for key in ("train", "val", "test") for row in manifest[key]
    }
    assert listed == {(s.path.relative_to(shapes).as_posix(), s.label) for s in dataset.samples}


def test_class_weights_are_balanced() -> None:
    samples = [Sample(Path("x"), 0)] * 30 + [Sample(Path("y"), 1)] * 10
    assert class_weights(samples, 2) == pytest.approx({0: 40 / 60, 1: 2.0})


def test_pipeline_pixels_are_the_serving_functions_pixels(shapes: Path, tmp_path: Path) -> None:
    dataset = scan(shapes, tmp_path)
    samples = dataset.samples[:5]
    ds = image_dataset(samples, 32, batch_size=4, num_classes=3)
    pixels = np.concatenate([x.numpy() for x, _ in ds])
    labels = np.concatenate([y.numpy() for _, y in ds])
    expected = np.stack(
        [decode_and_resize(tf.constant(s.path.read_bytes()), 32).numpy() for s in samples]
    )
    assert pixels.shape == (5, 32, 32, 3) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(labels.argmax(1), [s.label for s in samples])


def test_classification_metrics_by_hand() -> None:
    labels = ["cat", "dog", "owl"]
    y_true = np.array([0, 0, 0, 1, 1, 2])
    probabilities = np.array(
        [
            [0.8, 0.1, 0.1],  # cat ok
            [0.6, 0.3, 0.1],  # cat ok
            [0.2, 0.7, 0.1],  # cat -> dog (cat second)
            [0.1, 0.8, 0.1],  # dog ok
            [0.5, 0.2, 0.3],  # dog -> cat (dog third)
            [0.1, 0.2, 0.7],  # owl ok
        ]
    )
    metrics = classification_metrics(y_true, probabilities, labels, top_k=2)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    cat = metrics["per_class"]["cat"]
    assert (cat["precision"], cat["recall"], cat["support"]) == (
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
        3,
    )
    assert metrics["per_class"]["dog"]["f1"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert metrics["top_k_accuracy"] == {"1": pytest.approx(4 / 6), "2": pytest.approx(5 / 6)}
    assert metrics["most_confused"][0]["count"] == 1
    assert {(p["true"], p["predicted"]) for p in metrics["most_confused"]} == {
        ("cat", "dog"),
        ("dog", "cat"),
    }
