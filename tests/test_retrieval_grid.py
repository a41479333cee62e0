"""The retrieval grid draws a PNG from saved scores and refuses scores of another evaluation."""
import numpy as np
import pytest
from PIL import Image

from demo.make_data import make
from model.tasks.retrieval_grid import draw_grid
from pipeline.annotations import RetrievalEvalDataset


def test_grid_png_and_shape_check(tmp_path):
    make(tmp_path, n_train=2, n_test=8, size=32)
    dataset = RetrievalEvalDataset(tmp_path / "test.json", tmp_path, transform=None)
    t2i = np.random.default_rng(0).normal(size=(8, 8))
    out = draw_grid(t2i, dataset, tmp_path / "grid.png", queries=3, top=4)
    width, height = Image.open(out).size
    assert width > 300 and height > 150
    with pytest.raises(ValueError, match="do not match"):
        draw_grid(t2i[:, :5], dataset, tmp_path / "bad.png")
