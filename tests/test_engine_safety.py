"""Checkpoint and preemption hardening (docs/FAILURES.md).

- A checkpoint file carrying a pickle payload (`__reduce__` -> `os.system`) is refused
  with one line naming it, for `--resume` (DeepSpeed's own loads included) and for
  `--checkpoint`; the payload never runs.
- Old `rank{R}_state.pt` files (numpy RNG tuples) still load, through the weights-only path.
- checksums.json: `--resume auto` skips a truncated newest checkpoint with a warning and
  resumes from the previous one; one line when none is intact; old ones load with a note.
- SIGTERM: ignored before the first step (default death), served at the next step
  boundary after it; under the real Slurm, `scancel --signal=TERM` gives a checkpoint
  and a clean exit.
- Killing the top `deepspeed` launcher stops both ranks (with a checkpoint).
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.engine.checkpointing import (
    CHECKSUMS, EXTRA_STATE, LATEST, CheckpointManager, capture_rng, file_owner, load_rank_state, rank_state_name,
    restore_rng, sha256_file, tag_for_step, verify_files,
)
from model.engine.safe_load import UnsafeCheckpointError, deepspeed_loads_weights_only, safe_load
from model.weights.files import ZERO012_MODULE_FILE
from tests.fixtures.training import (
    RANKS, REPO, TINY_CONFIG, launch_training, read_records, steps_of, training_command, training_env,
)

BASE_STEPS = 4
CKPT_EVERY = 2
RESUMED_STEPS = 6
OVERRIDES = (f"train.checkpoint_every={CKPT_EVERY}", "train.keep_checkpoints=3", "data.num_workers=0")


class Payload:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_payload(tag_dir: Path, name: str, marker: Path) -> None:
    """Replace one file with a payload and re-record its checksum (an attacker controls the folder)."""
    torch.save({"module": Payload(marker), "note": "looks like a checkpoint"}, tag_dir / name)
    record = json.loads((tag_dir / CHECKSUMS).read_text())
    record["files"][name] = {"bytes": (tag_dir / name).stat().st_size, "sha256": sha256_file(tag_dir / name)}
    (tag_dir / CHECKSUMS).write_text(json.dumps(record))


# ---------------------------------------------------------------- in-process units

def test_payload_is_refused_by_the_loaders_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "posix.system" in message
    # DeepSpeed 0.19.8's own loader (weights_only=False inside) under our guard
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    original = torch.load
    with deepspeed_loads_weights_only(), pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert torch.load is original
    assert not marker.exists()


def test_old_rank_state_files_load_through_the_safe_path(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "generator": gen.get_state()}   # the format-1 file: raw numpy/python tuples
    torch.save(old, tmp_path / "rank0_state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    restore_rng(load_rank_state(tmp_path / "rank0_state.pt"), gen)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2]) and torch.equal(torch.rand(1, generator=gen), expected[3])
    # the new format holds tensors and numbers only, and round-trips
    state = capture_rng(gen)
    torch.save(state, tmp_path / "new.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "new.pt") == []
    draws = (random.random(), np.random.rand())
    restore_rng(safe_load(tmp_path / "new.pt"), gen)
    assert (random.random(), np.random.rand()) == draws


def test_file_owner_splits_the_hashing():
    assert file_owner("mp_rank_00_model_states.pt", 2) == 0
    assert file_owner("zero_pp_rank_1_mp_rank_00_optim_states.pt", 2) == 1
    assert file_owner("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", 4) == 3
    assert file_owner("rank1_state.pt", 2) == 1 and file_owner("loader_rank1.json", 2) == 1
    assert file_owner(EXTRA_STATE, 2) == 0


class _Engine:
    def save_checkpoint(self, save_dir, tag, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))


def test_resolve_falls_back_past_damaged_checkpoints(tmp_path, capsys):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    for step in (10, 20, 30):
        manager.save(_Engine(), step, {"epoch": 0, "metric": np.float64(0.5)}, capture_rng(torch.Generator()),
                     {"batches": step})
    assert verify_files(tmp_path / tag_for_step(30)) == ("ok", None)
    assert safe_load(tmp_path / tag_for_step(30) / EXTRA_STATE)["metric"] == 0.5   # numpy scalars saved plain
    newest = tmp_path / tag_for_step(30) / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])                                 # truncated
    assert manager.resolve("auto") == tmp_path / tag_for_step(20)
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path / tag_for_step(30)} is damaged (mp_rank_00_model_states.pt has 1000 bytes" in out
    with pytest.raises(ValueError, match="is damaged"):
        manager.resolve(str(tmp_path / tag_for_step(30)))
    (tmp_path / tag_for_step(20) / rank_state_name(0)).write_bytes(b"x")          # wrong size
    flipped = tmp_path / tag_for_step(10) / "loader_rank0.json"
    flipped.write_text(flipped.read_text().replace("10", "11"))                    # same size, other bytes
    with pytest.raises(ValueError) as err:
        manager.resolve("auto")
    assert "\n" not in str(err.value) and str(err.value).startswith("--resume auto: no intact checkpoint")
    assert "loader_rank0.json does not match its sha256" in str(err.value)
    # a checkpoint from before checksums: loads, with a note
    (tmp_path / tag_for_step(10) / CHECKSUMS).unlink()
    assert manager.resolve("auto") == tmp_path / tag_for_step(10)
    assert f"note: checkpoint {tmp_path / tag_for_step(10)} has no checksums.json" in capsys.readouterr().out


_SIGTERM_PROBE = """
import os, signal, sys, time
from pathlib import Path
from model.engine.preemption import StopRequest
stop = StopRequest(Path(sys.argv[1]), watch_parent=False)
if sys.argv[2] == "armed":
    assert stop.at_step_boundary(check_file=False) is False
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    assert stop.reason == "SIGTERM" and stop.at_step_boundary(check_file=False) is True
    print("stopping at the step boundary")
else:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("survived")
"""


@pytest.mark.parametrize("when", ["start-up", "armed"])
def test_sigterm_is_deferred_only_once_a_step_is_done(tmp_path, when):
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_PROBE, str(tmp_path / "stop"), when], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    if when == "armed":
        assert proc.returncode == 0 and "stopping at the step boundary" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode == -signal.SIGTERM and "survived" not in proc.stdout


_WORKER_PROBE = """
import os, subprocess, sys, time
from pathlib import Path
import torch
from torch.utils.data import DataLoader, IterableDataset
from model.engine.preemption import StopRequest

class Slow(IterableDataset):
    def __iter__(self):
        for i in range(1000):
            time.sleep(0.05)
            yield torch.tensor([os.getpid(), i])

stop = StopRequest(Path(sys.argv[1]), watch_parent=False)
batches = iter(DataLoader(Slow(), batch_size=None, num_workers=1))
worker = int(next(batches)[0])
subprocess.run(["kill", "-TERM", str(worker)], check=True)   # as slurmstepd / the launcher would
time.sleep(1.0)
for _ in range(10):
    assert int(next(batches)[0]) == worker
print("worker survived a foreign SIGTERM", flush=True)
"""


def test_dataloader_worker_survives_a_foreign_sigterm(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WORKER_PROBE, str(tmp_path / "stop")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "worker survived" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------- 2-rank DeepSpeed runs

@pytest.fixture(scope="module")
def base_run(tmp_path_factory, train_shards):
    """ZeRO-2, 2 ranks, 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("safety_base")
    launch_training(out, "zero2_cpu.json", train_shards.spec, max_steps=BASE_STEPS, overrides=OVERRIDES)
    return out


def _copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


