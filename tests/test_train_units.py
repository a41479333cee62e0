"""Unit tests of the training-side pieces that need no DeepSpeed launch: schedule,
Slurm rendezvous, DeepSpeed config checks, checkpoint folder logic, metrics and plots."""
from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from model.engine.checkpointing import (
    EXTRA_STATE, LATEST, CheckpointManager, capture_rng, complete_tags, newest_complete, restore_rng, tag_for_step,
)
from model.engine.dist_env import apply_slurm_env, expand_nodelist, slurm_rendezvous
from model.engine.ds_config import BatchPlan, resolve_ds_config
from model.engine.plot import main as plot_main
from model.engine.preemption import StopRequest
from model.engine.progress import MetricsLog, progress_line
from model.engine.schedule import LRSchedule, alpha_at

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- schedule
def test_lr_schedule_paper_shape():
    s = LRSchedule(lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=2000, total_steps=30_000)
    assert s(0) == pytest.approx(1e-5)
    assert s(1000) == pytest.approx(5.5e-5)
    assert s(2000) == pytest.approx(1e-4)
    assert s(2000 + 14_000) == pytest.approx(5.5e-5)  # half-way through the cosine
    assert s(30_000) == pytest.approx(1e-5)
    assert s(40_000) == pytest.approx(1e-5)
    lrs = [s(i) for i in range(2000, 30_001, 500)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.factor(2000) == pytest.approx(1.0)


def test_alpha_ramps_over_first_epoch():
    assert alpha_at(0, 100, 0.4) == 0.0
    assert alpha_at(50, 100, 0.4) == pytest.approx(0.2)
    assert alpha_at(100, 100, 0.4) == pytest.approx(0.4)
    assert alpha_at(10_000, 100, 0.4) == pytest.approx(0.4)


# ---------------------------------------------------------------- Slurm rendezvous
def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]-ib") == ["a9-ib", "a10-ib", "a11-ib"]


def test_slurm_env_fills_missing_only():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"}
    derived = slurm_rendezvous(env)
    assert derived["RANK"] == "5" and derived["WORLD_SIZE"] == "16" and derived["LOCAL_RANK"] == "1"
    assert derived["LOCAL_WORLD_SIZE"] == "8" and derived["MASTER_ADDR"] == "gpu12"
    assert 1024 < int(derived["MASTER_PORT"]) < 65536
    env_with_port = {**env, "MASTER_PORT": "1234"}
    apply_slurm_env(env_with_port)
    assert env_with_port["MASTER_PORT"] == "1234" and env_with_port["RANK"] == "5"
    launched = {**env, "RANK": "0", "WORLD_SIZE": "2"}  # a launcher already set them
    assert apply_slurm_env(launched) == {} and launched["RANK"] == "0"
    assert slurm_rendezvous({}) == {}


def test_batch_shell_and_plain_python_are_one_process():
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[12-13]"}
    assert slurm_rendezvous(batch_shell) == {}
    apply_slurm_env(batch_shell)
    assert batch_shell["WORLD_SIZE"] == "1" and batch_shell["RANK"] == "0"
    assert batch_shell["MASTER_ADDR"] == "127.0.0.1"


