"""SNLI-VE through the shared engine: 2 CPU ranks under ZeRO-2, resume mid-epoch, `model.evaluate`.

Generated data (tests/fixtures/classify.py): 64 training records = 4 batches per rank per
epoch at 2 ranks x 8, so step 3 is mid-epoch and step 6 lies in the second epoch. The
uninterrupted run goes to step 6; the interrupted one stops at step 3 (`--max-steps 3`,
which checkpoints) and continues with `--resume auto`. Per-step records
(`train.debug_records`) must agree. The interrupted run reads its images from
tar shards packed from the folder the uninterrupted one reads (`data.image_shards`),
so the agreement also shows that shards give the training the same pixels.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.cli import evaluate_main
from model.engine.dist_env import free_port
from model.engine.progress import read_records
from pipeline.pack_images import pack_images
from demo.classify_scenes import write_ve

REPO = Path(__file__).resolve().parents[1]
RANKS = 2
STEPS, STOP_AT = 6, 3


@pytest.fixture(scope="module")
def small_ve(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ve_small")
    data = {"train": write_ve(root, "train", 64, seed=1), "val": write_ve(root, "val", 16, seed=2),
            "test": write_ve(root, "test", 16, seed=3), "image_root": root / "images"}
    pack_images(root / "images", root / "shards", per_shard=40)
    return data


def _overrides(data: dict, shards: bool = False) -> list[str]:
    images = (f"data.image_shards={data['image_root'].parent / 'shards'}" if shards
              else f"data.image_root={data['image_root']}")
    return [f"data.train_file={data['train']}", images,
            f"data.eval_files.val={data['val']}", f"data.eval_files.test={data['test']}",
            "train.batch_size_per_rank=8", "train.log_every=1", "train.debug_records=true"]


def _train(out: Path, data: dict, max_steps: int, resume: bool = False, shards: bool = False) -> None:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(RANKS), "--master_port",
           str(free_port()), "model/train.py", "--config", "configs/ve_tiny.yaml",
           "--deepspeed_config", "ds_configs/zero2_cpu.json", "--output-dir", str(out),
           "--max-steps", str(max_steps), *(["--resume", "auto"] if resume else []), *_overrides(data, shards)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out.mkdir(parents=True, exist_ok=True)
    with (out / "launcher.log").open("a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:   # the launcher and both ranks, also when the test is interrupted
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, (out / "launcher.log").read_text(errors="replace")[-4000:]


def _steps(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "event" not in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_ve) -> dict:
    work = tmp_path_factory.mktemp("ve_runs")
    _train(work / "straight", small_ve, STEPS)
    _train(work / "resumed", small_ve, STOP_AT, shards=True)
    _train(work / "resumed", small_ve, STEPS, resume=True, shards=True)
    return {"straight": work / "straight", "resumed": work / "resumed"}


@pytest.mark.timeout(900)
def test_resume_mid_epoch_repeats_the_uninterrupted_run_under_zero2(runs):
    for rank in range(RANKS):
        straight = _steps(read_records(runs["straight"] / "logs" / f"records_rank{rank}.jsonl"))
        records = read_records(runs["resumed"] / "logs" / f"records_rank{rank}.jsonl")
        starts = [r for r in records if r.get("event") == "start"]
        assert [s["step"] for s in starts] == [0, STOP_AT] and starts[1]["zero_stage"] == 2
        assert starts[1]["loader_state"]["consumed"] == STOP_AT and starts[1]["epoch"] == 0   # mid-epoch
        resumed = _steps(records[records.index(starts[1]):])
        assert sorted(resumed) == list(range(STOP_AT + 1, STEPS + 1)) and straight[STEPS]["epoch"] == 1
        assert starts[1]["momentum_checksum"] == straight[STOP_AT]["momentum_checksum"]
        for step, rec in {**_steps(records[:records.index(starts[1])]), **resumed}.items():
            ref = straight[step]
            assert rec["batch_fingerprint"] == ref["batch_fingerprint"], (rank, step)
            assert rec["image_checksum"] == pytest.approx(ref["image_checksum"], rel=1e-12), (rank, step)
            for key in ("loss", "loss_cls", "acc", "momentum_checksum", "lr"):
                assert rec[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), (rank, step, key)
            assert rec["momentum_dtypes"] == ["torch.float32"]


def _evaluate(checkpoint: Path, data: dict, out: Path) -> dict:
    """`python -m model.evaluate` on the test split, in this process; returns the written record."""
    argv = ["--config", "configs/ve_tiny.yaml", "--checkpoint", str(checkpoint), "--split", "test",
            "--output", str(out), "--device", "cpu", *_overrides(data)]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert evaluate_main(argv) == 0
    finally:
        os.chdir(cwd)
    return json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_evaluate_reports_accuracy_per_class_and_writes_predictions(runs, small_ve, tmp_path):
    run = runs["straight"]
    epochs = [json.loads(line) for line in (run / "logs" / "epochs.jsonl").read_text().splitlines()]
    best = [e for e in epochs if e["best"]][-1]
    record = _evaluate(run, small_ve, tmp_path / "test.json")
    metrics = record["metrics"]
    # the exported (best val) model gives the test accuracy the trainer logged for that epoch
    assert metrics["acc"] == pytest.approx(best["test"]["acc"])
    assert set(metrics) >= {"acc_contradiction", "acc_neutral", "acc_entailment"} and metrics["n"] == 16
    truth = json.loads(small_ve["test"].read_text())
    assert [p["label"] for p in record["predictions"]] == [r["label"] for r in truth]
    assert sum(p["prediction"] == p["label"] for p in record["predictions"]) == round(metrics["acc"] * 16 / 100)
    assert "no known reason" not in record["load_report"]
    assert (run / "export" / "albef.val.json").is_file()


@pytest.mark.timeout(300)
def test_evaluate_reads_a_ve_runs_deepspeed_checkpoint(runs, small_ve, tmp_path):
    """A DeepSpeed checkpoint of a VE run (no export needed) loads into the VE model as it is; the
    straight and the resumed run's last checkpoints give the same predictions."""
    records = {}
    for name in ("straight", "resumed"):
        tag = sorted((runs[name] / "checkpoints").glob("step*"))[-1]
        records[name] = _evaluate(tag, small_ve, tmp_path / f"{name}.json")
        assert tag.name.endswith(str(STEPS))
        assert "DeepSpeed checkpoint of a ve run" in records[name]["load_report"]
    assert records["straight"]["predictions"] == records["resumed"]["predictions"]


def test_a_deepspeed_state_of_another_task_is_refused_with_its_name():
    from model.classifier import ALBEFClassifier
    from model.engine.config import load_config
    from model.weights.classifier import load_classifier_state_dict
    from model.weights.files import ENGINE_TASK
    from model.weights.released import CheckpointMismatchError
    m = load_config(REPO / "configs" / "ve_tiny.yaml")["model"]
    model = ALBEFClassifier(m, 3, 1, distill=True)
    state = {"model": {"text_decoder.weight": torch.zeros(2)}, ENGINE_TASK: "vqa"}
    with pytest.raises(CheckpointMismatchError, match="DeepSpeed checkpoint of a 'vqa' run does not fit"):
        load_classifier_state_dict(model, state, "ckpt/step9")