@pytest.mark.timeout(600)
def test_resume_auto_skips_a_truncated_checkpoint(base_run, train_shards, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    damaged = ckpts / tag_for_step(BASE_STEPS)
    assert json.loads((damaged / CHECKSUMS).read_text())["algorithm"] == "sha256"
    victim = damaged / "zero_pp_rank_1_mp_rank_00_optim_states.pt"      # hashed and checked by rank 1
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    started = time.monotonic()
    launch_training(run, "zero2_cpu.json", train_shards.spec, max_steps=RESUMED_STEPS, overrides=OVERRIDES,
                    resume="auto")
    print(f"resume with fallback + {RESUMED_STEPS - CKPT_EVERY} steps: {time.monotonic() - started:.0f}s")
    log = (run / "launcher.log").read_text(errors="replace")
    assert (f"warning: checkpoint {damaged} is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt has "
            in log), log[-3000:]
    previous = ckpts / tag_for_step(CKPT_EVERY)
    for rank, recs in read_records(run).items():
        starts = [r for r in recs if r.get("event") == "start"]
        assert len(starts) == 2 and starts[1]["resumed_from"] == str(previous) and starts[1]["step"] == CKPT_EVERY
        assert sorted(steps_of(recs[recs.index(starts[1]):])) == list(range(CKPT_EVERY + 1, RESUMED_STEPS + 1))
    assert (ckpts / LATEST).read_text() == tag_for_step(RESUMED_STEPS)
    # the damaged step was trained again and saved over the damaged folder
    assert verify_files(damaged) == ("ok", None) and verify_files(ckpts / tag_for_step(RESUMED_STEPS)) == ("ok", None)
    assert (run / "export" / "albef.pth").is_file()


@pytest.mark.timeout(600)
def test_resume_refuses_a_payload_in_deepspeeds_file(base_run, train_shards, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    _plant_payload(run / "checkpoints" / tag_for_step(BASE_STEPS), ZERO012_MODULE_FILE, marker)
    cmd = training_command(run, "zero2_cpu.json", train_shards.spec, max_steps=RESUMED_STEPS,
                           overrides=OVERRIDES, resume="auto")
    proc = subprocess.run(cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not marker.exists()
    errors = [line for line in out.splitlines() if "error:" in line and "refused" in line]
    assert errors and all(f"{ZERO012_MODULE_FILE}: refused: not plain weights" in e for e in errors), out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.timeout(300)
def test_checkpoint_option_reads_deepspeed_files_weights_only(base_run, tiny_cfg, tiny_tokenizer, tmp_path):
    """`--checkpoint` of evaluation / fine-tuning (`model.weights.files`): a real ZeRO-2 checkpoint loads
    weights-only; the same folder with a payload is refused in one line and the payload never runs."""
    from model.albef import ALBEF
    from model.weights.files import load_retrieval_weights, read_checkpoint, retrieval_model_config
    tag = _copy_run(base_run / "checkpoints" / tag_for_step(BASE_STEPS), tmp_path / tag_for_step(BASE_STEPS))
    model = ALBEF(retrieval_model_config(copy.deepcopy(tiny_cfg["model"]), tiny_tokenizer))
    report, source = load_retrieval_weights(model, tag)
    assert source == str(tag) and not [k for k in report.missing if "idx_queue" not in k]
    marker = tmp_path / "pwned"
    _plant_payload(tag, ZERO012_MODULE_FILE, marker)
    with pytest.raises(ValueError) as err:
        read_checkpoint(tag)
    assert "\n" not in str(err.value) and f"{tag / ZERO012_MODULE_FILE}: refused: not plain weights" in str(err.value)
    # a damaged file is named before anything is unpickled
    (tag / EXTRA_STATE).write_bytes(b"")
    with pytest.raises(ValueError, match="damaged checkpoint \\(extra_state.pt has 0 bytes"):
        read_checkpoint(tag)
    assert not marker.exists()


def _rank_pids(run: Path, min_step: int) -> list[int] | None:
    """Both ranks' pids once each has recorded `min_step`, else None."""
    try:
        records = read_records(run)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if all(any(r.get("step", 0) >= min_step and "event" not in r for r in recs) for recs in records.values()):
        return [recs[0]["pid"] for recs in records.values()]
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_killing_the_launcher_stops_the_ranks(train_shards, tmp_path, sig):
    run = tmp_path / "run"
    run.mkdir()
    cmd = training_command(run, "zero2_cpu.json", train_shards.spec, max_steps=200,
                           overrides=("train.checkpoint_every=1000", "data.num_workers=0"))
    with (run / "launcher.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=training_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        pids = None
        while pids is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            pids = _rank_pids(run, 2)
        assert pids, (run / "launcher.log").read_text(errors="replace")[-3000:]
        os.kill(proc.pid, sig)                 # the top `deepspeed` only, as `kill` would
        killed = time.monotonic()
        while any(_alive(p) for p in pids) and time.monotonic() - killed < 120:
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
        print(f"ranks gone {gone_after:.1f}s after {sig.name} to the launcher")
        assert not any(_alive(p) for p in pids), f"ranks {pids} still running {gone_after:.0f}s after the kill"
        log_text = (run / "launcher.log").read_text(errors="replace")
        assert "the launcher (pid" in log_text and "exited: stopping" in log_text
        # they stopped cleanly: a checkpoint at the step where they agreed, named by `latest`
        stopped = max(steps_of(read_records(run)[0]))
        assert (run / "checkpoints" / LATEST).read_text() == tag_for_step(stopped)
        assert verify_files(run / "checkpoints" / tag_for_step(stopped)) == ("ok", None)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


# ---------------------------------------------------------------- Slurm

SLURM_MAX_STEPS = 30
SLURM_SIGNAL_AFTER = 3


@pytest.mark.timeout(480)
def test_slurm_sigterm_checkpoints_at_the_next_step_and_exits(slurm_cluster, train_shards, tmp_path):
    out = tmp_path / "run"
    env = {
        "ALBEF_CONFIG": str(TINY_CONFIG), "ALBEF_DS_CONFIG": "ds_configs/zero2_cpu.json",
        "ALBEF_SHARDS": train_shards.spec, "ALBEF_OUTPUT": str(out), "ALBEF_MAX_STEPS": str(SLURM_MAX_STEPS),
        # one DataLoader worker per rank: Slurm signals it too, and it must not take its rank down
        "ALBEF_OVERRIDES": "data.num_workers=1 train.checkpoint_every=100 train.log_every=5 train.debug_records=true",
        "ALBEF_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
    }
    job = slurm_cluster.sbatch(REPO / "slurm" / "pretrain_4m.sh", "--ntasks-per-node=2", "--gpus-per-node=0",
                               "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/slurm-%j.out",
                               env=env, cwd=REPO)
    log = tmp_path / f"slurm-{job}.out"

    def signal_step():
        if slurm_cluster.job_state(job) in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
            pytest.fail(f"job ended early: {slurm_cluster.job_state(job)}\n{log.read_text(errors='replace')[-4000:]}")
        if not all((out / "logs" / f"records_rank{r}.jsonl").exists() for r in range(RANKS)):
            return None
        done = max(steps_of(read_records(out)[0]), default=0)
        return done if done >= SLURM_SIGNAL_AFTER else None

    seen = slurm_cluster.wait_for(signal_step, 240, "the first training steps", poll=0.2)
    slurm_cluster.run("scancel", "--signal=TERM", str(job))     # every task of the job step, as preemption does
    signalled = time.monotonic()

    def ended():
        state = slurm_cluster.job_state(job)
        return state if state not in ("RUNNING", "PENDING", "COMPLETING", "UNKNOWN") else None

    state = slurm_cluster.wait_for(ended, 180, "the job to end after SIGTERM", poll=0.5)
    took = time.monotonic() - signalled
    text = log.read_text(errors="replace")
    print(f"SIGTERM to job end: {took:.1f}s (state {state})")
    assert state == "COMPLETED", text[-4000:]
    assert "SIGTERM: checkpoint at the next step boundary" in text and "stop requested: checkpoint at step" in text
    records = read_records(out)
    stopped = {rank: max(steps_of(recs)) for rank, recs in records.items()}
    assert len(set(stopped.values())) == 1, stopped                 # both ranks stopped at the same step
    stop_step = stopped[0]
    # seen = the step rank 0 had recorded when scancel ran: the stop is at most two boundaries later
    assert seen <= stop_step <= seen + 3 and stop_step < SLURM_MAX_STEPS, (seen, stop_step)
    tag = out / "checkpoints" / tag_for_step(stop_step)
    assert (out / "checkpoints" / LATEST).read_text() == tag.name and verify_files(tag) == ("ok", None)
    assert not (out / "export" / "albef.pth").exists()              # stopped, not finished
