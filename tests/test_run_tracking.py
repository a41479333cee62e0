"""Run tracking and start-up: `train.report_to` (CSV, TensorBoard, W&B offline), `logs/train.log`, the
start line, the GPU-config-without-CUDA refusal, and `model.grad_checkpointing`.

One 2-rank ZeRO-1 CPU run of 2 steps reports to all three backends with `WANDB_MODE=offline`.
"""
from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys

import pytest
import torch

from model.albef import ALBEF
from model.engine.tracking import rank_devices
from model.losses import total_loss
from model.tasks import load_run
from tests.fixtures.training import REPO, TINY_CONFIG, launch_training, training_env

STEPS = 2


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, train_shards):
    out = tmp_path_factory.mktemp("tracked")
    saved = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"   # no network: the run is written under logs/wandb/
    try:
        launch_training(out, "zero1_cpu.json", train_shards.spec, max_steps=STEPS,
                        overrides=("data.num_workers=0", "train.report_to=[csv,tensorboard,wandb]"), timeout=900)
    finally:
        os.environ.pop("WANDB_MODE") if saved is None else os.environ.__setitem__("WANDB_MODE", saved)
    return out


def _csv_rows(run_dir):
    with (run_dir / "logs" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_same_scalars_in_csv_tensorboard_and_wandb_offline(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _csv_rows(tracked_run)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    names = [k for k in rows[0] if k not in ("step", "epoch")]
    tb = EventAccumulator(str(tracked_run / "logs" / "tb")).Reload()
    for name in names:
        events = tb.Scalars(f"train/{name}")
        assert [e.step for e in events] == [int(r["step"]) for r in rows]
        assert [e.value for e in events] == pytest.approx([float(r[name]) for r in rows], rel=1e-6)
    runs = list((tracked_run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline W&B run"
    data = runs[0].read_bytes()
    missing = [name for name in names if f"train/{name}".encode() not in data]
    assert not missing, f"scalars not in the W&B run: {missing}"
    assert (tracked_run / "logs" / "wandb_run_id").read_text().strip() in runs[0].name


def test_train_log_holds_the_start_line_and_progress(tracked_run):
    log = (tracked_run / "logs" / "train.log").read_text()
    start = next(line for line in log.splitlines() if line.startswith("[train] task pretrain"))
    assert "ranks cpu x2 gloo" in start
    assert "zero1_cpu.json" in start and "precision fp32" in start
    assert f"[train] step {STEPS}/{STEPS}" in log
    assert "[train] done at step" in log


def test_rank_devices_summary():
    assert rank_devices([("n1", f"cuda:{i}") for i in range(8)], "nccl") == "cuda:0..7 nccl"
    assert rank_devices([("n1", "cpu"), ("n1", "cpu")], "gloo") == "cpu x2 gloo"
    two_nodes = [("a", "cuda:0"), ("a", "cuda:1"), ("b", "cuda:0"), ("b", "cuda:1")]
    assert rank_devices(two_nodes, "nccl") == "a cuda:0..1, b cuda:0..1 nccl"


def test_unknown_report_backend_is_refused():
    with pytest.raises(ValueError, match="train.report_to: 'mlflow' is not a backend"):
        load_run(TINY_CONFIG, ["train.report_to=[csv,mlflow]", "data.shards=/none/{0..1}.tar"])


def test_gpu_config_without_cuda_stops_at_once(tmp_path):
    """ds_configs/zero2.json says `albef_requires_cuda`: with no CUDA device the run exits 2, one line."""
    cmd = [sys.executable, "model/train.py", "--config", str(TINY_CONFIG), "--deepspeed_config",
           str(REPO / "ds_configs" / "zero2.json"), "--output-dir", str(tmp_path / "run"),
           "data.shards=/none/{00000..00001}.tar"]
    proc = subprocess.run(cmd, cwd=REPO, env={**training_env(), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "zero2.json is a GPU config" in errors[0], proc.stderr[-2000:]
    assert "step 1/" not in proc.stdout


def _saved_bytes(model, batch) -> tuple[dict, int]:
    """Loss terms of one training forward and the bytes autograd saved for backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(3)   # dropout draws: checkpointing must replay them
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=0.4,
                    generator=torch.Generator().manual_seed(5))
    return out, sum(saved)


def test_grad_checkpointing_same_losses_and_gradients(tiny_cfg, tiny_batch, torch_single_thread):
    cfg = copy.deepcopy(tiny_cfg["model"])   # dropout on: the recomputation must reproduce it
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ALBEF({**cfg, "grad_checkpointing": checkpointing}).train()
        out, saved = _saved_bytes(model, tiny_batch)
        total_loss(out).backward()
        grads = {n: p.grad.clone() for n, p in model.trainable_named_parameters() if p.grad is not None}
        results.append((out, grads, saved))
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-6, atol=1e-7)
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 50
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert ckpt_saved < 0.8 * plain_saved, (ckpt_saved, plain_saved)   # the layers' activations were not kept
