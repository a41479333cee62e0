"""Retrieval evaluation cost against the number of images and texts, and a COCO 5k extrapolation.

    python benchmarks/retrieval.py                 # tiny, mid and base on the CPU (a few minutes)
    python benchmarks/retrieval.py --device cuda   # the same sizes on a GPU
    python benchmarks/retrieval.py --only base:64:16   # one run: config:n_images:k

Each run builds the model with random weights, a synthetic evaluation set of
N images with 5 captions each (random pixels, random in-vocabulary words at the
retrieval text length) and times `model.tasks.retrieval_eval.evaluate` phase by
phase: unimodal features, ITC + ITM re-ranking of the top-k, metrics. Every
run is its own subprocess so its peak memory is its own. The cost model:

    time ~ N_img * t_image + N_txt * t_text + (N_img + N_txt) * k * t_pair + N_img * N_txt * t_rank

FLOPs per image, per text and per ITM pair are counted on the real modules
with torch's FlopCounterMode. The extrapolation to COCO 5k test (5,000 images,
25,000 captions, k=256) with the base model multiplies those counts by the
workload and divides by an assumed sustained FLOP rate (see `GPU_ASSUMPTIONS`;
evaluation runs in fp32, TF32 off, PyTorch's default); the metric time at full
COCO size is measured here directly. Prints one JSON object per run, then the
extrapolation.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.albef import ALBEF  # noqa: E402
from model.engine.config import load_config  # noqa: E402
from model.tasks.retrieval_eval import evaluate  # noqa: E402
from model.tasks.retrieval_metrics import retrieval_metrics  # noqa: E402
from model.weights.files import retrieval_model_config  # noqa: E402
from pipeline.tokenize import load_tokenizer  # noqa: E402

CAPTIONS_PER_IMAGE = 5   # COCO; Flickr30K has 5 too
WORDS_PER_CAPTION = 12   # typical COCO caption length (tokens before truncation at 30)
COCO = {"n_images": 5000, "n_texts": 25000, "k": 256}

# Sizes: (config, n_images, k). "mid" is a ViT-S/16-sized image encoder at 224 with a
# 384-wide 3+3-layer text side; "base" is the paper's model at the fine-tuning resolution.
CPU_RUNS = [("tiny", 64, 16), ("tiny", 128, 16), ("tiny", 256, 16), ("tiny", 128, 64),
            ("mid", 16, 16), ("mid", 32, 16), ("mid", 64, 16), ("base", 4, 8)]
MID_OVERRIDES = {
    "vision": {"image_res": 224, "patch_size": 16, "width": 384, "depth": 6, "num_heads": 6},
    "text": {"hidden_size": 384, "num_text_layers": 3, "num_fusion_layers": 3, "num_heads": 6,
             "intermediate_size": 1536},
    "embed_dim": 256,
}
# Sustained fp32 matmul throughput assumed for the extrapolation (TFLOP/s): half of the
# dense fp32 peak (A100 19.5, H100/H200 SXM 67); what bf16 could reach is given for scale.
GPU_ASSUMPTIONS = {"A100 fp32": 0.5 * 19.5, "H100/H200 fp32": 0.5 * 67.0, "H100/H200 bf16 (if added)": 0.4 * 989.0}


def model_config(name: str, tokenizer) -> dict:
    if name == "tiny":
        cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    else:
        cfg = load_config(REPO_ROOT / "configs" / "retrieval_coco.yaml")
        cfg["model"]["text"]["tokenizer"] = "configs/tiny_vocab.txt"  # ids only; no download
        if name == "mid":
            for key, value in MID_OVERRIDES.items():
                if isinstance(value, dict):
                    cfg["model"][key].update(value)
                else:
                    cfg["model"][key] = value
    return retrieval_model_config(cfg["model"], tokenizer)


class SyntheticEvalSet(Dataset):
    """The interface of `RetrievalEvalDataset` over generated tensors and captions."""

    def __init__(self, n_images: int, image_res: int, words: list[str], seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ann_file = f"synthetic-{n_images}"
        self.image_res = image_res
        self.images = [f"{i}.jpg" for i in range(n_images)]
        self.texts = [" ".join(rng.choice(words, WORDS_PER_CAPTION)) for _ in range(n_images * CAPTIONS_PER_IMAGE)]
        self.txt2img = [t // CAPTIONS_PER_IMAGE for t in range(len(self.texts))]
        self.img2txt = [list(range(i * CAPTIONS_PER_IMAGE, (i + 1) * CAPTIONS_PER_IMAGE)) for i in range(n_images)]
        self.image_ok = [True] * n_images
        self.text_ok = [True] * len(self.texts)
        self.problems: list = []

    def mark_unreadable(self, index: int, error: str) -> None:
        raise RuntimeError(f"synthetic image {index} cannot fail: {error}")

    def problem_counts(self) -> dict:
        return {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        return {"image": torch.randn(3, self.image_res, self.image_res, generator=g), "index": index, "error": None}


def count_flops(model: ALBEF, res: int, length: int, vocab_low: int, vocab_high: int) -> dict:
    """FLOPs of one image encoding, one text encoding and one ITM pair (fusion + head)."""
    image = torch.randn(1, 3, res, res)
    ids = torch.randint(vocab_low, vocab_high, (1, length))
    mask = torch.ones_like(ids)
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            img_tok, _ = model.encode_image(image)
        counts["image"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            txt_tok, _ = model.encode_text(ids, mask)
        counts["text"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.itm_logits(img_tok, txt_tok, mask)
        counts["pair"] = fc.get_total_flops()
    return counts


def one_run(name: str, n_images: int, k: int, device: str) -> dict:
    torch.manual_seed(0)
    tokenizer = load_tokenizer("configs/tiny_vocab.txt")
    mcfg = model_config(name, tokenizer)
    model = ALBEF(mcfg).eval()
    res = mcfg["vision"]["image_res"]
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower()]
    max_tokens = load_config(REPO_ROOT / "configs" / "retrieval_base.yaml")["train"]["max_tokens"]
    flops = count_flops(model, res, max_tokens, mcfg["text"]["mask_token_id"] + 1, mcfg["text"]["vocab_size"])
    dev = torch.device(device)
    model.to(dev)
    dataset = SyntheticEvalSet(n_images, res, words)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    result, timings, _ = evaluate(model, dataset, tokenizer, k_test=k, max_tokens=max_tokens,
                                  image_batch_size=64, text_batch_size=256, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    total = time.perf_counter() - t0
    n_txt = len(dataset.texts)
    pairs = (n_images + n_txt) * min(k, n_txt, n_images)
    work = n_images * flops["image"] + n_txt * flops["text"] + pairs * flops["pair"]
    out = {
        "config": name, "device": device, "n_images": n_images, "n_texts": n_txt, "k": k, "itm_pairs": pairs,
        "image_res": res, **{phase: round(v, 4) for phase, v in timings.items()}, "total_s": round(total, 3),
        "per_pair_ms": round(1000 * timings["rerank_s"] / pairs, 4),
        "gflops_per_image": flops["image"] / 1e9, "gflops_per_text": flops["text"] / 1e9,
        "gflops_per_pair": flops["pair"] / 1e9, "achieved_gflops_s": round(work / 1e9 / total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def coco_extrapolation(base_run: dict) -> dict:
    """Cost of a COCO 5k test evaluation with the base model, from counted FLOPs and assumed rates."""
    n_img, n_txt, k = COCO["n_images"], COCO["n_texts"], COCO["k"]
    pairs = (n_img + n_txt) * k
    gflop = {"image_features": n_img * base_run["gflops_per_image"],
             "text_features": n_txt * base_run["gflops_per_text"],
             "itm_rerank": pairs * base_run["gflops_per_pair"]}
    total_gflop = sum(gflop.values())
    res, width, hidden = 384, 768, 768
    tokens = (res // 16) ** 2 + 1
    max_tokens = 30
    feature_bytes = 4 * (n_img * tokens * width + n_txt * max_tokens * hidden + (n_img + n_txt) * 256)
    score_bytes = 4 * 3 * n_img * n_txt   # sims + the two score matrices (fp32)
    # metric time at full size, measured: rank computation on random matrices
    rng = np.random.default_rng(0)
    s_i2t = rng.standard_normal((n_img, n_txt), dtype=np.float32)
    t0 = time.perf_counter()
    retrieval_metrics(s_i2t, s_i2t.T, [list(range(5 * i, 5 * i + 5)) for i in range(n_img)],
                      [t // 5 for t in range(n_txt)])
    metrics_s = time.perf_counter() - t0
    return {
        "workload": {**COCO, "itm_pairs": pairs},
        "gflop": {key: round(v) for key, v in gflop.items()}, "total_pflop": round(total_gflop / 1e6, 2),
        "estimated_minutes": {gpu: round(total_gflop / (tflops * 1e3) / 60, 1)
                              for gpu, tflops in GPU_ASSUMPTIONS.items()},
        "cpu_minutes_at_measured_base_rate": round(total_gflop / base_run["achieved_gflops_s"] / 60),
        "gpu_memory_gb": {"features_fp32": round(feature_bytes / 1e9, 1),
                          "score_matrices_fp32": round(score_bytes / 1e9, 1)},
        "metrics_s_measured_cpu": round(metrics_s, 1),
        "assumptions": ("fp32 as `evaluate` runs (TF32 off); sustained TFLOP/s in GPU_ASSUMPTIONS; one ITM "
                        "pass of k pairs per query as the reference; feature extraction dominated by "
                        "compute (decoding 5k JPEGs with workers overlaps it); peak memory adds one "
                        "k-pair fusion batch (< 1 GB)"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", help="config:n_images:k (runs in this process)")
    args = ap.parse_args()
    if args.only:
        name, n, k = args.only.split(":")
        print(json.dumps(one_run(name, int(n), int(k), args.device)), flush=True)
        return
    runs = []
    for name, n, k in CPU_RUNS:
        proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--only", f"{name}:{n}:{k}"],
                              cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    base = max((r for r in runs if r["config"] == "base"), key=lambda r: r["n_images"])
    print(json.dumps({"coco_5k_base_extrapolation": coco_extrapolation(base)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
