"""The demo generator: held-out scenes are unique and never appear in training."""
import json

from demo.make_data import make


def test_held_out_scenes_are_unique_and_unseen(tmp_path):
    info = make(tmp_path, n_train=60, n_test=30, size=32)
    train = json.loads((tmp_path / "train.json").read_text())
    test = json.loads((tmp_path / "test.json").read_text())
    assert info["train"] == len(train) == 60 and info["test"] == len(test) == 30
    test_caps = [t["caption"][0] for t in test]
    assert len(set(test_caps)) == len(test_caps)
    assert not set(test_caps) & {t["caption"] for t in train}
    assert all((tmp_path / t["image"]).stat().st_size > 0 for t in train + test)
