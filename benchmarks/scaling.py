"""Per-step communication volume by ZeRO stage and a weak-scaling PROJECTION (docs/SCALING.md).

    python benchmarks/scaling.py [--mfu 0.40] [--peak-tflops 989] [--nvlink-gbs 450] [--ib-gbits 400]
                                 [--efficiency 0.8] [--batch 64] [--fp32-reductions] [--markdown]

Volumes come from the base model's tensors (built on the meta device: sizes only)
and how DeepSpeed 0.19.8 communicates in this project's torch_autocast mode:
gradients of Linear/Conv parameters (the default `torch_autocast.lower_precision_safe_modules`;
the word embeddings too, tied to the MLM decoder, a Linear) are reduced in bf16, the rest in
fp32; the parameters themselves are fp32, so every parameter all-gather moves 4 bytes per element.
Times are ring-algorithm estimates, bytes x (N-1)/N / bus bandwidth, at the stated link
rates x `--efficiency`; compute time is analytic FLOPs (benchmarks/flops.py) at an
ASSUMED model FLOPs utilisation (`--mfu`; replace it with the one benchmarks/gpu.sh measures).
Nothing here was measured on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGES_14M = 14.1e6
EPOCHS = 30
GPUS = (8, 16, 32, 64)
GPUS_PER_NODE = 8


def parameter_groups(fp32_reductions: bool = False) -> dict:
    """Element counts: trainable (by reduction dtype), momentum, and ZeRO-3 gathers per step."""
    import torch

    from model.albef import ALBEF
    from model.engine.config import load_config

    cfg = load_config(REPO / "configs" / "pretrain_base.yaml")["model"]
    cfg["vision"]["init"] = cfg["text"]["init"] = None
    with torch.device("meta"):
        m = ALBEF(cfg)
    safe = () if fp32_reductions else (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    trainable = {id(p) for p in m.trainable_parameters()}
    low = {id(p) for mod in m.modules() if type(mod) in safe for p in mod.parameters(recurse=False)}
    params = {id(p): p for p in m.parameters()}
    grad_bf16 = sum(p.numel() for i, p in params.items() if i in trainable and i in low)
    grad_fp32 = sum(p.numel() for i, p in params.items() if i in trainable and i not in low)
    n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    te, te_m = m.text_encoder, m.text_encoder_m
    emb, emb_m = n(te.embeddings), n(te_m.embeddings)
    text_layers, fusion = sum(n(x) for x in te.text_layers), sum(n(x) for x in te.fusion_layers)
    head = n(te.mlm_head) - te.mlm_head.decoder.weight.numel()   # the decoder weight is the word embedding
    word = te.embeddings.word_embeddings.weight.numel()
    vit, small = n(m.visual_encoder), n(m.vision_proj) + n(m.text_proj) + n(m.itm_head) + 1
    # forward module calls per step (model/albef.py): embeddings and text layers on the caption and
    # on the masked caption; fusion layers in ITM and MLM; the MLM head (its decoder = word embeddings)
    online_calls = {"vit": (vit, 1), "embeddings": (emb, 2), "decoder=word_embeddings": (word, 1),
                    "text_layers": (text_layers, 2), "fusion_layers": (fusion, 2), "mlm_head": (head, 1),
                    "projections_itm_temp": (small, 1)}
    momentum_calls = {"vit": (n(m.visual_encoder_m), 1), "embeddings": (emb_m, 2), "decoder=word_embeddings": (word, 1),
                      "text_layers": (sum(n(x) for x in te_m.text_layers), 2),
                      "fusion_layers": (sum(n(x) for x in te_m.fusion_layers), 1),
                      "mlm_head": (head, 1), "projections": (n(m.vision_proj_m) + n(m.text_proj_m), 1)}
    online = sum(p.numel() for i, p in params.items() if i in trainable)
    momentum = sum(p.numel() for p in params.values()) - online
    per_call_fwd = sum(k * c for k, c in online_calls.values())
    per_call_m = sum(k * c for k, c in momentum_calls.values())
    return {"trainable": online, "grad_bf16": grad_bf16, "grad_fp32": grad_fp32, "momentum": momentum,
            # ZeRO-3 gathers: lower = each parameter once per forward/backward; upper = once per module call
            "z3_gather_lower": 2 * online + momentum, "z3_gather_upper": 2 * per_call_fwd + per_call_m}


def volumes(g: dict, batch: int) -> dict:
    """Bytes each GPU sends (= receives) per optimiser step, before the (N-1)/N ring factor."""
    grads = 2 * g["grad_bf16"] + 4 * g["grad_fp32"]
    params = 4 * g["trainable"]
    queue = 2 * 256 * 4 * batch        # image_feat_m + text_feat_m rows of this rank, all-gathered (x (N-1))
    return {
        "zero0_allreduce_grads": 2 * 4 * g["trainable"],   # engine all-reduce in communication_data_type (fp32 default)
        "zero1_2_reduce_scatter_grads": grads, "zero1_2_allgather_params_fp32": params,
        "zero3_reduce_scatter_grads": grads,
        "zero3_allgather_lower": 4 * g["z3_gather_lower"], "zero3_allgather_upper": 4 * g["z3_gather_upper"],
        "queue_allgather_per_peer": queue,
    }


def projection(g: dict, v: dict, gflop_per_sample: float, args) -> list[dict]:
    rows = []
    step_flop = gflop_per_sample * 1e9 * args.batch
    compute = step_flop / (args.mfu * args.peak_tflops * 1e12)
    bwd = compute * 2 / 3 * (1 - 60.0 / gflop_per_sample)   # backward share, momentum forwards (~57 GFLOP) excluded
    for gpus in GPUS:
        bus = (args.nvlink_gbs if gpus <= GPUS_PER_NODE else args.ib_gbits / 8) * 1e9 * args.efficiency
        ring = (gpus - 1) / gpus / bus
        rs, ag = v["zero1_2_reduce_scatter_grads"] * ring, v["zero1_2_allgather_params_fp32"] * ring
        queue = v["queue_allgather_per_peer"] * (gpus - 1) / bus
        z2_overlap = compute + max(0.0, rs - bwd) + ag + queue          # RS hidden behind backward, AG after the step
        z2_serial = compute + rs + ag + queue
        z3_lo = (v["zero3_allgather_lower"] + v["zero3_reduce_scatter_grads"]) * ring
        z3_hi = (v["zero3_allgather_upper"] + v["zero3_reduce_scatter_grads"]) * ring
        z3_overlap, z3_serial = max(compute, z3_lo) + queue, compute + z3_hi + queue
        global_batch = gpus * args.batch
        steps = IMAGES_14M * EPOCHS / global_batch
        row = {"gpus": gpus, "global_batch": global_batch, "bus_gb_s": round(bus / 1e9),
               "compute_ms": round(compute * 1e3, 1),
               "zero2_comm_ms": {"reduce_scatter": round(rs * 1e3, 1), "allgather_params": round(ag * 1e3, 1)},
               "zero2_step_ms": [round(z2_overlap * 1e3, 1), round(z2_serial * 1e3, 1)],
               "zero3_comm_ms": [round(z3_lo * 1e3, 1), round(z3_hi * 1e3, 1)],
               "zero3_step_ms": [round(z3_overlap * 1e3, 1), round(z3_serial * 1e3, 1)]}
        for stage, (best, worst) in (("zero2", (z2_overlap, z2_serial)), ("zero3", (z3_overlap, z3_serial))):
            row[f"{stage}_samples_per_s"] = [round(global_batch / worst), round(global_batch / best)]
            row[f"{stage}_efficiency"] = [round(compute / worst, 2), round(compute / best, 2)]
            row[f"{stage}_14m_hours"] = [round(steps * best / 3600, 1), round(steps * worst / 3600, 1)]
        rows.append(row)
    return rows


def main() -> None:
    from benchmarks.flops import pretraining_flops
    from model.engine.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.40, help="ASSUMED model FLOPs utilisation of the compute")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM)")
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per GPU per direction")
    parser.add_argument("--ib-gbits", type=float, default=400.0, help="inter-node Gb/s per GPU (one NIC each)")
    parser.add_argument("--efficiency", type=float, default=0.8, help="achieved fraction of the link rate")
    parser.add_argument("--batch", type=int, default=64, help="per GPU (weak scaling: fixed)")
    parser.add_argument("--fp32-reductions", action="store_true",
                        help='all gradient reductions in fp32 ("lower_precision_safe_modules": [])')
    args = parser.parse_args()
    g = parameter_groups(args.fp32_reductions)
    v = volumes(g, args.batch)
    cfg = load_config(REPO / "configs" / "pretrain_base.yaml")
    gflop = pretraining_flops(cfg["model"], cfg["train"]["max_tokens"], args.batch)["total"] / 1e9
    print(json.dumps({"parameters": g, "bytes_per_step_per_gpu_before_ring_factor": v,
                      "gflop_per_sample": round(gflop, 1), "assumptions": vars(args),
                      "projection": projection(g, v, gflop, args)}, indent=1))


if __name__ == "__main__":
    main()
