"""Strict, typed run configs; `--dry-run` on every shipped config; one direction of imports.

Everything here runs in-process without a process group: a bad config must stop
`model/train.py` (exit 2, one line naming the key) before any rank starts.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from model.cli import train_main
from model.engine.settings import TrainSettings
from model.settings import build_settings
from model.tasks import RECIPES, load_run, recipe_class
from tests.fixtures.shards import write_shards

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
DS = str(REPO / "ds_configs" / "zero2_cpu.json")


def _train_error(capsys, *overrides: str) -> str:
    code = train_main(["--config", TINY, "--deepspeed_config", DS, "--dry-run", "data.shards=/nowhere/a.tar",
                       *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("override, expected", [
    ("trian.lr=1e-3", "unknown setting trian; did you mean train?"),
    ("train.lrr=5e-4", "unknown setting train.lrr; did you mean train.lr?"),
    ("train.batch_size_per_gpu=32", "unknown setting train.batch_size_per_gpu; did you mean train.batch_size_per_rank?"),
    ("train.lr=abc", "train.lr='abc' must be a number"),
    ("train.epochs=2.5", "train.epochs=2.5 must be an integer"),
    ("train.log_every=0", "train.log_every=0 must be a positive integer"),
    ("data.shufle_buffer=5", "unknown setting data.shufle_buffer; did you mean data.shuffle_buffer?"),
    ("model.vision.widht=64", "unknown setting model.vision.widht; did you mean model.vision.width?"),
    ("train.loss_weights={itcc: 0.5}", "train.loss_weights: itcc is not a loss of task pretrain"),
    ("task=vq", "task: 'vq' is unknown"),
    ("train.stop_signals=[SIGFOO]", "'SIGFOO' is not a signal name"),
])
def test_config_typos_exit_2_with_one_line(capsys, override, expected):
    assert expected in _train_error(capsys, override)


def test_env_references_expand_in_the_loader_only(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDS_AT", str(tmp_path))
    _, run = load_run(TINY, ["data.shards=${SHARDS_AT}/{00000..00001}.tar"])
    assert run.data.shards == f"{tmp_path}/{{00000..00001}}.tar"
    assert run.raw["data"]["shards"] == "${SHARDS_AT}/{00000..00001}.tar"
    monkeypatch.delenv("SHARDS_AT")
    with pytest.raises(ValueError, match=r"\$\{SHARDS_AT\}, which is not set"):
        load_run(TINY, ["data.shards=${SHARDS_AT}/a.tar"])


def test_settings_types_are_checked():
    with pytest.raises(ValueError, match=r"train.betas=\[0.9\] must have 2 entries"):
        build_settings(TrainSettings, {"betas": [0.9]}, "train")
    with pytest.raises(ValueError, match="train.loss_weights.itc='x' must be a number"):
        build_settings(TrainSettings, {"loss_weights": {"itc": "x"}}, "train")
    t = build_settings(TrainSettings, {"betas": [0.9, 0.98], "lr": 1}, "train")
    assert t.betas == (0.9, 0.98) and t.lr == 1.0 and isinstance(t.lr, float)


# ---------------------------------------------------------------- --dry-run on every shipped config
def _pretrain_data(root: Path) -> None:
    for source in ("cc3m", "cc3m_val", "sbu", "coco", "vg", "cc12m"):
        write_shards(root / source, (70,), seed=1)


def _retrieval_data(root: Path) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "img" / "a.jpg")
    train = [{"image": "a.jpg", "caption": f"a picture number {i}", "image_id": i} for i in range(40)]
    test = [{"image": "a.jpg", "caption": ["a picture"]}]
    for name in ("coco", "flickr30k"):
        (root / f"{name}_train.json").write_text(json.dumps(train))
        for split in ("val", "test"):
            (root / f"{name}_{split}.json").write_text(json.dumps(test))
    (root / "coco" / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "coco" / "images" / "a.jpg")
    (root / "flickr30k").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "flickr30k" / "a.jpg")


DRY_RUN_DATA = {
    "pretrain_4m.yaml": _pretrain_data, "pretrain_14m.yaml": _pretrain_data,
    "retrieval_coco.yaml": _retrieval_data, "retrieval_flickr.yaml": _retrieval_data,
}


@pytest.fixture(scope="module")
def albef_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("albef_data")
    for make in set(DRY_RUN_DATA.values()):
        make(root)
    return root


@pytest.mark.parametrize("config", sorted(DRY_RUN_DATA))
def test_dry_run_on_shipped_configs(config, albef_data, monkeypatch, capsys):
    monkeypatch.setenv("ALBEF_DATA", str(albef_data))
    code = train_main(["--config", str(REPO / "configs" / config), "--deepspeed_config",
                       str(REPO / "ds_configs" / "zero2.json"), "--dry-run", "--world-size", "1",
                       "--checkpoint", "pretrained.pth"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("[dry-run] task ") and "global batch" in out and "optimiser steps" in out


def test_every_shipped_task_config_is_typed():
    """Each config with a `task:` builds into its recipe's typed sections (data files are not read)."""
    seen = set()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        from model.engine.config import load_config
        raw = load_config(path)
        if "task" not in raw or "model" not in raw:
            continue
        seen.add(raw["task"])
        # pretraining configs for tests and the demo get their shards on the command line
        data_keys = {f.name for f in dataclasses.fields(recipe_class(raw["task"]).data_settings)}
        needs_shards = "shards" in data_keys and not (raw.get("data") or {}).get("shards")
        _, run = load_run(path, ["data.shards=a.tar"] if needs_shards else [])   # raises on a bad key or type
        assert run.task == raw["task"]
    assert {"pretrain", "retrieval"} <= seen <= set(RECIPES)


def test_no_import_cycles_and_no_module_imports_an_entry():
    tool = REPO / "tests" / "import_cycles.py"
    proc = subprocess.run([sys.executable, str(tool), "model", "pipeline"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 import cycles" in proc.stdout
    entries = {"model.train", "model.evaluate", "model.retrieval", "model.plot"}
    for path in list((REPO / "model").rglob("*.py")) + list((REPO / "pipeline").rglob("*.py")):
        text = path.read_text()
        for entry in entries:
            assert f"from {entry} import" not in text and f"import {entry}\n" not in text, (path, entry)
