"""`graft publish | push | predict | init-default`, run as a user runs them: the console script."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from support.exports import make_tiny_export
from support.images import encode, random_rgb

from service.store.repository import ModelRepository
from training.commands_models import push_archive

LABELS = ["red", "green", "blue"]
GRAFT = str(Path(sys.executable).parent / "graft")
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def graft(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # Without the suite's TF_CPP_MIN_LOG_LEVEL, so that graft's own log filtering applies.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = [GRAFT, *map(str, args)]
    return subprocess.run(run, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(run: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("export") / "tiny", LABELS)


def test_publish_prints_each_new_version(export_dir, tmp_path):
    root = tmp_path / "models"
    for expected in (1, 2):  # --promote always: no held-out images to gate the second on
        run = graft(
            "publish", export_dir, "--name", "flowers", "--model-root", root, "--promote", "always"
        )
        assert run.returncode == 0, run.stderr
        printed = json.loads(run.stdout.strip().splitlines()[-1])
        assert (printed["version"], printed["promotion"]["state"]) == (expected, "promoted")
    assert ModelRepository(root).verify("flowers", 2).labels == LABELS


def test_publish_refuses_bad_names_and_non_exports_in_one_line(export_dir, tmp_path):
    root = tmp_path / "models"
    assert_one_line_error(
        graft("publish", export_dir, "--name", "../escape", "--model-root", root),
        "invalid model name",
    )
    assert_one_line_error(
        graft("publish", tmp_path, "--name", "flowers", "--model-root", root), "saved_model.pb"
    )
    assert not root.exists() or not ModelRepository(root).models()


def test_predict_prints_one_json_line_per_image_from_the_saved_model(export_dir, tmp_path):
    import tensorflow as tf

    root = tmp_path / "models"
    ModelRepository(root).publish(export_dir, "flowers")
    ModelRepository(root).publish(export_dir, "flowers")
    files = []
    for index, fmt in enumerate(("PNG", "JPEG", "BMP")):
        path = tmp_path / f"image{index}.{fmt.lower()}"
        path.write_bytes(encode(random_rgb(48, 40, seed=index), fmt))
        files.append(path)
    (tmp_path / "notes.txt").write_text("not an image")
    run = graft(
        "predict", *files, tmp_path / "notes.txt", "--name", "flowers", "--model-root", root,
        "--version", 1, "--top-k", 2,
    )  # fmt: skip
    assert run.returncode == 1, "a file that is not an image must make the command fail"
    assert_one_line_error(run, "notes.txt", "plain text", "JPEG, PNG, BMP or GIF")
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(f) for f in files]

    signature = tf.saved_model.load(str(root / "flowers" / "1")).signatures["serving_default"]
    for line, path in zip(lines, files, strict=True):
        probabilities = signature(images=tf.constant([path.read_bytes()]))["probabilities"][0]
        order = np.argsort(-probabilities.numpy())[:2]
        assert [t["label"] for t in line["top_k"]] == [LABELS[i] for i in order]
        assert np.allclose([t["score"] for t in line["top_k"]], probabilities.numpy()[order])
        assert (line["label"], line["score"]) == (
            line["top_k"][0]["label"],
            line["top_k"][0]["score"],
        )


def test_predict_errors_are_one_line(export_dir, tmp_path):
    root = tmp_path / "models"
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_rgb(8, 8), "PNG"))
    assert_one_line_error(
        graft("predict", image, "--name", "ghost", "--model-root", root), "no versions"
    )
    ModelRepository(root).publish(export_dir, "flowers")
    assert_one_line_error(
        graft("predict", image, "--name", "flowers", "--model-root", root, "--version", 4),
        "no version 4",
    )
    assert_one_line_error(
        graft("predict", tmp_path / "missing.jpg", "--name", "flowers", "--model-root", root),
        "no such file",
    )
    (root / "flowers" / "1" / "assets" / "labels.txt").write_text("x\ny\nz\n")
    assert_one_line_error(
        graft("predict", image, "--name", "flowers", "--model-root", root), "does not match"
    )


def test_push_archive_holds_the_export_files_at_its_root(export_dir):
    with tarfile.open(fileobj=io.BytesIO(push_archive(export_dir)), mode="r:gz") as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert all(m.isfile() for m in members.values())
        files = {p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*") if p.is_file()}
        assert set(members) == files
        assert {"saved_model.pb", "graft.json", "assets/labels.txt"} <= files
        packed = archive.extractfile(members["saved_model.pb"]).read()
        assert packed == (export_dir / "saved_model.pb").read_bytes()


def test_push_refuses_a_damaged_export_before_uploading(export_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(export_dir, damaged)
    (damaged / "assets" / "labels.txt").write_text("cat\n")
    assert_one_line_error(
        graft("push", damaged, "--name", "flowers", "--url", "http://127.0.0.1:9"),
        "does not match its manifest",
    )


def test_push_to_an_unreachable_service_fails_in_one_line(export_dir):
    run = graft(
        "push", export_dir, "--name", "flowers", "--url", "http://127.0.0.1:9", "--token", "t",
        timeout=120,
    )  # fmt: skip
    assert_one_line_error(run, "cannot reach http://127.0.0.1:9/models")


@pytest.mark.parametrize("seconds", ["0", "-5", "soon"])
def test_push_refuses_a_timeout_that_could_never_be_met(export_dir, seconds):
    run = graft("push", export_dir, "--name", "flowers", "--url", "http://127.0.0.1:9",
                "--timeout", seconds, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "--timeout" in run.stderr and "Traceback" not in run.stderr


def test_init_default_classifies_chelsea_as_a_cat_through_serving_default(imagenet_model_root):
    """`imagenet_model_root` (conftest) is made by `create_default_model`, the function behind
    `graft init-default`; sharing it saves the suite a minute of export."""
    import skimage.data
    import tensorflow as tf

    from training.backbones import imagenet_labels

    manifest = ModelRepository(imagenet_model_root).verify("imagenet", 1)
    assert manifest.labels == imagenet_labels() and manifest.image_size == 224
    jpeg = encode(skimage.data.chelsea(), "JPEG", quality=90)
    loaded = tf.saved_model.load(str(imagenet_model_root / "imagenet" / "1"))
    outputs = loaded.signatures["serving_default"](images=tf.constant([jpeg]))
    top = int(np.argmax(outputs["probabilities"][0]))
    assert top in CAT_CLASSES, imagenet_labels()[top]
    assert outputs["label"][0].numpy().decode() == imagenet_labels()[top]


def test_init_default_is_idempotent(imagenet_model_root, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(imagenet_model_root, root)
    run = graft("init-default", "--model-root", root, timeout=120)
    assert run.returncode == 0 and "nothing to do" in run.stdout
    assert ModelRepository(root).versions("imagenet") == [1]


@pytest.mark.slow
def test_push_to_a_running_service_publishes_the_next_version(export_dir, tmp_path):
    """The receiving end is the real `graft serve`: a wrong token gets the server's message in
    one line; the right one gets a new, verified version."""
    from support.server import running_server

    root = tmp_path / "models"
    ModelRepository(root).publish(export_dir, "flowers")
    token = "push-test-token-0123"
    with running_server(root, default_model="flowers", env={"GRAFT_ADMIN_TOKEN": token}) as srv:
        url = ("--url", srv.http, "--promote", "always")  # no held-out images to gate on
        refused = graft("push", export_dir, "--name", "flowers", *url, "--token", "x")
        assert_one_line_error(refused, "refused the push (401)")
        pushed = graft("push", export_dir, "--name", "flowers", *url, "--token", token)
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout.strip().splitlines()[-1])["version"] == 2
        # From a file (a mounted secret): the token is on no command line.
        secret = tmp_path / "token"
        secret.write_text(token + "\n")
        from_file = graft("push", export_dir, "--name", "flowers", *url, "--token-file", secret)
        assert from_file.returncode == 0, from_file.stderr
        assert json.loads(from_file.stdout.strip().splitlines()[-1])["version"] == 3
        both = graft(
            "push", export_dir, "--name", "flowers", *url, "--token", token, "--token-file", secret
        )
        assert_one_line_error(both, "not both")
        secret.write_text("")
        empty = graft("push", export_dir, "--name", "flowers", *url, "--token-file", secret)
        assert_one_line_error(empty, "is empty")
    assert ModelRepository(root).verify("flowers", 3).labels == LABELS
