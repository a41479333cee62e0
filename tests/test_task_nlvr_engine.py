"""NLVR2 through the shared engine: text assignment on pretraining shards, fine-tuning from its
run folder, `model.evaluate` on dev (one CPU rank each; the 2-rank resume test is the VE one).

Start: a pretraining-layout checkpoint of a random tiny ALBEF. The TA export must be the
reference's TA layout (fusion layers doubled, `ta_head`, no momentum keys); NLVR2 must load
it with the teacher copied from the loaded student, and evaluate what it exported.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.albef import ALBEF
from model.cli import evaluate_main
from model.engine.config import load_config
from model.engine.dist_env import free_port
from model.weights.released import export_albef_state_dict
from demo.classify_scenes import write_nlvr
from tests.fixtures.shards import brace_spec, write_shards

REPO = Path(__file__).resolve().parents[1]


def _train(out: Path, config: str, checkpoint: Path, max_steps: int, overrides: list[str]) -> str:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
           "model/train.py", "--config", config, "--deepspeed_config", "ds_configs/zero2_cpu.json",
           "--output-dir", str(out), "--checkpoint", str(checkpoint), "--max-steps", str(max_steps),
           "train.log_every=1", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "launcher.log"
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("nlvr_chain")
    torch.manual_seed(0)
    init = work / "albef.pth"
    albef = ALBEF(load_config(REPO / "configs" / "tiny_model.yaml")["model"])
    torch.save({"model": export_albef_state_dict(albef)}, init)   # a pretraining-layout file
    write_shards(work / "shards", (8, 8, 8, 8), seed=3)
    ta_log = _train(work / "ta", "configs/nlvr_pretrain_tiny.yaml", init, 3,
                    [f"data.shards={brace_spec(work / 'shards', 4)}"])
    data = {split: write_nlvr(work / "nlvr", split, n, seed=seed)
            for split, n, seed in (("train", 32, 1), ("dev", 12, 2), ("test", 12, 3))}
    overrides = [f"data.train_file={data['train']}", f"data.image_root={work / 'nlvr'}",
                 f"data.eval_files.dev={data['dev']}", f"data.eval_files.test={data['test']}",
                 "train.batch_size_per_rank=8"]
    nlvr_log = _train(work / "nlvr_run", "configs/nlvr_tiny.yaml", work / "ta", 4, overrides)
    return {"work": work, "ta_log": ta_log, "nlvr_log": nlvr_log, "overrides": overrides}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_text_assignment_exports_the_reference_ta_layout(chain):
    assert "step 3/3" in chain["ta_log"] and "loss" in chain["ta_log"]
    sd = torch.load(chain["work"] / "ta" / "export" / "albef.pth", weights_only=True)["model"]
    # tiny model: 2 text + 2 x 2 fusion blocks = BERT layers 0..5, the reference's fine-tuned names
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_encoder.encoder.layer.")}
    assert layers == set(range(6))
    assert "ta_head.weight" in sd and "vision_proj.weight" in sd and not any("_m." in k for k in sd)
    assert torch.equal(sd["text_encoder.encoder.layer.2.crossattention.self.key.weight"],
                       sd["text_encoder.encoder.layer.3.crossattention.self.key.weight"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_nlvr_fine_tunes_from_the_ta_run_and_evaluates_dev(chain, tmp_path):
    log = chain["nlvr_log"]
    assert "the teacher starts as a copy of the loaded student" in log
    assert "text-assignment head of the NLVR2 pre-training step" in log
    run = chain["work"] / "nlvr_run"
    epochs = [json.loads(line) for line in (run / "logs" / "epochs.jsonl").read_text().splitlines()]
    out = tmp_path / "dev.json"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert evaluate_main(["--config", "configs/nlvr_tiny.yaml", "--checkpoint", str(run), "--split", "dev",
                              "--output", str(out), "--device", "cpu", *chain["overrides"]]) == 0
    finally:
        os.chdir(cwd)
    record = json.loads(out.read_text())
    assert record["metrics"]["acc"] == pytest.approx([e for e in epochs if e["best"]][-1]["dev"]["acc"])
    assert record["metrics"]["n"] == 12 and {"acc_True", "acc_False"} & set(record["metrics"])
    assert len(record["predictions"]) == 12
