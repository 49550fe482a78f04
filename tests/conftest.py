"""Shared fixtures. Tests never need ../shared: images are generated or come from skimage."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


# -- serving: a really trained tiny model, published once per session ------------------------
import pytest


@pytest.fixture(scope="session")
def colour_export(tmp_path_factory: pytest.TempPathFactory):
    """An export folder of a tiny classifier trained on red/green/blue images (support.trained)."""
    from support.trained import train_colour_export

    return train_colour_export(tmp_path_factory.mktemp("colour") / "export")


@pytest.fixture(scope="session")
def colour_model_root(tmp_path_factory: pytest.TempPathFactory, colour_export):
    """A model root holding `colours` version 1. Read-only: copy it before changing anything."""
    from service.store.repository import ModelRepository

    root = tmp_path_factory.mktemp("models")
    ModelRepository(root).publish(colour_export, "colours")
    return root


@pytest.fixture(scope="session")
def imagenet_model_root(tmp_path_factory: pytest.TempPathFactory):
    """A model root holding the ImageNet default (`imagenet` v1), as `graft init-default` makes
    it. Slow (about a minute of export): share this one. Read-only."""
    from service.store.repository import ModelRepository
    from training.default_model import create_default_model

    root = tmp_path_factory.mktemp("imagenet")
    create_default_model(ModelRepository(root))
    return root


@pytest.fixture(scope="module")
def v2_server(colour_model_root):
    """A real `graft serve` of `colours` on loopback, HTTP and gRPC, for the outside V2 clients'
    tests (support.v2_clients); one per test module. A batch thread waits up to 100 ms for more
    images: test_v2_clients.py's shared-batch test relies on it, and on a separate inference
    worker, which it pauses."""
    from support.server import running_server

    env = {"GRAFT_BATCH_TIMEOUT_MS": "100", "GRAFT_BATCH_THREADS": "1"}
    with running_server(
        colour_model_root, default_model="colours", grpc=True, separate_inference=True, env=env
    ) as server:
        yield server
