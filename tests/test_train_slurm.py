"""`sbatch slurm/pretrain_4m.sh` on a real one-node Slurm (loopback), tiny config.

The job trains on 2 CPU tasks started by `srun` (rendezvous from the Slurm
environment), writes checkpoints; then the pre-timeout signal path is taken for
real (`scancel --signal=USR1 --batch`: what `#SBATCH --signal=B:USR1@...`
delivers): the ranks checkpoint and stop, the job requeues itself, and the
requeued job resumes with `--resume auto` and finishes.
"""
from __future__ import annotations

import sys
import time

import pytest

from model.checkpointing import LATEST, tag_for_step
from tests.fixtures.training import REPO, TINY_CONFIG, read_records, steps_of

MAX_STEPS = 30
SIGNAL_AFTER_STEP = 3


@pytest.mark.timeout(480)
def test_sbatch_pretrain_trains_checkpoints_requeues_and_resumes(slurm_cluster, train_shards, tmp_path):
    out = tmp_path / "run"
    env = {
        "ALBEF_CONFIG": str(TINY_CONFIG),
        "ALBEF_DS_CONFIG": "ds_configs/zero2_cpu.json",
        "ALBEF_SHARDS": train_shards.spec,
        "ALBEF_OUTPUT": str(out),
        "ALBEF_MAX_STEPS": str(MAX_STEPS),
        "ALBEF_OVERRIDES": "data.num_workers=0 train.checkpoint_every=10 train.log_every=5",
        "ALBEF_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    # The script's #SBATCH lines ask for 8 GPUs x 8 tasks; this node has 2 CPUs and no GPU.
    job = slurm_cluster.sbatch(REPO / "slurm" / "pretrain_4m.sh", "--ntasks-per-node=2", "--gpus-per-node=0",
                               "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/slurm-%j.out",
                               env=env, cwd=REPO)
    log = tmp_path / f"slurm-{job}.out"

    def trained_some_steps():
        path = out / "logs" / "records_rank0.jsonl"
        if slurm_cluster.job_state(job) in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
            pytest.fail(f"job ended early: {slurm_cluster.job_state(job)}\n{log.read_text(errors='replace')[-4000:]}")
        return path.exists() and any(r.get("step", 0) >= SIGNAL_AFTER_STEP for r in steps_of(
            read_records(out)[0]).values())

    slurm_cluster.wait_for(trained_some_steps, 200, "the first training steps")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    signalled = time.monotonic()

    def finished():
        state = slurm_cluster.job_state(job)
        restarts = int(slurm_cluster.job_field(job, "Restarts") or 0)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            pytest.fail(f"job {state}\n{log.read_text(errors='replace')[-4000:]}")
        return state == "COMPLETED" and restarts >= 1

    slurm_cluster.wait_for(finished, 420 - (time.monotonic() - signalled), "the requeued job to finish", poll=1)

    text = log.read_text(errors="replace")
    assert "got the pre-timeout signal" in text and "requeueing job" in text
    assert "stop requested: checkpoint at step" in text
    for rank, recs in read_records(out).items():
        starts = [r for r in recs if r.get("event") == "start"]
        assert len(starts) == 2, f"rank {rank}: {len(starts)} starts"
        first_run = steps_of(recs[: recs.index(starts[1])])
        stopped_at = max(first_run)
        assert SIGNAL_AFTER_STEP <= stopped_at < MAX_STEPS
        # the requeued run resumed from the checkpoint written on the signal
        assert starts[1]["resumed_from"] == str(out / "checkpoints" / tag_for_step(stopped_at))
        assert starts[1]["step"] == stopped_at and starts[1]["world_size"] == 2
        assert starts[1]["queue_checksum"] == first_run[stopped_at]["queue_checksum"]
        assert max(steps_of(recs[recs.index(starts[1]):])) == MAX_STEPS
    assert (out / "checkpoints" / LATEST).read_text() == tag_for_step(MAX_STEPS)
    assert (out / "export" / "albef.pth").is_file()
    assert not (out / "stop_requested").exists()
