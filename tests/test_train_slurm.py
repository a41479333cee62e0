"""The Slurm scripts on a real one-node Slurm (loopback).

`sbatch slurm/pretrain_4m.sh` with the tiny config: the job trains on 2 CPU
tasks started by `srun` (rendezvous from the Slurm environment) and writes
checkpoints; then the pre-timeout signal path is taken for real (`scancel
--signal=USR1 --batch`: what `#SBATCH --signal=B:USR1@...` delivers): the ranks
checkpoint and stop, the job requeues itself, and the requeued job resumes with
`--resume auto` and finishes.

`slurm/submit_download.sh`: a staging job, then a 2-task array that packs local
images into shards, each task its own shard range, one manifest over all.
"""
from __future__ import annotations

import json
import sys
import time

import pytest
from PIL import Image

from model.engine.checkpointing import LATEST, tag_for_step
from tests.fixtures.training import RANKS, REPO, TINY_CONFIG, read_records, steps_of

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
        "ALBEF_OVERRIDES": "data.num_workers=0 train.checkpoint_every=10 train.log_every=5 train.debug_records=true",
        "ALBEF_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    # The script's #SBATCH lines ask for 8 GPUs x 8 tasks; this node has 2 CPUs and no GPU.
    job = slurm_cluster.sbatch(REPO / "slurm" / "pretrain_4m.sh", "--ntasks-per-node=2", "--gpus-per-node=0",
                               "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/slurm-%j.out",
                               env=env, cwd=REPO)
    log = tmp_path / f"slurm-{job}.out"

    def trained_some_steps():
        ranks_started = all((out / "logs" / f"records_rank{r}.jsonl").exists() for r in range(RANKS))
        if slurm_cluster.job_state(job) in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
            pytest.fail(f"job ended early: {slurm_cluster.job_state(job)}\n{log.read_text(errors='replace')[-4000:]}")
        return ranks_started and any(r.get("step", 0) >= SIGNAL_AFTER_STEP for r in steps_of(
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


DOWNLOAD_IMAGES = 6
DOWNLOAD_SLICES = 2


@pytest.mark.timeout(240)
def test_download_array_packs_every_slice(slurm_cluster, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(DOWNLOAD_IMAGES):
        Image.new("RGB", (48 + i, 40), (40 * i, 90, 200 - 20 * i)).save(images / f"{i}.jpg")
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps([{"image": f"{i}.jpg", "caption": f"picture number {i}"}
                               for i in range(DOWNLOAD_IMAGES)]))
    out = tmp_path / "shards"
    env = {**slurm_cluster.env, "ALBEF_PYTHON": sys.executable, "ALBEF_IMAGE_ROOT": str(images),
           "ALBEF_DOWNLOAD_ARGS": "--samples-per-shard 2"}
    submitted = slurm_cluster.run(str(REPO / "slurm" / "submit_download.sh"), "coco", str(ann), str(out),
                                  str(DOWNLOAD_SLICES), "--cpus-per-task=1", f"--output={tmp_path}/dl-%A_%a.out",
                                  env=env, cwd=REPO)
    stage_job, array_job = (int(w.strip(",")) for w in submitted.stdout.split() if w.strip(",").isdigit())

    def states(job: int) -> list[str]:
        out_ = slurm_cluster.run("scontrol", "show", "job", str(job), "-o", check=False).stdout
        return [f.split("=", 1)[1] for f in out_.split() if f.startswith("JobState=")]

    def done() -> bool:
        all_states = states(stage_job) + states(array_job)
        if any(s in ("FAILED", "CANCELLED", "TIMEOUT") for s in all_states):
            logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("dl-*.out"))
            pytest.fail(f"download jobs {all_states}\n{logs}")
        return len(states(array_job)) == DOWNLOAD_SLICES and all(s == "COMPLETED" for s in all_states)

    slurm_cluster.wait_for(done, 200, "the staging job and the download array", poll=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_samples"] == DOWNLOAD_IMAGES
    assert sorted(manifest["shards"]) == ["00000.tar", "00001.tar", "00002.tar"]
    summaries = [json.loads(line) for p in tmp_path.glob("dl-*.out")
                 for line in p.read_text().splitlines() if line.startswith("{")]
    assert [s["staged_shards"] for s in summaries if "staged_shards" in s] == [3]
    assert sorted((s["slice"], tuple(s["shards"])) for s in summaries if "staged_shards" not in s) == \
        [("0/2", (0, 1)), ("1/2", (1, 3))]
