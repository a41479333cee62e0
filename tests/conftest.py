"""Shared test setup: offline environment and the fixture modules of each area."""
import os

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
]
