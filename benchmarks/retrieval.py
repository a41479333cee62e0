"""Retrieval evaluation cost against the number of images and texts, and a COCO 5k extrapolation.

    python benchmarks/retrieval.py                 # tiny, mid and base on the CPU (a few minutes)
    python benchmarks/retrieval.py --device cuda   # the same sizes on a GPU
    python benchmarks/retrieval.py --only base:64:16   # one run: config:n_images:k
    python benchmarks/retrieval.py --throughput base --device cuda --k 256 --precision fp32 bf16

Each run builds the model with random weights, a synthetic evaluation set of
N images with 5 captions each (random pixels, random in-vocabulary words at the
retrieval text length) and times `model.tasks.retrieval_eval.evaluate` phase by
phase: unimodal features, ITC + ITM re-ranking of the top-k, metrics. Every
run is its own subprocess so its peak memory is its own. The cost model:

    time ~ N_img * t_image + N_txt * t_text + (N_img + N_txt) * k * t_pair + N_img * N_txt * t_rank

FLOPs per image, per text and per ITM pair are counted on the real modules
with torch's FlopCounterMode. `--throughput CONFIG` measures, on `--device` and
per `--precision` (eval.precision: fp32, or bf16 autocast), images/s and
texts/s of the unimodal encoders and ITM pairs/s of the re-ranking as
`evaluate` runs it: one image against its k candidate texts (the image's
cross-attention keys/values computed once) and one text against its k candidate
images; and from those measured rates the time of a COCO 5k test evaluation
(5,000 images, 25,000 captions, k=256; one process). The default run ends with
that projection for the base model from rates measured on this device (small k
on a CPU); the metric time at full COCO size is measured directly. Prints one
JSON object per run, then the projection.
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


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call (a shared machine only slows a call down)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(name: str, device: str, k: int, precision: str, repeats: int = 3, image_batch: int = 64,
               text_batch: int = 256) -> dict:
    """Measured images/s, texts/s and ITM pairs/s (both re-ranking directions) of one config."""
    from model.tasks.retrieval_eval import eval_autocast
    torch.manual_seed(0)
    dev = torch.device(device)
    tokenizer = load_tokenizer("configs/tiny_vocab.txt")
    mcfg = model_config(name, tokenizer)
    model = ALBEF(mcfg).eval().to(dev)
    res = mcfg["vision"]["image_res"]
    length = load_config(REPO_ROOT / "configs" / "retrieval_base.yaml")["train"]["max_tokens"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(max(image_batch, k), 3, res, res, generator=g).to(dev)
    ids = torch.randint(mcfg["text"]["mask_token_id"] + 1, mcfg["text"]["vocab_size"], (max(text_batch, k), length),
                        generator=g)
    ids[:, 0] = mcfg["text"]["cls_token_id"]
    ids, mask = ids.to(dev), torch.ones_like(ids).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad(), eval_autocast(dev, precision):
        image_s = _timed(lambda: model.encode_image(images[:image_batch]), dev, repeats)
        text_s = _timed(lambda: model.encode_text(ids[:text_batch], mask[:text_batch]), dev, repeats)
        img_tok = model.encode_image(images[:k])[0].float()     # evaluate keeps features in fp32
        txt_tok = model.encode_text(ids[:k], mask[:k])[0].float()
        zeros = torch.zeros(k, dtype=torch.long, device=dev)
        i2t_s = _timed(lambda: model.itm_logits(img_tok[:1], txt_tok, mask[:k], image_index=zeros), dev, repeats)
        t2i_s = _timed(lambda: model.itm_logits(img_tok, txt_tok[:1].expand(k, -1, -1), mask[:1].expand(k, -1)),
                       dev, repeats)
    rates = {"images_per_s": image_batch / image_s, "texts_per_s": text_batch / text_s,
             "itm_pairs_per_s_i2t": k / i2t_s, "itm_pairs_per_s_t2i": k / t2i_s}
    out = {"config": name, "device": device, "precision": precision, "k": k, "image_res": res,
           "image_batch": image_batch, "text_batch": text_batch, **{key: round(v, 1) for key, v in rates.items()}}
    out["coco_5k_projection"] = coco_projection(rates, k)
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def coco_projection(rates: dict, measured_k: int) -> dict:
    """Minutes of a COCO 5k test evaluation (one process) at the measured rates; re-ranking at k=256
    uses the pairs/s measured at `measured_k` (per-pair cost barely depends on k once k fills the device)."""
    n_img, n_txt, k = COCO["n_images"], COCO["n_texts"], COCO["k"]
    seconds = {"image_features": n_img / rates["images_per_s"], "text_features": n_txt / rates["texts_per_s"],
               "rerank_i2t": n_img * k / rates["itm_pairs_per_s_i2t"],
               "rerank_t2i": n_txt * k / rates["itm_pairs_per_s_t2i"]}
    return {"minutes": {key: round(v / 60, 2) for key, v in seconds.items()},
            "total_minutes": round(sum(seconds.values()) / 60, 1), "itm_pairs": (n_img + n_txt) * k,
            "rates_measured_at_k": measured_k}


def coco_extrapolation(base_run: dict, rates: dict) -> dict:
    """COCO 5k test with the base model: counted FLOPs, and the time at the rates measured here."""
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
        "measured_rates": {key: round(v, 2) for key, v in rates.items() if key != "coco_5k_projection"
                           and isinstance(v, float)},
        "projected_minutes_this_device": rates["coco_5k_projection"]["total_minutes"],
        "gpu_memory_gb": {"features_fp32": round(feature_bytes / 1e9, 1),
                          "score_matrices_fp32": round(score_bytes / 1e9, 1)},
        "metrics_s_measured_cpu": round(metrics_s, 1),
        "assumptions": ("one process; the rates of `throughput` (this device, fp32 as `evaluate` runs by "
                        "default); one ITM pass of k pairs per query as the reference; feature extraction "
                        "dominated by compute (decoding 5k JPEGs with workers overlaps it)"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", help="config:n_images:k (runs in this process)")
    ap.add_argument("--throughput", metavar="CONFIG", choices=("tiny", "mid", "base"),
                    help="measure images/s, texts/s and ITM pairs/s of CONFIG, and project COCO 5k")
    ap.add_argument("--k", type=int, default=None, help="--throughput: candidates per query (default: 256 on "
                                                        "cuda, 8 on cpu)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-batch", type=int, default=None, help="--throughput (default: 64 on cuda, 4 on cpu)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.only:
        name, n, k = args.only.split(":")
        print(json.dumps(one_run(name, int(n), int(k), args.device)), flush=True)
        return
    if args.throughput:
        for precision in args.precision:
            print(json.dumps(throughput(args.throughput, args.device, args.k or (256 if cuda else 8), precision,
                                        args.repeats, args.image_batch or (64 if cuda else 4),
                                        256 if cuda else 16)), flush=True)
        return
    runs = []
    for name, n, k in CPU_RUNS:
        proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--only", f"{name}:{n}:{k}"],
                              cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    base = max((r for r in runs if r["config"] == "base"), key=lambda r: r["n_images"])
    rates = throughput("base", args.device, args.k or (256 if cuda else 8), args.precision[0], args.repeats,
                       args.image_batch or (64 if cuda else 4), 256 if cuda else 16)
    print(json.dumps(rates), flush=True)
    print(json.dumps({"coco_5k_base_extrapolation": coco_extrapolation(base, rates)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
