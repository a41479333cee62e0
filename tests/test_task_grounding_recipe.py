"""The grounding recipe in one process: retrieval-style batches and losses, the per-split evaluation,
its result record and heatmap pictures (a few steps from random init: the format, not the accuracy)."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from model.albef import text_settings_from_tokenizer
from model.engine.recipe import RunEnv
from model.tasks import load_run
from pipeline.tokenize import load_tokenizer
from tests.fixtures.grounding import grounding_scenes, tiny_init_checkpoint  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def data_overrides(scenes: dict) -> list[str]:
    return [f"data.train_file=[{scenes['train']}]", f"data.val_file={scenes['val']}",
            f"data.test_file={scenes['test']}", f"data.image_root={scenes['root']}"]


@pytest.fixture
def recipe_and_tokenizer(grounding_scenes, tmp_path, torch_single_thread):
    cls, run = load_run(REPO / "configs" / "grounding_tiny.yaml", data_overrides(grounding_scenes))
    tokenizer = load_tokenizer(run.model["text"]["tokenizer"])
    run.model["text"].update(text_settings_from_tokenizer(tokenizer))
    recipe = cls(run, RunEnv(rank=0, world=1, device=torch.device("cpu"), global_batch=16, enqueue_batch=16))
    recipe.out_dir = tmp_path
    return recipe, tokenizer


def test_config_is_the_reference_grounding_recipe():
    cls, run = load_run(REPO / "configs" / "grounding.yaml")
    assert cls.name == "grounding" and cls.select_metric == "val/acc"
    assert run.model["retrieval"] and run.model["vision"]["image_res"] == 384 and run.model["queue_size"] == 65536
    t = run.train
    assert (t.lr, t.warmup_lr, t.min_lr, t.epochs, t.alpha, t.batch_size_per_rank) == (1e-5, 1e-5, 1e-6, 5, 0.4, 32)
    assert (run.eval.gradcam_mode, run.eval.gradcam_layer) == ("itm", 2)
    with pytest.raises(ValueError, match="eval.gradcam_mode='grad' is unknown; known: itm, itc"):
        load_run(REPO / "configs" / "grounding.yaml", ["eval.gradcam_mode=grad"])


def test_training_batches_losses_and_evaluation_record(recipe_and_tokenizer, tiny_init_checkpoint, tmp_path):
    recipe, tokenizer = recipe_and_tokenizer
    assert recipe.splits() == ("val", "testA", "testB")
    torch.manual_seed(0)
    model = recipe.build_model(tokenizer, str(tiny_init_checkpoint))
    loader = recipe.train_loader(tokenizer)
    assert loader.batches_per_epoch == 480 // 16
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for n, batch in zip(range(2), loader):
        assert batch["image"].shape == (16, 3, 48, 48) and batch["idx"].shape == (16,)
        out = recipe.step(model, batch, alpha=0.0, generator=generator)
        assert set(recipe.loss_names) <= set(out) and "loss_mlm" not in out
        optimizer.zero_grad()
        (out["loss_itc"] + out["loss_itm"]).backward()
        optimizer.step()

    metrics = recipe.evaluate(model, tokenizer, step=2, epoch=0)
    assert sorted(metrics) == ["testA", "testB", "val"]
    assert [metrics[s]["n"] for s in ("val", "testA", "testB")] == [80, 20, 20]
    assert all(0 <= m["acc"] <= 100 and m["unscored"] == 0 for m in metrics.values())
    recipe.save_best(tmp_path)
    assert json.loads((tmp_path / "albef.grounding_tiny_val.json").read_text())["metrics"] == metrics["val"]

    output = tmp_path / "eval" / "albef.grounding_tiny_testB.json"
    options = argparse.Namespace(output=str(output), save_heatmaps=3, device="cpu", checkpoint="init.pth",
                                 config="configs/grounding_tiny.yaml")
    record = recipe.evaluate_split(model, tokenizer, "testB", options)
    assert record["metrics"] == metrics["testB"] and len(record["results"]) == 20
    row = record["results"][0]
    assert row["split"] == "testB" and row["expression"] and len(row["box"]) == 4
    assert row["hit"] == (row["iou"] is not None and row["iou"] >= 0.5)
    pictures = sorted(Path(record["heatmaps"]).glob("*.png"))
    assert [p.name for p in pictures] == ["00000.png", "00001.png", "00002.png"]
    assert "grounding testB: acc" in record["table"]
    json.dumps(record)                                   # the record is what model.evaluate writes
