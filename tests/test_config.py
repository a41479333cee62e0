"""Config loading: inheritance, deep merge, dotted overrides, refusal of bad input."""
import pytest

from model.engine.config import apply_overrides, load_config


def test_inherit_merges_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {a: 1, vision: {width: 768, depth: 12}}\ntrain: {lr: 1.0e-4}\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\nmodel: {vision: {width: 64}}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=3e-4", "data.shards=[a, b]", "model.vision.depth=2"])
    assert cfg["model"] == {"a": 1, "vision": {"width": 64, "depth": 2}}
    assert cfg["train"]["lr"] == pytest.approx(3e-4)
    assert load_config(tmp_path / "base.yaml", ["train.lr=1e-5"])["train"]["lr"] == pytest.approx(1e-5)
    assert cfg["data"]["shards"] == ["a", "b"]
    assert "inherit" not in cfg


def test_bad_overrides_and_loops_are_refused(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ValueError, match="model.a is not a section"):
        apply_overrides({"model": {"a": 1}}, ["model.a.b=2"])
    # an unquoted `data.shards=dir/{0..2}.tar` reaches us as three overrides: the last would win silently
    expanded = [f"data.shards=dir/{i}.tar" for i in range(3)]
    with pytest.raises(ValueError, match=r"override data.shards is given 3 times in a row; a brace pattern the "
                                         r"shell expanded\? quote it"):
        apply_overrides({"data": {}}, expanded)
    # a default and, later, the user's value for the same key: the later one wins
    assert apply_overrides({}, ["train.lr=1", "train.epochs=2", "train.lr=3"])["train"] == {"lr": 3, "epochs": 2}
    (tmp_path / "x.yaml").write_text("inherit: y.yaml\n")
    (tmp_path / "y.yaml").write_text("inherit: x.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_several_parents_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {x: 1, y: 1}\n")
    (tmp_path / "b.yaml").write_text("model: {y: 2, z: 2}\n")
    (tmp_path / "c.yaml").write_text("inherit: [a.yaml, b.yaml]\nmodel: {z: 3}\n")
    assert load_config(tmp_path / "c.yaml")["model"] == {"x": 1, "y": 2, "z": 3}
