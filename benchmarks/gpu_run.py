"""The one-GPU benchmark behind benchmarks/gpu.sh: real trainer, step, loader, re-ranking, syncs -> one JSON.

    benchmarks/gpu.sh [--out FILE] [--peak-tflops 989] [--steps 120] [--smoke]

Stages, each a subprocess with its own time limit (a stage that fails or runs
out of time is recorded as such and the rest still run; the whole GPU run is
sized to finish in under 8 minutes):

1. shards: synthetic JPEGs (384-512 px gradients, the download stage's size) with
   captions, written on the spot with tests/fixtures/shards.py, and (GPU) a
   30522-entry vocabulary file so the MLM head has BERT's size without a download;
2. train: `python model/train.py` with configs/pretrain_base.yaml (random init),
   ds_configs/zero2.json (ZeRO-2, bf16 torch_autocast), batch 64 per GPU, a data
   loader worker per core but two; from logs/metrics.csv, after the first logging
   window (start-up): samples/s, data-wait fraction, peak GPU memory, and MFU
   = samples/s x analytic FLOPs per sample (benchmarks/flops.py) / peak;
3. step: benchmarks/step.py base, bf16, batch 64 (the model step alone, no loader or DeepSpeed);
4. loader: benchmarks/loader.py with every core as a worker;
5. retrieval: benchmarks/retrieval.py --throughput base, k=256, fp32 and bf16 (ITM pairs/s);
6. syncs: benchmarks/syncs.py on the tiny config with the GPU ZeRO-2 JSON and the GPU
   recipe's `data.augment.on_device` (torch's CUDA sync-debug warnings counted too).

`--smoke` runs the same path on the CPU in a few minutes (tiny config, ds_configs/zero2_cpu.json,
a few steps, small loader and re-ranking runs, no syncs stage): tests/test_benchmarks_smoke.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H200_BF16_DENSE_TFLOPS = 989.0
BERT_VOCAB_SIZE = 30522


def _write_part(args: tuple) -> str:
    folder, shards, per_shard, seed, sides = args
    from tests.fixtures import shards as fixture
    fixture.IMAGE_SIDES = sides
    fixture.write_shards(Path(folder), (per_shard,) * shards, seed=seed, key_prefix=f"p{seed}_")
    return fixture.brace_spec(Path(folder), shards)


def write_data(tmp: Path, samples: int, parts: int, sides: tuple[int, int]) -> str:
    """Shards in `parts` folders written in parallel; returns the `::`-joined spec."""
    per_part = -(-samples // parts)
    shards = max(1, per_part // 256)
    per_shard = -(-per_part // shards)
    jobs = [(str(tmp / f"shards{k}"), shards, per_shard, k, sides) for k in range(parts)]
    with ProcessPoolExecutor(parts) as pool:
        return "::".join(pool.map(_write_part, jobs))


def write_vocab(path: Path) -> Path:
    """A bare vocab.txt of BERT's size: the special tokens, the captions' words, filler."""
    from tests.fixtures.shards import SPECIAL_TOKENS, WORDS
    words = list(SPECIAL_TOKENS) + list(WORDS)
    words += [f"tok{i}" for i in range(BERT_VOCAB_SIZE - len(words))]
    path.write_text("\n".join(words) + "\n")
    return path


def stage(result: dict, name: str, cmd: list[str], timeout: float, log_dir: Path, env: dict | None = None) -> str | None:
    """Run one stage; its stdout, or None (the failure recorded in result[name])."""
    t0 = time.perf_counter()
    log = log_dir / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        log.write_text(f"{err.stdout or ''}\n{err.stderr or ''}")
        result[name] = {"status": f"timed out after {timeout:.0f} s", "log": str(log)}
        return None
    log.write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode:
        result[name] = {"status": f"exit {proc.returncode}", "log": str(log), "tail": proc.stderr[-1500:]}
        return None
    result[name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)}
    return proc.stdout


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def train_summary(run_dir: Path, flops_per_sample: float, peak_tflops: float | None) -> dict:
    """Means over the logged windows after the first (which holds start-up)."""
    with (run_dir / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    windows = rows[1:] or rows
    mean = lambda key: sum(float(r[key]) for r in windows) / len(windows)  # noqa: E731
    samples = mean("samples_per_s")
    out = {"windows": len(windows), "samples_per_s": round(samples, 1),
           "data_wait_frac": round(mean("data_wait_frac"), 4),
           "peak_memory_mb": round(max(float(r["peak_mem_mb"]) for r in rows), 1),
           "analytic_gflop_per_sample": round(flops_per_sample / 1e9, 2),
           "achieved_tflops": round(samples * flops_per_sample / 1e12, 2)}
    if peak_tflops:
        out["mfu"] = round(samples * flops_per_sample / 1e12 / peak_tflops, 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_gpu" / "result.json"))
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                        help="peak dense TFLOP/s of the GPU in bf16 (default: H200 SXM, 989)")
    parser.add_argument("--steps", type=int, default=None, help="trainer optimiser steps (default 120; smoke 6)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, minutes: the path, not the numbers")
    args = parser.parse_args()
    from benchmarks.flops import pretraining_flops
    from model.engine.config import load_config

    smoke = args.smoke
    cores = os.cpu_count() or 1
    py = sys.executable
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result: dict = {"mode": "smoke" if smoke else "gpu", "cpu_cores": cores,
                    "peak_tflops": None if smoke else args.peak_tflops}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        logs = out.parent / "logs"
        logs.mkdir(exist_ok=True)
        steps = args.steps or (6 if smoke else 120)
        batch = 8 if smoke else 64
        t0 = time.perf_counter()
        samples = (steps + 4) * batch
        spec = write_data(tmp, samples, 1 if smoke else min(cores, 8), (40, 72) if smoke else (384, 512))
        result["shards"] = {"samples": samples, "seconds": round(time.perf_counter() - t0, 1)}

        # 2. the real trainer
        config = REPO / "configs" / ("tiny.yaml" if smoke else "pretrain_base.yaml")
        ds = REPO / "ds_configs" / ("zero2_cpu.json" if smoke else "zero2.json")
        workers = 1 if smoke else max(1, min(cores - 2, 14))
        log_every = 2 if smoke else 20
        overrides = [f"data.shards={spec}", f"data.num_workers={workers}", f"train.log_every={log_every}",
                     f"train.batch_size_per_rank={batch}", "train.checkpoint_every=1000000",
                     "train.debug_records=false"]
        if not smoke:
            vocab = write_vocab(tmp / "vocab.txt")
            overrides += ["model.vision.init=null", "model.text.init=null", f"model.text.tokenizer={vocab}",
                          f"model.text.vocab_size={BERT_VOCAB_SIZE}", "model.text.pad_token_id=0",
                          "model.text.cls_token_id=2", "model.text.mask_token_id=4"]
        run_dir = tmp / "train"
        cmd = [py, "model/train.py", "--config", str(config), "--deepspeed_config", str(ds), "--output-dir",
               str(run_dir), "--max-steps", str(steps), *overrides]
        if stage(result, "train", cmd, 600 if smoke else 200, logs, env) is not None:
            cfg = load_config(config, [f"train.batch_size_per_rank={batch}"]
                              + ([f"model.text.vocab_size={BERT_VOCAB_SIZE}"] if not smoke else []))
            flops = pretraining_flops(cfg["model"], cfg["train"]["max_tokens"], batch)["total"]
            result["train"].update({"config": config.name, "deepspeed_config": ds.name, "batch_per_gpu": batch,
                                    "steps": steps, "loader_workers": workers,
                                    **train_summary(run_dir, flops, None if smoke else args.peak_tflops)})

        # 3. the model step alone
        cmd = [py, "benchmarks/step.py", "--configs", "tiny" if smoke else "base", "--steps", "1" if smoke else "5"]
        if not smoke:
            cmd += ["--device", "cuda", "--dtype", "bf16", "--batch-size", "base=64",
                    "--peak-tflops", str(args.peak_tflops)]
        text = stage(result, "step", cmd, 300 if smoke else 70, logs, env)
        if text is not None:
            result["step"]["results"] = json_lines(text)

        # 4. the loader, every core
        cmd = [py, "benchmarks/loader.py", "--images", "64" if smoke else "1536", "--batch", "16" if smoke else "64",
               "--repeats", "1",
               "--workers", str(1 if smoke else cores)] + ([] if smoke else ["--device", "cuda"])
        text = stage(result, "loader", cmd, 300 if smoke else 60, logs, env)
        if text is not None:
            start = text.find("{")
            result["loader"]["results"] = json.loads(text[start:]) if start >= 0 else text[-2000:]

        # 5. retrieval re-ranking: measured ITM pairs/s
        cmd = [py, "benchmarks/retrieval.py", "--throughput", "tiny" if smoke else "base",
               "--precision", "fp32", "bf16", "--repeats", "1" if smoke else "3"]
        cmd += ["--k", "4"] if smoke else ["--device", "cuda", "--k", "256"]
        text = stage(result, "retrieval", cmd, 300 if smoke else 60, logs, env)
        if text is not None:
            result["retrieval"]["results"] = json_lines(text)

        # 6. device-to-host syncs of the training loop (GPU only: tests/test_speed_syncs.py covers the CPU)
        if not smoke:
            cmd = [py, "benchmarks/syncs.py", "--deepspeed-config", str(REPO / "ds_configs" / "zero2.json"),
                   "data.augment.on_device=true", "data.num_workers=2"]
            text = stage(result, "syncs", cmd, 60, logs, env)
            lines = json_lines(text or "")
            if lines:
                r = lines[-1]
                result["syncs"]["calls_per_step"] = r["calls_per_step"]
                result["syncs"]["cuda_sync_warnings_per_step"] = r.get("cuda_sync_warnings_per_step")
                result["syncs"]["cuda_sync_warnings"] = r.get("cuda_sync_warnings")

    train = result.get("train", {})
    result["summary"] = {key: train.get(key) for key in ("samples_per_s", "mfu", "peak_memory_mb", "data_wait_frac")}
    result["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]), flush=True)
    print(f"[gpu.sh] {out}", flush=True)
    return 0 if all(result[k]["status"] == "ok" for k in ("train", "step", "loader", "retrieval")) else 1


if __name__ == "__main__":
    sys.exit(main())
