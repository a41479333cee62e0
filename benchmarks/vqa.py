"""VQA answer-ranking throughput (questions/s) with k_test candidates, tiny and base models.

    python benchmarks/vqa.py                        # tiny and base on the CPU (a few minutes)
    python benchmarks/vqa.py --device cuda          # the same on a GPU (larger batches there)
    python benchmarks/vqa.py --only base --batch 16 --batches 5

Each run builds `model.vqa.ALBEFVQA` with random weights from the config's
`model:` section (tiny: configs/vqa_tiny.yaml; base: configs/vqa.yaml, 384 px,
BERT-base vocabulary), a synthetic answer list (default 3,128 answers of 1-3
tokens, about the size of the reference's list) and random questions of 12
tokens, and times `ALBEFVQA.answer` (question encoding, first-token pass over
the list, teacher-forced scoring of the top k) phase by phase after one
warm-up batch, in fp32 under `torch.no_grad`. FLOPs per question are counted
once with torch's FlopCounterMode. Prints one JSON object per run.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.engine.config import load_config  # noqa: E402
from model.vqa import ALBEFVQA, rank_answers  # noqa: E402

CONFIGS = {"tiny": "vqa_tiny.yaml", "base": "vqa.yaml"}
QUESTION_TOKENS = 12
CPU_BATCH = {"tiny": 32, "base": 2}


def synthetic_answers(n: int, cfg: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] t1..tm [SEP] (m = 1..3) padded: ids and mask [n, 5]."""
    t = cfg["text"]
    low = max(t["cls_token_id"], t["mask_token_id"]) + 1
    ids = torch.full((n, 5), t["pad_token_id"], dtype=torch.long)
    lengths = torch.randint(1, 4, (n,), generator=generator)
    for row, m in enumerate(lengths.tolist()):
        ids[row, 0] = t["cls_token_id"]
        ids[row, 1:1 + m] = torch.randint(low, t["vocab_size"], (m,), generator=generator)
        ids[row, 1 + m] = low   # stands for [SEP]: the cost does not depend on the id
    return ids, (ids != t["pad_token_id"]).long()


def one_run(name: str, device: str, batch: int, batches: int, n_answers: int, k: int) -> dict:
    torch.manual_seed(0)
    cfg = copy.deepcopy(load_config(REPO_ROOT / "configs" / CONFIGS[name])["model"])
    cfg["vision"]["init"] = cfg["text"]["init"] = None
    model = ALBEFVQA(cfg).eval()
    dev = torch.device(device)
    g = torch.Generator().manual_seed(1)
    answer_ids, answer_mask = synthetic_answers(n_answers, cfg, g)
    res, t = cfg["vision"]["image_res"], cfg["text"]
    images = torch.randn(batch, 3, res, res, generator=g)
    questions = torch.randint(t["mask_token_id"] + 1, t["vocab_size"], (batch, QUESTION_TOKENS), generator=g)
    questions[:, 0] = t["cls_token_id"]
    question_mask = torch.ones_like(questions)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.answer(images[:1], questions[:1], question_mask[:1], answer_ids, answer_mask, k)
    flops = counter.get_total_flops()

    model.to(dev)
    images, questions, question_mask = images.to(dev), questions.to(dev), question_mask.to(dev)
    answer_ids, answer_mask = answer_ids.to(dev), answer_mask.to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    timings = {"encode_s": 0.0, "rank_s": 0.0}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        for i in range(batches + 1):           # the first batch warms up and is not timed
            sync()
            t0 = time.perf_counter()
            states = model.encode_question(images, questions, question_mask)
            sync()
            t1 = time.perf_counter()
            rank_answers(model.text_decoder, states, question_mask, answer_ids, answer_mask, k, t["pad_token_id"])
            sync()
            t2 = time.perf_counter()
            if i:
                timings["encode_s"] += t1 - t0
                timings["rank_s"] += t2 - t1
    total = timings["encode_s"] + timings["rank_s"]
    n_questions = batch * batches
    out = {
        "config": name, "device": device, "image_res": res, "answers": n_answers, "k_test": k,
        "batch": batch, "questions": n_questions, "questions_per_s": round(n_questions / total, 3),
        "encode_s": round(timings["encode_s"], 3), "rank_s": round(timings["rank_s"], 3),
        "gflops_per_question": round(flops / 1e9, 2), "achieved_gflops_s": round(flops * n_questions / 1e9 / total, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=sorted(CONFIGS), help="one model size (default: both)")
    ap.add_argument("--batch", type=int, help="questions per batch (default: CPU 32 tiny / 2 base, GPU 16)")
    ap.add_argument("--batches", type=int, default=2, help="timed batches after the warm-up batch")
    ap.add_argument("--answers", type=int, default=3128, help="length of the synthetic answer list")
    ap.add_argument("--k", type=int, default=128, help="k_test: candidates scored teacher-forced")
    args = ap.parse_args()
    for name in [args.only] if args.only else list(CONFIGS):
        batch = args.batch or (CPU_BATCH[name] if args.device == "cpu" else 16)
        print(json.dumps(one_run(name, args.device, batch, args.batches, args.answers, args.k)), flush=True)


if __name__ == "__main__":
    main()
