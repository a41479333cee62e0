"""`deepspeed model/train.py` on 2 CPU ranks (gloo), tiny config, generated shards.

Five launches, shared between the tests through module-scoped fixtures:
ZeRO-1 (fp32), ZeRO-3 (bf16 torch_autocast), and for ZeRO-2 an uninterrupted
run, a run whose rank 1 is killed mid-way, and its `--resume auto`
continuation. The ranks' JSON-lines records (losses, queue and momentum
checksums, batch fingerprints) are what the assertions read.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.albef import ALBEF
from model.weights.released import load_albef_state_dict
from model.engine.checkpointing import LATEST, tag_for_step
from tests.fixtures.retrieval import write_shapes_dataset
from tests.fixtures.training import (
    REPO, TINY_CONFIG, free_port, launch_training, read_records, steps_of, training_command, training_env,
)

STEPS = 8                 # ZeRO-2 runs: 8 optimiser steps, crossing the 7-batch epoch boundary
CHECKPOINT_EVERY = 4
KILL_AT_STEP = 6          # after the step-4 checkpoint, before the step-8 one
STAGE_STEPS = 4           # ZeRO-1 / ZeRO-3 runs
ENQUEUE = 16              # 2 ranks x 8 columns per step
QUEUE_SIZE = 64           # configs/tiny.yaml
ZERO2_OVERRIDES = (f"train.checkpoint_every={CHECKPOINT_EVERY}", "data.num_workers=1")
TEMP = 0.07               # configs/tiny.yaml's initial temperature
# The ZeRO-1 and ZeRO-3 runs pin the temperature clamp to its initial value: the optimiser's
# master copy must then stay there too (the reference's in-place clamp), or the export shows drift.
PINNED_TEMP = (f"model.temp_min={TEMP}", f"model.temp_max={TEMP}")


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory, train_shards):
    out = tmp_path_factory.mktemp("zero1")
    launch_training(out, "zero1_cpu.json", train_shards.spec, max_steps=STAGE_STEPS,
                    overrides=("data.num_workers=0", *PINNED_TEMP))
    return out


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, train_shards):
    """ZeRO-3 with bf16 autocast, evaluating zero-shot ITC retrieval every 2 steps."""
    out = tmp_path_factory.mktemp("zero3")
    held_out = tmp_path_factory.mktemp("held_out")
    write_shapes_dataset(held_out, train_per_scene=1)
    launch_training(out, "zero3_cpu_bf16.json", train_shards.spec, max_steps=STAGE_STEPS,
                    overrides=("data.num_workers=0", f"train.eval_annotation={held_out / 'test.json'}",
                               f"train.eval_image_root={held_out}", "train.eval_every=2", *PINNED_TEMP))
    return out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, train_shards):
    out = tmp_path_factory.mktemp("zero2_straight")
    launch_training(out, "zero2_cpu.json", train_shards.spec, max_steps=STEPS, overrides=ZERO2_OVERRIDES)
    return out


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, train_shards):
    """The same run as `straight_run`, with rank 1 SIGKILLed once it has done step KILL_AT_STEP."""
    out = tmp_path_factory.mktemp("zero2_killed")
    cmd = training_command(out, "zero2_cpu.json", train_shards.spec, max_steps=STEPS, overrides=ZERO2_OVERRIDES)
    log = (out / "launcher.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=training_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    records = out / "logs" / "records_rank1.jsonl"
    killed_at = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            lines = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
            if any(r.get("step", 0) >= KILL_AT_STEP and "event" not in r for r in lines):
                os.kill(lines[0]["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
                break
            time.sleep(0.05)
        assert killed_at is not None, "rank 1 never reached the step to kill it at"
        rc = proc.wait(timeout=90)
        ended_after = time.monotonic() - killed_at
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job hung after one rank was killed")
    finally:
        log.close()
    return out, rc, ended_after


@pytest.fixture(scope="module")
def resumed_run(killed_run, train_shards):
    out = killed_run[0]
    launch_training(out, "zero2_cpu.json", train_shards.spec, max_steps=STEPS, overrides=ZERO2_OVERRIDES,
                    resume="auto")
    return out


def _check_training(run_dir: Path, steps: int) -> dict[int, list[dict]]:
    """Properties every stage must show; returns the records."""
    records = read_records(run_dir)
    per_rank = {rank: steps_of(recs) for rank, recs in records.items()}
    for rank, by_step in per_rank.items():
        assert sorted(by_step) == list(range(1, steps + 1)), f"rank {rank} steps {sorted(by_step)}"
        start = records[rank][0]
        assert start["event"] == "start" and start["momentum_dtypes"] == ["torch.float32"]
        last = by_step[steps]
        # the momentum model moved (EMA) and stayed fp32, like the queues
        assert last["momentum_checksum"] != pytest.approx(start["momentum_checksum"], rel=1e-9, abs=0)
        for rec in by_step.values():
            assert rec["momentum_dtypes"] == ["torch.float32"] and rec["queue_dtypes"] == ["torch.float32"]
    # the queues start equal and stay equal on every rank, and take both ranks' features each step
    assert records[0][0]["queue_checksum"] == records[1][0]["queue_checksum"]
    for step in range(1, steps + 1):
        assert per_rank[0][step]["queue_checksum"] == per_rank[1][step]["queue_checksum"], step
        assert per_rank[0][step]["queue_ptr"] == (ENQUEUE * step) % QUEUE_SIZE
        assert per_rank[0][step]["queue_checksum"] != per_rank[0].get(step - 1, records[0][0])["queue_checksum"]
    # falling loss (mean over ranks), all three parts present
    mean = {s: (per_rank[0][s]["loss"] + per_rank[1][s]["loss"]) / 2 for s in (1, steps)}
    assert mean[steps] < mean[1] - 0.5, mean
    assert all(k in per_rank[0][1] for k in ("loss_itc", "loss_itm", "loss_mlm"))
    return records


def _check_export(run_dir: Path, steps: int, pinned_temp: bool = False) -> None:
    ckpt = torch.load(run_dir / "export" / "albef.pth", map_location="cpu", weights_only=False)
    sd = ckpt["model"]
    assert ckpt["step"] == steps
    assert sd["queue_ptr"].dtype == torch.long and int(sd["queue_ptr"]) == (ENQUEUE * steps) % QUEUE_SIZE
    assert sd["temp"].shape == () and sd["image_queue"].dtype == torch.float32
    if pinned_temp:
        assert torch.equal(sd["temp"], torch.tensor(TEMP)), float(sd["temp"])
    assert any(k.startswith("visual_encoder_m.") for k in sd) and any(k.startswith("text_encoder_m.") for k in sd)
    model = ALBEF(ckpt["config"]["model"])
    report = load_albef_state_dict(model, ckpt)
    assert not report.missing, report
    assert torch.equal(model.queue.text_queue, sd["text_queue"])
    assert torch.equal(model.visual_encoder_m.patch_embed.proj.weight, sd["visual_encoder_m.patch_embed.proj.weight"])


@pytest.mark.timeout(300)
def test_zero1_trains(zero1_run):
    records = _check_training(zero1_run, STAGE_STEPS)
    assert records[0][0]["zero_stage"] == 1
    _check_export(zero1_run, STAGE_STEPS, pinned_temp=True)


@pytest.mark.timeout(300)
def test_zero2_trains_and_writes_run_folder(straight_run):
    records = _check_training(straight_run, STEPS)
    assert records[0][0]["zero_stage"] == 2 and steps_of(records[0])[STEPS]["epoch"] == 1
    _check_export(straight_run, STEPS)
    ckpts = straight_run / "checkpoints"
    assert (ckpts / LATEST).read_text() == tag_for_step(STEPS)
    for rank in (0, 1):
        assert (ckpts / tag_for_step(STEPS) / f"loader_rank{rank}.json").is_file()
        assert (ckpts / tag_for_step(STEPS) / f"rank{rank}_state.pt").is_file()
    rows = (straight_run / "logs" / "metrics.csv").read_text().splitlines()
    assert len(rows) == STEPS + 1 and rows[0].startswith("step,")
    assert any((straight_run / "logs" / "tb").iterdir())
    assert (straight_run / "plots" / "loss.png").stat().st_size > 5000
    assert "step 8/8" in (straight_run / "launcher.log").read_text()


@pytest.mark.timeout(300)
def test_zero3_bf16_autocast_moves_fp32_momentum_partitions(zero3_run):
    records = _check_training(zero3_run, STAGE_STEPS)
    start = records[0][0]
    assert start["zero_stage"] == 3 and start["momentum_partitioned"] is True
    ds_config = json.loads((zero3_run / "ds_config.json").read_text())
    assert ds_config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    # each rank holds different partitions of the momentum model, and each one moved
    assert start["momentum_checksum"] != records[1][0]["momentum_checksum"]
    _check_export(zero3_run, STAGE_STEPS, pinned_temp=True)
    # zero-shot ITC retrieval ran at steps 2 and 4 on both ranks (collective under ZeRO-3), same numbers
    evals = {rank: [r for r in recs if r.get("event") == "eval"] for rank, recs in records.items()}
    assert [e["step"] for e in evals[0]] == [2, 4] and evals[0] == [{**e, "rank": 0} for e in evals[1]]
    assert evals[0][0]["n_images"] == 20 and 0 <= evals[0][0]["r_mean"] <= 100
    eval_csv = (zero3_run / "logs" / "eval.csv").read_text().splitlines()
    assert eval_csv[0].startswith("step,txt_r1") and len(eval_csv) == 3


@pytest.mark.timeout(400)
def test_killing_a_rank_ends_the_job(killed_run):
    out, rc, ended_after = killed_run
    assert rc != 0
    assert ended_after < 60, f"job took {ended_after:.0f}s to end after the kill"
    assert (out / "checkpoints" / LATEST).read_text() == tag_for_step(CHECKPOINT_EVERY)


@pytest.mark.timeout(500)
def test_resume_auto_continues_where_the_checkpoint_stood(killed_run, resumed_run):
    out = resumed_run
    ckpt = out / "checkpoints" / tag_for_step(CHECKPOINT_EVERY)
    extra = torch.load(ckpt / "extra_state.pt", weights_only=False)
    for rank, recs in read_records(out).items():
        starts = [r for r in recs if r.get("event") == "start"]
        assert len(starts) == 2
        resumed = starts[1]
        before = [r for r in recs[: recs.index(resumed)] if r.get("step") == CHECKPOINT_EVERY and "event" not in r]
        assert resumed["resumed_from"] == str(ckpt) and resumed["step"] == CHECKPOINT_EVERY
        assert resumed["micro_step"] == CHECKPOINT_EVERY and resumed["epoch"] == extra["epoch"]
        # same queue and momentum model as when the checkpoint was taken
        assert resumed["queue_checksum"] == before[0]["queue_checksum"]
        assert resumed["queue_ptr"] == int(extra["queues"]["queue_ptr"]) == before[0]["queue_ptr"]
        assert resumed["momentum_checksum"] == before[0]["momentum_checksum"]
        # same data position: this rank's saved loader state, which the loader now reports
        assert resumed["loader_state"] == json.loads((ckpt / f"loader_rank{rank}.json").read_text())
        assert resumed["loader_state"]["batches"] == CHECKPOINT_EVERY
        assert steps_of(recs)[STEPS]["step"] == STEPS


@pytest.mark.timeout(600)
def test_resumed_run_repeats_the_uninterrupted_one(straight_run, killed_run, resumed_run):
    straight = {rank: steps_of(recs) for rank, recs in read_records(straight_run).items()}
    for rank, recs in read_records(resumed_run).items():
        second = recs.index([r for r in recs if r.get("event") == "start"][1])
        killed = steps_of(recs[:second])
        resumed = steps_of(recs[second:])
        assert sorted(resumed) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
        for step, rec in {**killed, **resumed}.items():
            ref = straight[rank][step]
            assert rec["batch_fingerprint"] == ref["batch_fingerprint"], (rank, step)
            assert rec["image_checksum"] == pytest.approx(ref["image_checksum"], rel=1e-12), (rank, step)
            for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
                assert rec[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (rank, step, key)
            assert rec["lr"] == pytest.approx(ref["lr"], rel=1e-12) and rec["alpha"] == ref["alpha"]


@pytest.mark.timeout(120)
def test_batch_mismatch_refused_before_reading_data(tmp_path):
    """An explicit DeepSpeed batch that disagrees is refused with the numbers, before the
    (here nonexistent) shards are looked at."""
    ds = json.loads((REPO / "ds_configs" / "zero2_cpu.json").read_text())
    ds["train_batch_size"] = 48
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    env = {**training_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "model/train.py", "--config", str(TINY_CONFIG), "--deepspeed_config",
         str(tmp_path / "ds.json"), "--output-dir", str(tmp_path / "run"), "data.shards=/nonexistent/{0..3}.tar"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train_batch_size=48 but the run config gives 8" in proc.stderr
    assert "batch_size_per_rank 8 x gradient_accumulation_steps 1 x 1 ranks" in proc.stderr
