"""A run that does not learn says so: feature spread, the collapse verdicts, distinct ITC candidate sets,
and `train.stop_on_collapse` ending a real 2-rank run that cannot learn (every sample the same)."""
from __future__ import annotations

import csv
import json
import random
import subprocess

import torch
import torch.nn.functional as F

from model.engine.health import eval_problems, window_problems
from model.losses import mean_pairwise_cosine
from model.tasks.retrieval_eval import distinct_candidate_sets
from pipeline.manifest import MANIFEST_NAME, manifest_for_shards
from tests.fixtures.shards import jpeg_bytes, write_tar
from tests.fixtures.training import REPO, training_command, training_env


def test_mean_pairwise_cosine_is_the_off_diagonal_mean():
    f = F.normalize(torch.randn(6, 5), dim=-1)
    full = f @ f.t()
    assert torch.allclose(mean_pairwise_cosine(f), (full.sum() - full.diag().sum()) / 30, atol=1e-6)
    same = F.normalize(torch.ones(4, 5), dim=-1)
    assert mean_pairwise_cosine(same).item() > 0.9999


def test_window_verdicts():
    healthy = {"cos_image": 0.4, "cos_text": 0.6, "acc_itc": 0.2, "acc_itm": 0.8}
    assert window_problems(healthy, itc_chance=0.01) == []
    collapsed = {"cos_image": 0.997, "cos_text": 0.999, "acc_itc": 0.004, "acc_itm": 0.667}
    found = window_problems(collapsed, itc_chance=0.004)
    assert len(found) == 3 and "image features collapsed" in found[0] and "'no match'" in found[2]
    # ITM at the constant rate alone is not a verdict (it is where every run starts)
    assert window_problems({"acc_itc": 0.3, "acc_itm": 0.667}, itc_chance=0.004) == []


def test_distinct_candidate_sets_expose_a_collapsed_itc():
    torch.manual_seed(0)
    good = distinct_candidate_sets(torch.randn(40, 80), k=8)
    assert good["itc_distinct_frac_i2t"] == 1.0 and good["itc_distinct_sets_t2i"] > 60
    collapsed = distinct_candidate_sets(torch.ones(40, 1) @ torch.randn(1, 80), k=8)
    assert collapsed["itc_distinct_sets_i2t"] == 1 and collapsed["itc_distinct_sets_t2i"] == 1
    assert eval_problems({"zeroshot/itc_distinct_frac_i2t": 1 / 40}) and not eval_problems(
        {"itc_distinct_frac_i2t": 0.9})


def _constant_shards(folder, shards=6, per_shard=10):
    """Every sample the same image and caption: nothing to align, the features cannot spread."""
    folder.mkdir(parents=True)
    image = jpeg_bytes(random.Random(0), 48, 48)
    caption = "a red car on the street"
    sizes = {}
    for s in range(shards):
        name = f"{s:05d}.tar"
        write_tar(folder / name, ({"__key__": f"{s:05d}{i:04d}", "jpg": image, "txt": caption.encode(),
                                   "json": json.dumps({"caption": caption}).encode()} for i in range(per_shard)))
        sizes[name] = per_shard
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest_for_shards(sizes, source="constant")))
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def test_stop_on_collapse_ends_a_run_that_cannot_learn(tmp_path):
    spec = _constant_shards(tmp_path / "shards")
    out = tmp_path / "run"
    cmd = training_command(out, "zero2_cpu.json", spec, max_steps=12, overrides=[
        "train.warmup_steps=2", "train.log_every=3", "train.stop_on_collapse=true",
        "train.collapse_patience_steps=6", "data.num_workers=0",
        "data.augment={crop_scale: [1.0, 1.0], flip_p: 0.0, randaug_n: 0}"])
    proc = subprocess.run(cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0, proc.stdout[-3000:]
    log = proc.stdout + proc.stderr
    assert "the run is not learning: image features collapsed" in log, log[-3000:]
    assert "train.stop_on_collapse: checkpoint written, run stopped" in log
    with (out / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    # warned from the first window after warm-up (step 3), stopped once it had lasted 6 steps (step 9)
    assert [int(r["step"]) for r in rows] == [3, 6, 9] and all(float(r["collapse"]) == 1.0 for r in rows)
    assert float(rows[-1]["cos_image"]) > 0.95
    assert "(found for 0 steps)" in log and "for 6 steps >= train.collapse_patience_steps" in log
    assert (out / "checkpoints" / "latest").is_file()
    assert not (out / "export").exists()   # a stopped run is not exported as if it had finished
