"""Forward + backward time per sample and peak memory of one ALBEF pretraining step.

    python benchmarks/step.py                              # tiny and base on the CPU, fp32
    python benchmarks/step.py --device cuda --dtype bf16 --batch-size base=64

Prints one JSON object per configuration. The model is built with random
weights (no downloads); inputs are random images and token ids at the
pretraining text length. bf16 runs under torch.autocast, as DeepSpeed's
torch_autocast mode does (parameters, momentum copies and queues stay fp32).
`flops_per_sample` is counted once with torch's FlopCounterMode (matmuls and
attention, forward + backward, momentum forwards included); with `--peak-tflops`
the model FLOPs utilisation is reported too.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.albef import ALBEF  # noqa: E402
from model.engine.config import load_config  # noqa: E402

CONFIGS = {"tiny": REPO_ROOT / "configs" / "tiny.yaml", "base": REPO_ROOT / "configs" / "pretrain_base.yaml"}
DEFAULT_BATCH = {"tiny": 8, "base": 2}   # base at 2 keeps a CPU run to seconds per step
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _batch(cfg: dict, batch_size: int, device: torch.device, generator: torch.Generator) -> tuple:
    res = cfg["model"]["vision"]["image_res"]
    text = cfg["model"]["text"]
    length = cfg["train"]["max_tokens"]
    image = torch.randn(batch_size, 3, res, res, generator=generator).to(device)
    ids = torch.randint(text["mask_token_id"] + 1, text["vocab_size"], (batch_size, length), generator=generator)
    ids[:, 0] = text["cls_token_id"]
    return image, ids.to(device), torch.ones_like(ids).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch_size: int, steps: int, device: torch.device, dtype: str,
            peak_tflops: float | None) -> dict:
    cfg = load_config(CONFIGS[name])
    cfg["model"]["vision"]["init"] = cfg["model"]["text"]["init"] = None
    torch.manual_seed(0)
    model = ALBEF(cfg["model"]).to(device).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    inputs = _batch(cfg, batch_size, device, torch.Generator().manual_seed(0))
    alpha = cfg["train"]["alpha"]

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
            loss = model(*inputs, alpha=alpha)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, kernels)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    result = {
        "config": name, "device": str(device), "dtype": dtype, "batch_size": batch_size, "steps": steps,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "seconds_per_step": round(seconds, 4),
        "seconds_per_sample": round(seconds / batch_size, 5),
        "samples_per_second": round(batch_size / seconds, 2),
        "flops_per_sample": flops / batch_size,
        "achieved_tflops": round(flops / seconds / 1e12, 3),
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:  # the whole process's peak resident set (includes the libraries and earlier configs)
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if peak_tflops:
        result["mfu"] = round(flops / seconds / 1e12 / peak_tflops, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tiny", "base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up and one counted step")
    parser.add_argument("--batch-size", nargs="*", default=[], metavar="CONFIG=N",
                        help=f"per-config batch size (defaults: {DEFAULT_BATCH})")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense TFLOP/s in --dtype, to report MFU")
    args = parser.parse_args()
    batch = dict(DEFAULT_BATCH)
    for item in args.batch_size:
        key, _, value = item.partition("=")
        if key not in CONFIGS or not value.isdigit() or int(value) < 2:
            parser.error(f"--batch-size {item!r}: expected CONFIG=N with CONFIG in {sorted(CONFIGS)} and N >= 2")
        batch[key] = int(value)
    device = torch.device(args.device)
    for name in args.configs:
        print(json.dumps(measure(name, batch[name], args.steps, device, args.dtype, args.peak_tflops)), flush=True)


if __name__ == "__main__":
    main()
