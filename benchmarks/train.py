"""Training throughput and memory per ZeRO stage, through the real entry point.

    python benchmarks/train.py [--steps 80] [--warmup 5] [--mem-steps 3] [--workers 1]
                               [--skip-throughput] [--skip-memory] [--gpu]

0. The cost of the per-step debug records (`train.debug_records`, off by
   default): the same ZeRO-2 run with them off and on, samples/s of each from
   its logged windows, and the ratio.
1. Throughput: `deepspeed --num_gpus 2 model/train.py` with the tiny config
   (configs/tiny.yaml) on generated shards, once per ZeRO stage (CPU configs
   ds_configs/zero{0,1,2,3}_cpu.json). From the ranks' per-step records:
   optimiser steps/s and samples/s after `--warmup` steps, and the fraction of
   that time rank 0 spent waiting for its next batch.
2. Memory: the mid-size model of benchmarks/train_mid.yaml (base widths,
   ~90M trainable parameters, ~180M with the momentum copies) for
   `--mem-steps` steps per stage; memory of each rank after the last step and
   its peak during the training steps (CPU: resident set size and its high-water
   mark, reset when the training loop starts, both including the ~1 GB of the
   Python/torch/DeepSpeed runtime; glibc is told to return freed large blocks,
   see MEMORY_ENV). The
   expected model-state bytes per rank are printed beside them: params P
   (online + momentum, fp32), grads G, AdamW moments 2G and (ZeRO-1/2/3) the
   optimiser's fp32 master copy G of the trainable part, divided over the ranks
   as each stage partitions them; communication buckets come on top.

Prints one JSON object. On a GPU machine the same runs use the GPU configs by
passing `--gpu` (bf16 torch_autocast; memory is then torch's peak allocation).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.engine.progress import read_records  # noqa: E402
from tests.fixtures.shards import brace_spec, write_shards  # noqa: E402

RANKS = 2
SHARD_SIZES = (32,) * 16          # 512 samples: 32 batches per rank per epoch at 2 x 8
STAGES = (0, 1, 2, 3)
BYTES_FP32 = 4
# glibc keeps freed large blocks in its heap once its dynamic mmap threshold has grown, so
# RSS would show the high-water mark of start-up copies rather than what a rank holds; a
# fixed threshold returns every large tensor's memory to the OS when it is freed.
MEMORY_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, config: Path, ds_config: str, spec: str, steps: int, workers: int,
        env: dict | None = None, overrides: tuple[str, ...] = ("train.debug_records=true",),
        log_every: int | None = None) -> list[list[dict]]:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(RANKS),
           "--master_port", str(free_port()), "model/train.py", "--config", str(config),
           "--deepspeed_config", str(REPO / "ds_configs" / ds_config), "--output-dir", str(out),
           "--max-steps", str(steps), f"data.shards={spec}", f"data.num_workers={workers}",
           f"train.log_every={log_every or steps}", f"train.checkpoint_every={steps}", *overrides]
    with (out.parent / f"{out.name}.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{ds_config}: training failed ({proc.returncode})\n{tail}")
    if not (out / "logs" / "records_rank0.jsonl").is_file():
        return []
    return [[r for r in read_records(out / "logs" / f"records_rank{k}.jsonl") if "event" not in r]
            for k in range(RANKS)]


def logged_samples_per_s(out: Path) -> float:
    """Mean samples/s of the logging windows after the first (the first holds start-up)."""
    import csv
    with (out / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]
    return round(sum(float(r["samples_per_s"]) for r in rows) / len(rows), 1)


def records_cost(tmp: Path, config: Path, ds_config: str, spec: str, steps: int, warmup: int, workers: int) -> dict:
    """Samples/s of the same ZeRO-2 run with the per-step debug records off (default) and on."""
    out = {}
    for name, flag in (("records_off", "false"), ("records_on", "true")):
        run(tmp / f"rec_{name}", config, ds_config, spec, steps, workers,
            overrides=(f"train.debug_records={flag}",), log_every=warmup)
        out[f"{name}_samples_per_s"] = logged_samples_per_s(tmp / f"rec_{name}")
    out["on_over_off"] = round(out["records_on_samples_per_s"] / out["records_off_samples_per_s"], 3)
    return out


def throughput(records: list[list[dict]], warmup: int, global_batch: int) -> dict:
    rank0 = records[0]
    timed = rank0[warmup:]
    elapsed = timed[-1]["time"] - rank0[warmup - 1]["time"]
    wait = sum(r["data_wait_s"] for r in timed)
    return {"steps_per_s": round(len(timed) / elapsed, 2),
            "samples_per_s": round(len(timed) * global_batch / elapsed, 1),
            "data_wait_frac": round(wait / elapsed, 3)}


def model_state_mb(config: Path) -> dict:
    """Analytic model-state bytes per rank for each stage (fp32 everything, AdamW)."""
    from model.albef import ALBEF
    from model.engine.config import load_config

    model = ALBEF(load_config(config)["model"])
    trainable = sum(p.numel() for p in model.trainable_parameters())
    everything = sum(p.numel() for p in model.parameters())
    params, grads, adam = everything, trainable, 2 * trainable
    master = trainable  # DeepSpeed's ZeRO optimisers keep an fp32 master partition beside the module's params
    mb = BYTES_FP32 / 2**20
    per_stage = {
        0: params + grads + adam,
        1: params + grads + (master + adam) / RANKS,
        2: params + (grads + master + adam) / RANKS,
        3: (params + grads + master + adam) / RANKS,
    }
    return {"trainable_params": trainable, "all_params": everything,
            "model_state_mb_per_rank": {f"zero{k}": round(v * mb) for k, v in per_stage.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-records", action="store_true", help="skip the records off/on comparison")
    parser.add_argument("--gpu", action="store_true", help="use the GPU DeepSpeed configs (bf16 autocast)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    tiny = REPO / "configs" / "tiny.yaml"
    mid = REPO / "benchmarks" / "train_mid.yaml"
    suffix = "" if args.gpu else "_cpu"
    result: dict = {"ranks": RANKS, "device": "cuda" if args.gpu else "cpu", "throughput_tiny": {},
                    "memory_mid": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards(tmp / "shards", SHARD_SIZES, seed=3)
        spec = brace_spec(tmp / "shards", len(SHARD_SIZES))
        for stage in () if args.skip_throughput else STAGES:
            if stage == 0 and args.gpu:
                continue
            records = run(tmp / f"tiny_z{stage}", tiny, f"zero{stage}{suffix}.json", spec, args.steps, args.workers)
            result["throughput_tiny"][f"zero{stage}"] = throughput(records, args.warmup, global_batch=16)
            print(json.dumps({f"zero{stage}": result["throughput_tiny"][f"zero{stage}"]}), file=sys.stderr)
        if not args.skip_records:
            result["debug_records_zero2"] = records_cost(tmp, tiny, f"zero2{suffix}.json", spec, args.steps,
                                                         args.warmup, args.workers)
            print(json.dumps({"debug records": result["debug_records_zero2"]}), file=sys.stderr)
        if not args.skip_memory:
            result["memory_mid"].update(model_state_mb(mid))
            for stage in STAGES:
                if stage == 0 and args.gpu:
                    continue
                records = run(tmp / f"mid_z{stage}", mid, f"zero{stage}{suffix}.json", spec, args.mem_steps, 0,
                              env=MEMORY_ENV)
                now = [round(recs[-1]["mem_mb"]) for recs in records]
                peak = [round(recs[-1]["peak_mem_mb"]) for recs in records]
                result["memory_mid"][f"zero{stage}_mb_per_rank"] = {"after_steps": now, "peak": peak}
                print(json.dumps({f"mid zero{stage} MB": {"after_steps": now, "peak": peak}}), file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
