"""Shared test setup: offline environment and the fixture modules of each area."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.shards",
    "tests.fixtures.http_images",
    "tests.fixtures.retrieval",
    "tests.fixtures.slurm",
    "tests.fixtures.training",
    "tests.fixtures.grounding",
    "tests.fixtures.classify",
]


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process entry points (e.g. `model.retrieval.main`) fill RANK/WORLD_SIZE/MASTER_PORT
    for a single process; no test may hand them on to the next one's subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
