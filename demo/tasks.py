"""`make demo-tasks`: the four other downstream tasks, fine-tuned from the demo's pretrained model.

Starts from `runs/demo/run/export/albef.pth` (running `make demo` first when it is
missing) and, for each task, generates data it can be scored on, fine-tunes with
`deepspeed --num_gpus 2 model/train.py` (2 CPU ranks, ZeRO-2) and scores held-out
data with `python -m model.evaluate`, the commands a user types (printed as run):

- SNLI-VE: "a {colour} shape on a {colour} background" about a scene, 3 classes
  (demo/classify_scenes.py); the images are read from tar shards packed with
  `python -m pipeline.pack_images` (`data.image_shards`);
- NLVR2: text assignment on the demo's pretraining shards, then fine-tuning on
  "the left image has a red shape" about image pairs;
- VQA: "what colour is the shape?" / "what shape is it?" on held-out scenes
  (demo/vqa_scenes.py), answers ranked from the answer list;
- grounding: "the red circle" in two-object scenes, the Grad-CAM picks one of
  three proposals (demo/grounding_scenes.py).

The summary compares each accuracy with its chance or majority-answer baseline
and is written to `runs/demo_tasks/summary.json` (`--tasks ve vqa` re-runs some
and keeps the others' earlier results); the command exits 1 when a task does not
beat its baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from demo.classify_scenes import write_nlvr, write_ve
from demo.grounding_scenes import write_grounding_scenes
from demo.run import ROOT, sh
from demo.vqa_scenes import write_vqa_dataset
from model.engine.dist_env import free_port

PYTHON = sys.executable
DEEPSPEED = str(Path(PYTHON).parent / "deepspeed")


def train(config: str, out: Path, checkpoint: Path, overrides: list[str]) -> Path:
    sh([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "model/train.py", "--config", config,
        "--deepspeed_config", "ds_configs/zero2_cpu.json", "--output-dir", str(out), "--checkpoint", str(checkpoint),
        *overrides])
    return out


def evaluate(config: str, checkpoint: Path, split: str, output: Path, overrides: list[str]) -> dict:
    sh([PYTHON, "-m", "model.evaluate", "--config", config, "--checkpoint", str(checkpoint), "--split", split,
        "--device", "cpu", "--output", str(output), *overrides])
    return json.loads(output.read_text())["metrics"]


def ve(work: Path, pretrained: Path, demo_shards: Path) -> dict:
    data = {name: write_ve(work / "data", name, n, seed) for name, n, seed in
            (("train", 768, 1), ("val", 96, 2), ("test", 192, 3))}
    sh([PYTHON, "-m", "pipeline.pack_images", str(work / "data" / "images"), str(work / "shards"),
        "--per-shard", "400"])
    overrides = [f"data.train_file={data['train']}", f"data.image_shards={work / 'shards'}",
                 f"data.eval_files.val={data['val']}", f"data.eval_files.test={data['test']}", "train.epochs=10"]
    run = train("configs/ve_tiny.yaml", work / "run", pretrained, overrides)
    metrics = evaluate("configs/ve_tiny.yaml", run, "test", work / "test.json", overrides)
    return {"metric": "test accuracy", "value": metrics["acc"], "baseline": 100 / 3, "baseline_is": "chance"}


def nlvr(work: Path, pretrained: Path, demo_shards: Path) -> dict:
    ta = train("configs/nlvr_pretrain_tiny.yaml", work / "ta", pretrained,
               [f"data.shards={demo_shards}/*.tar", "train.epochs=1", "train.batch_size_per_rank=16"])
    data = {name: write_nlvr(work / "data", name, n, seed) for name, n, seed in
            (("train", 768, 1), ("dev", 96, 2), ("test", 192, 3))}
    overrides = [f"data.train_file={data['train']}", f"data.image_root={work / 'data'}",
                 f"data.eval_files.dev={data['dev']}", f"data.eval_files.test={data['test']}", "train.epochs=25"]
    run = train("configs/nlvr_tiny.yaml", work / "run", ta, overrides)
    metrics = evaluate("configs/nlvr_tiny.yaml", run, "test", work / "test.json", overrides)
    return {"metric": "test-P accuracy", "value": metrics["acc"], "baseline": 50.0, "baseline_is": "chance"}


def vqa(work: Path, pretrained: Path, demo_shards: Path) -> dict:
    files = write_vqa_dataset(work / "data")
    overrides = [f"data.train_file={files.train}", f"data.val_file={files.val}", f"data.test_file={files.test}",
                 f"data.answer_list={files.answer_list}", f"data.vqa_root={files.root}", f"data.vg_root={files.root}"]
    run = train("configs/vqa_tiny.yaml", work / "run", pretrained, overrides)
    metrics = evaluate("configs/vqa_tiny.yaml", run, "val", work / "val.json", overrides)
    return {"metric": "VQA accuracy (val)", "value": metrics["acc"], "baseline": files.val_majority_acc,
            "baseline_is": "majority answer"}


def grounding(work: Path, pretrained: Path, demo_shards: Path) -> dict:
    scenes = write_grounding_scenes(work / "data")
    overrides = [f"data.train_file={scenes['train']}", f"data.val_file={scenes['val']}",
                 f"data.test_file={scenes['test']}", f"data.image_root={scenes['root']}"]
    run = train("configs/grounding_tiny.yaml", work / "run", pretrained, overrides)
    metrics = evaluate("configs/grounding_tiny.yaml", run, "val", work / "val.json", overrides)
    return {"metric": "val accuracy (IoU >= 0.5)", "value": metrics["acc"], "baseline": 100 * scenes["chance"],
            "baseline_is": "chance"}


# each: (work folder, pretrained export, the demo's pretraining shards) -> result
TASKS = {"ve": ve, "nlvr": nlvr, "vqa": vqa, "grounding": grounding}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_tasks")
    ap.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo",
                    help="the `make demo` folder whose pretrained export the tasks start from")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    args = ap.parse_args(argv)
    started = time.time()
    pretrained = args.demo / "run" / "export" / "albef.pth"
    if not pretrained.is_file():
        print(f"[demo-tasks] {pretrained} is missing: running the pretraining demo first", flush=True)
        from demo.run import main as pretrain_demo
        pretrain_demo(["--out", str(args.demo)])
    results = {}
    for n, name in enumerate(args.tasks, 1):
        work = args.out.resolve() / name
        shutil.rmtree(work, ignore_errors=True)   # fine-tuning refuses a folder that holds checkpoints
        print(f"\n[demo-tasks {n}/{len(args.tasks)}] {name}", flush=True)
        t0 = time.time()
        result = TASKS[name](work, pretrained, args.demo / "shards")
        results[name] = {**result, "seconds": round(time.time() - t0)}
    summary_file = args.out / "summary.json"
    earlier = json.loads(summary_file.read_text())["tasks"] if summary_file.is_file() else {}
    merged = {**earlier, **results}
    results = {k: merged[k] for k in TASKS if k in merged}
    summary = {"seconds": round(time.time() - started), "pretrained": str(pretrained), "tasks": results}
    args.out.mkdir(parents=True, exist_ok=True)
    summary_file.write_text(json.dumps(summary, indent=1))
    print(f"\n[demo-tasks] done in {summary['seconds']} s (summary: {summary_file}; tasks not run this time "
          f"keep their earlier results)")
    print(f"{'task':<10} {'metric':<26} {'ours':>6} {'baseline':>9}")
    failed = []
    for name, r in results.items():
        print(f"{name:<10} {r['metric']:<26} {r['value']:6.1f} {r['baseline']:9.1f}  ({r['baseline_is']}, "
              f"{r['seconds']} s)")
        if r["value"] <= r["baseline"]:
            failed.append(name)
    if failed:
        print(f"[demo-tasks] NOT above the baseline: {', '.join(failed)}: the fine-tuned model did not learn "
              f"these tasks", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