# ---------------------------------------------------------------- DeepSpeed config checks
def _ds(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_ds_configs_resolve(name):
    plan = BatchPlan(micro_batch=64, grad_accum=1, world_size=8, queue_size=65536)
    out = resolve_ds_config(_ds(name), plan, name)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (512, 64, 1)
    assert "bf16" not in out and "fp16" not in out
    if "cpu" not in name:
        assert out["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_batch_mismatch_names_the_numbers():
    cfg = {**_ds("zero2_cpu.json"), "train_batch_size": 256}
    plan = BatchPlan(micro_batch=64, grad_accum=1, world_size=8, queue_size=65536)
    with pytest.raises(ValueError, match=r"train_batch_size=256.*gives 512.*64 x gradient_accumulation_steps 1 x 8"):
        resolve_ds_config(cfg, plan)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=32"):
        resolve_ds_config({**_ds("zero2_cpu.json"), "train_micro_batch_size_per_gpu": 32}, plan)


def test_queue_size_checked_against_batch():
    plan = BatchPlan(micro_batch=48, grad_accum=2, world_size=8, queue_size=65536)
    with pytest.raises(ValueError, match=r"queue_size 65536 .* enqueue batch 384 \(batch_size_per_rank 48 x 8"):
        resolve_ds_config(_ds("zero2_cpu.json"), plan)


def test_refuses_casting_precision_and_json_optimizer():
    plan = BatchPlan(micro_batch=4, grad_accum=1, world_size=2, queue_size=64)
    with pytest.raises(ValueError, match="torch_autocast"):
        resolve_ds_config({**_ds("zero2.json"), "bf16": {"enabled": True}}, plan)
    with pytest.raises(ValueError, match="optimizer"):
        resolve_ds_config({**_ds("zero2.json"), "optimizer": {"type": "AdamW"}}, plan)
    z3 = _ds("zero3.json")
    del z3["zero_optimization"]["stage3_param_persistence_threshold"]
    with pytest.raises(ValueError, match="stage3_param_persistence_threshold"):
        resolve_ds_config(z3, plan)


# ---------------------------------------------------------------- checkpoint folders
class _EngineDouble:
    """Stands in for DeepSpeedEngine.save_checkpoint: writes one file per tag, can fail part-way."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # `latest` is ours, written last
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text("weights")
        if self.fail:
            raise OSError("disk full (simulated crash while saving)")


def _save(manager, step, fail=False):
    gen = torch.Generator()
    manager.save(_EngineDouble(fail), step, {"epoch": 0, "peak_mem_mb": 812.0}, capture_rng(gen), {"epoch": 0, "batches": step})


def test_checkpoints_keep_last_k_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in (10, 20, 30):
        _save(manager, step)
    assert complete_tags(tmp_path) == [tag_for_step(20), tag_for_step(30)]
    assert (tmp_path / LATEST).read_text() == tag_for_step(30)
    assert manager.resolve("auto") == tmp_path / tag_for_step(30)
    assert json.loads((tmp_path / tag_for_step(30) / "loader_rank0.json").read_text())["batches"] == 30
    assert manager.resolve(str(tmp_path)) == tmp_path / tag_for_step(30)
    assert CheckpointManager(tmp_path / "empty", 1, 0, 1).resolve("auto") is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.resolve(str(tmp_path / "nowhere"))


def test_crash_while_saving_leaves_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    _save(manager, 10)
    with pytest.raises(OSError, match="simulated crash"):
        _save(manager, 20, fail=True)
    assert (tmp_path / f".tmp-{tag_for_step(20)}").is_dir()  # the half-written one
    assert (tmp_path / LATEST).read_text() == tag_for_step(10)
    assert manager.resolve("auto") == tmp_path / tag_for_step(10)
    # a `latest` that names a vanished folder falls back to the newest complete one
    (tmp_path / LATEST).write_text(tag_for_step(99))
    assert newest_complete(tmp_path) == tmp_path / tag_for_step(10)
    _save(manager, 30)  # the next successful save clears the debris
    assert not (tmp_path / f".tmp-{tag_for_step(20)}").exists()
    assert complete_tags(tmp_path) == [tag_for_step(10), tag_for_step(30)]


def test_resume_refuses_other_world_size(tmp_path):
    _save(CheckpointManager(tmp_path, 1, 0, 1), 5)
    with pytest.raises(ValueError, match="written by 1 ranks, this run has 2"):
        CheckpointManager(tmp_path, 1, 0, 2).load(None, tmp_path / tag_for_step(5))


def test_rng_roundtrip():
    gen = torch.Generator().manual_seed(3)
    state = capture_rng(gen)
    expected = (torch.rand(3), torch.rand(3, generator=gen))
    torch.rand(5), torch.rand(5, generator=gen)
    restore_rng(state, gen)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=gen), expected[1])
    assert EXTRA_STATE == "extra_state.pt"


# ---------------------------------------------------------------- stop requests
def test_stop_request_by_file_and_signal(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopRequest(tmp_path / "stop_requested")
        assert not stop.agreed(torch.device("cpu"))
        (tmp_path / "stop_requested").touch()
        assert stop.agreed(torch.device("cpu"))
        stop.clear()
        assert not stop.local() and not (tmp_path / "stop_requested").exists()
        signal.raise_signal(signal.SIGUSR1)
        assert stop.local()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with pytest.raises(ValueError, match="SIGNOPE"):
        StopRequest(tmp_path / "x", ("SIGNOPE",))


# ---------------------------------------------------------------- metrics and plots
def _scalars(loss: float) -> dict:
    return {"loss": loss, "loss_itc": loss / 3, "loss_itm": loss / 3, "loss_mlm": loss / 3,
            "samples_per_s": 100.0, "steps_per_s": 2.0, "data_wait_frac": 0.05, "lr": 1e-4, "alpha": 0.4,
            "epoch": 0, "peak_mem_mb": 812.0}


def test_progress_line_has_the_numbers():
    line = progress_line(120, 1000, 0, _scalars(4.5))
    for part in ("step 120/1000", "100.0 samples/s", "data 5.0%", "ETA 0:07:20", "loss 4.5000", "itc 1.5000",
                 "lr 0.0001", "alpha 0.400", "mem 812 MB"):
        assert part in line, (part, line)


def test_metrics_resume_truncates_then_plot(tmp_path):
    log = MetricsLog(tmp_path / "logs", resume_step=None)
    for step in range(1, 7):
        log.write(step, _scalars(10.0 - step))
    log.close()
    log = MetricsLog(tmp_path / "logs", resume_step=4)  # resumed from the checkpoint at step 4
    log.write(5, _scalars(1.0))
    log.close()
    with (tmp_path / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert math.isclose(float(rows[-1]["loss"]), 1.0)
    assert any((tmp_path / "logs" / "tb").iterdir())
    assert plot_main([str(tmp_path)]) == 0
    for name in ("loss.png", "throughput.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert plot_main([str(tmp_path / "missing")]) == 1
    assert not (tmp_path / "plots" / "retrieval.png").exists()  # no evaluation logged: no retrieval plot
    log = MetricsLog(tmp_path / "logs", resume_step=5)
    for step, r1 in ((2, 5.0), (5, 20.0)):
        log.write_eval(step, {"txt_r1": r1, "txt_r5": 2 * r1, "img_r1": r1, "img_r5": 2 * r1})
    log.close()
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "retrieval.png").stat().st_size > 5000


def test_a_task_runs_plots_show_its_own_losses_and_split_accuracies(tmp_path, monkeypatch):
    """A fine-tuning run logs `loss_cls` and `<split>/acc`: both are drawn (no empty figures)."""
    import model.engine.plot as plot
    drawn = []
    real = plot._curves
    monkeypatch.setattr(plot, "_curves", lambda cols, curves, *a, **k: drawn.append([c for c, _ in curves])
                        or real(cols, curves, *a, **k))
    log = MetricsLog(tmp_path / "logs", resume_step=None)
    for step in (1, 2, 3):
        log.write(step, {**{k: v for k, v in _scalars(3.0).items() if not k.startswith("loss_")}, "loss_cls": 1.0})
        log.write_eval(step, {"val/acc": 30.0 * step, "val/n": 96, "test/acc": 25.0 * step})
    log.close()
    assert plot_main([str(tmp_path)]) == 0
    assert drawn == [["loss", "loss_cls"], ["val/acc", "test/acc"]]
    assert (tmp_path / "plots" / "eval.png").stat().st_size > 5000
    assert not (tmp_path / "plots" / "retrieval.png").exists()


# ---------------------------------------------------------------- run configs
def test_pretrain_configs_differ_by_data_and_schedule_only(monkeypatch):
    from model.engine.config import load_config
    from model.tasks import load_run

    monkeypatch.setenv("ALBEF_DATA", "/data")
    _, r4 = load_run(REPO / "configs" / "pretrain_4m.yaml")
    _, r14 = load_run(REPO / "configs" / "pretrain_14m.yaml")
    for run in (r4, r14):
        t = run.train
        assert t.lr == 1e-4 and t.warmup_steps == 2000 and t.epochs == 30
        assert t.batch_size_per_rank == 64 and run.model["queue_size"] == 65536 and run.task == "pretrain"
    assert r4.model == r14.model
    differing = {k for k in vars(r4.train) if getattr(r4.train, k) != getattr(r14.train, k)}
    assert differing <= {"output_dir", "checkpoint_every"}
    assert r4.data.shards.split("::") == [f"/data/{s}/*.tar" for s in ("cc3m", "cc3m_val", "sbu", "coco", "vg")]
    assert r14.data.shards.split("::") == [f"/data/{s}/*.tar" for s in ("cc3m", "cc3m_val", "sbu", "coco", "vg",
                                                                        "cc12m")]
    # the run folder keeps the spec as written: no expanded paths (or credentials) in config.yaml
    assert "${ALBEF_DATA:-data}" in r4.raw["data"]["shards"]
    assert load_config(REPO / "configs" / "pretrain_4m.yaml")["data"]["shards"] == r4.raw["data"]["shards"]


def test_env_references_expand_once_and_unset_ones_are_named():
    from model.engine.config import expand_env

    assert expand_env("${A:-x}/${B}", env={"B": "b"}) == "x/b"
    with pytest.raises(ValueError, match=r"\$\{SHARD_ROOT\}, which is not set"):
        expand_env("${SHARD_ROOT}/a.tar", env={})


def test_weight_decay_spares_exactly_the_1d_parameters():
    """As the reference's add_weight_decay: biases and norms are exempt, the 0-d temperature is not."""
    from model.engine.trainer import param_groups

    weight, bias, temp = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3)), \
        torch.nn.Parameter(torch.tensor(0.07))
    decay, no_decay = param_groups([weight, bias, temp], 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert [p is weight or p is temp for p in decay["params"]] == [True, True]
    assert len(no_decay["params"]) == 1 and no_decay["params"][0] is bias
