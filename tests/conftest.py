"""The suite's layout and shared fixtures: ``tests/unit/<wing>/`` mirrors the package's wings
(``python -m pytest -q``, the README's test command), ``tests/e2e/`` holds the slow end-to-end
checks (``-m e2e``), ``tests/support/`` the helpers both import by module name."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The shared test helpers (tests/support/) import by their module names.
sys.path.insert(0, str(Path(__file__).parent / "support"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_shapes_overrides(tmp_path_factory) -> list[str]:
    """Overrides for a run small enough for the test suite (seconds per epoch on 2 cores)."""
    cache = tmp_path_factory.mktemp("shapes-cache")
    return [
        f"data.cache_dir={cache}",
        "data.shapes.num_train=512",
        "data.shapes.num_val=64",
        "data.shapes.image_size=32",
        "data.image_size=32",
        "model.embed_dim=32",
        "model.image.width=8",
        "model.text.hidden_size=32",
        "model.text.intermediate_size=64",
        "model.text.num_heads=2",
        "model.text.num_layers=1",
        "train.batch_size=64",
        "train.warmup_steps=2",
        "run.log_every_steps=4",
        "data.preprocess_batch_size=64",
    ]


@pytest.fixture(scope="session")
def retrieval_train_overrides(tmp_path_factory) -> list[str]:
    """A run that learns the 30 shapes classes well (text→image class R@1 ≈ 0.85) in about a
    minute on 2 cores: for tests that need a model worth searching with."""
    cache = tmp_path_factory.mktemp("shapes-cache-retrieval")
    return [
        f"data.cache_dir={cache}",
        "data.shapes.num_train=6000",
        "data.shapes.num_val=120",
        "data.shapes.image_size=32",
        "data.image_size=32",
        "model.embed_dim=32",
        "model.image.width=16",
        "model.text.hidden_size=32",
        "model.text.intermediate_size=64",
        "model.text.num_heads=2",
        "model.text.num_layers=1",
        "train.batch_size=64",
        "train.epochs=6",
        "train.lr=0.004",
        "train.warmup_steps=10",
        "run.log_every_steps=50",
        "data.preprocess_batch_size=64",
    ]


def pytest_configure(config):
    # Keep Ray's and tokenizers' side chatter out of test output and off the two cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ is an end-to-end check (marker e2e), and nothing else is."""
    for item in items:
        inside = Path(str(item.path)).resolve().is_relative_to(E2E)
        if inside and "e2e" not in item.keywords:
            item.add_marker(pytest.mark.e2e)
        assert inside or item.get_closest_marker("e2e") is None, f"{item.nodeid}: an e2e check belongs in tests/e2e/"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 4 CPUs for one test module's Ray Train runs."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback (tests/support/s3_server.py), for one test module."""
    from s3_server import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """The built-in dataset at the tiny runs' size, as Parquet shards with a classes.txt."""
    from vcl_dist.data.shapes import ensure_shapes_dataset

    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), 512, 64, 32, 2, seed=0)


@pytest.fixture(scope="module")
def s3_local_ray(s3_endpoint):
    """A local Ray started after the S3 test credentials are set, so that its workers inherit them."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()
