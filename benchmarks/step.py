"""Forward + backward time per sample and peak memory of one ALBEF pretraining step.

    python benchmarks/step.py                              # tiny and base on the CPU, fp32
    python benchmarks/step.py --device cuda --dtype bf16 --batch-size base=64
    python benchmarks/step.py --configs base --grad-checkpointing   # peak memory without / with it

Prints one JSON object per configuration (each measured in a fresh process, so
the peak memory is that configuration's own); with `--grad-checkpointing`, each
configuration runs without and with `model.grad_checkpointing` and a comparison
line follows. The model is built with random
weights (no downloads); inputs are random images and token ids at the
pretraining text length. bf16 runs under torch.autocast, as DeepSpeed's
torch_autocast mode does (parameters, momentum copies and queues stay fp32).
`analytic_gflops_per_sample` is the baseline count of benchmarks/flops.py (ViT,
text, fusion with cross-attention, ITM over 3 pairs per sample, MLM, momentum
forwards; x3 for forward + backward of the trained parts); `flops_per_sample`
is counted once on the real step with torch's FlopCounterMode (a check on the
analytic count). With `--peak-tflops` the model FLOPs utilisation is reported:
`mfu` from the analytic count, `mfu_counted` from the counted one.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.albef import ALBEF  # noqa: E402
from model.engine.config import load_config  # noqa: E402
from model.engine.progress import memory_mb, peak_memory_mb, reset_peak_memory  # noqa: E402
from model.losses import total_loss  # noqa: E402
from benchmarks.flops import pretraining_flops  # noqa: E402

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


def saved_for_backward_mib(model, inputs, alpha: float, device: torch.device, dtype: str) -> float:
    """Distinct non-parameter storages autograd keeps from one forward for the backward: the activation
    memory gradient checkpointing trades for recomputation (exact on any device, unlike a CPU's RSS)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device_type=device.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
        out = model(*inputs, alpha=alpha)
    del out
    return sum(kept.values()) / 2**20


def measure(name: str, batch_size: int, steps: int, device: torch.device, dtype: str,
            peak_tflops: float | None, grad_checkpointing: bool = False) -> dict:
    cfg = load_config(CONFIGS[name])
    cfg["model"]["vision"]["init"] = cfg["model"]["text"]["init"] = None
    cfg["model"]["grad_checkpointing"] = grad_checkpointing
    torch.manual_seed(0)
    model = ALBEF(cfg["model"]).to(device).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    inputs = _batch(cfg, batch_size, device, torch.Generator().manual_seed(0))
    alpha = cfg["train"]["alpha"]

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
            loss = total_loss(model(*inputs, alpha=alpha))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, kernels)
    activations = saved_for_backward_mib(model, inputs, alpha, device, dtype)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    _sync(device)
    before_mb = memory_mb(device)   # model, optimiser state, (CPU) the process itself
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    result = {
        "config": name, "device": str(device), "dtype": dtype, "batch_size": batch_size, "steps": steps,
        "grad_checkpointing": grad_checkpointing,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "seconds_per_step": round(seconds, 4),
        "seconds_per_sample": round(seconds / batch_size, 5),
        "samples_per_second": round(batch_size / seconds, 2),
        "flops_per_sample": flops / batch_size,
        "achieved_tflops": round(flops / seconds / 1e12, 3),
    }
    analytic = pretraining_flops(cfg["model"], cfg["train"]["max_tokens"], batch_size)["total"]
    result["analytic_gflops_per_sample"] = round(analytic / 1e9, 3)
    result["counted_over_analytic"] = round(flops / batch_size / analytic, 3)
    result["analytic_tflops"] = round(analytic * batch_size / seconds / 1e12, 3)
    # GPU: allocated memory; CPU: the process's resident set (libraries included)
    peak_mb = peak_memory_mb(device)
    result["peak_memory_mib"] = round(peak_mb, 1)
    result["step_memory_mib"] = round(peak_mb - before_mb, 1)   # activations + gradients above the resting state
    result["saved_for_backward_mib"] = round(activations, 1)
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = round(analytic * batch_size / seconds / 1e12 / peak_tflops, 4)
        result["mfu_counted"] = round(flops / seconds / 1e12 / peak_tflops, 4)
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
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="measure each config without and with model.grad_checkpointing and compare peak memory")
    args = parser.parse_args()
    batch = dict(DEFAULT_BATCH)
    for item in args.batch_size:
        key, _, value = item.partition("=")
        if key not in CONFIGS or not value.isdigit() or int(value) < 2:
            parser.error(f"--batch-size {item!r}: expected CONFIG=N with CONFIG in {sorted(CONFIGS)} and N >= 2")
        batch[key] = int(value)
    device = torch.device(args.device)
    variants = (False, True) if args.grad_checkpointing else (False,)
    for name in args.configs:
        cfg = load_config(CONFIGS[name])
        flops = pretraining_flops(cfg["model"], cfg["train"]["max_tokens"], batch[name])
        flops.pop("total")
        print(json.dumps({"config": name, "analytic_flops_per_sample": flops}), flush=True)   # the baseline
        results = {}
        for checkpointing in variants:
            # a fresh process per measurement: the CPU peak RSS then holds this configuration only
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results[checkpointing] = pool.submit(measure, name, batch[name], args.steps, device, args.dtype,
                                                     args.peak_tflops, checkpointing).result()
            print(json.dumps(results[checkpointing]), flush=True)
        if args.grad_checkpointing:
            without, with_ = results[False], results[True]
            print(json.dumps({
                "config": name, "comparison": "grad_checkpointing",
                "peak_memory_mib": {"without": without["peak_memory_mib"], "with": with_["peak_memory_mib"]},
                "step_memory_mib": {"without": without["step_memory_mib"], "with": with_["step_memory_mib"]},
                "saved_for_backward_mib": {"without": without["saved_for_backward_mib"],
                                           "with": with_["saved_for_backward_mib"]},
                "activations_saved": round(1 - with_["saved_for_backward_mib"] / without["saved_for_backward_mib"], 3),
                "time_factor": round(with_["seconds_per_step"] / without["seconds_per_step"], 2),
            }), flush=True)


if __name__ == "__main__":
    main()
