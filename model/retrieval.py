"""Image-text retrieval: evaluation and fine-tuning (Flickr30K / COCO), the reference's recipe.

    python -m model.retrieval evaluate --checkpoint CKPT --config configs/retrieval_flickr.yaml \
        [--split test|val] [--output JSON] [--save-scores] [key=value ...]
    torchrun --nproc_per_node N -m model.retrieval evaluate ...    (queries split across ranks)
    deepspeed model/retrieval.py finetune --config configs/retrieval_coco.yaml --checkpoint CKPT \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [key=value ...]

`evaluate` prints the R@1/5/10 table and writes, next to the checkpoint,
`<checkpoint>.<config>_<split>.json`: metrics, per-query ranks (0-based; null =
unscored), unscored queries with reasons, per-item problems of the annotation
file, the weight-loading report and timings. `--save-scores` adds the two
score matrices as `.npz`.

`finetune` is described in `model/retrieval_finetune.py`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `deepspeed model/retrieval.py` runs this file as a script: make the repo importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist

from model.dist_env import apply_slurm_env

REQUIRED = {
    "data": ("train_file", "val_file", "test_file", "image_root", "max_words", "num_workers", "augment"),
    "eval": ("k_test", "image_batch_size", "text_batch_size"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ALBEF image-text retrieval")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="ITC top-k + ITM re-ranking evaluation of a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="released-layout file, run folder or checkpoint folder")
    ev.add_argument("--config", required=True, help="retrieval config (e.g. configs/retrieval_flickr.yaml)")
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--output", help="result JSON (default: next to the checkpoint)")
    ev.add_argument("--save-scores", action="store_true", help="also write the score matrices (.npz)")
    ev.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    ev.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    ft = sub.add_parser("finetune", help="fine-tune with ITC (idx-aware) + ITM in a DeepSpeed engine")
    ft.add_argument("--checkpoint", required=True, help="weights to start from (see evaluate)")
    ft.add_argument("--config", required=True, help="retrieval config (e.g. configs/retrieval_coco.yaml)")
    ft.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (e.g. ds_configs/zero2.json)")
    ft.add_argument("--output-dir", help="run folder (default: train.output_dir of the config)")
    ft.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser.parse_args(argv)


def load_retrieval_config(path: str, overrides: list[str]) -> dict:
    """The run config with `${VAR:-default}` expanded in the data paths; missing settings named."""
    from model.config import load_config
    from model.train import expand_env

    cfg = load_config(path, overrides)
    for section, keys in REQUIRED.items():
        missing = [f"{section}.{k}" for k in keys if k not in (cfg.get(section) or {})]
        if missing:
            raise ValueError(f"config {path} lacks {', '.join(missing)} (see configs/retrieval_base.yaml)")
    data = cfg["data"]
    files = data["train_file"]
    data["train_file"] = [expand_env(f) for f in ([files] if isinstance(files, str) else files or [])]
    for key in ("val_file", "test_file", "image_root"):
        if data[key] is not None:
            data[key] = expand_env(data[key])
    k = cfg["eval"]["k_test"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"eval.k_test={k!r} must be a positive integer")
    return cfg


def eval_dataset(cfg: dict, split: str):
    from pipeline.annotations import RetrievalEvalDataset
    from pipeline.transforms import ImageTransform

    ann_file = cfg["data"][f"{split}_file"]
    if not ann_file:
        raise ValueError(f"data.{split}_file is not set")
    return RetrievalEvalDataset(ann_file, cfg["data"]["image_root"],
                                ImageTransform(cfg["model"]["vision"]["image_res"], train=False),
                                max_words=cfg["data"]["max_words"])


def run_evaluation(model, dataset, tokenizer, cfg: dict, device) -> tuple:
    """`evaluate` with the config's eval settings (shared by the CLI and fine-tuning)."""
    from model.retrieval_eval import evaluate

    e = cfg["eval"]
    return evaluate(model, dataset, tokenizer, k_test=e["k_test"], max_tokens=cfg["train"]["max_tokens"],
                    image_batch_size=e["image_batch_size"], text_batch_size=e["text_batch_size"],
                    device=device, num_workers=cfg["data"]["num_workers"])


def result_record(result, dataset, timings: dict, **extra) -> dict:
    """The JSON written after an evaluation: metrics, per-query ranks, problems, timings."""
    return {**extra, **result.to_json(), "annotation_file": dataset.ann_file,
            "problems": dataset.problems, "problem_counts": dataset.problem_counts(), "timings_s": timings}


def default_output(checkpoint: str, config: str, split: str) -> Path:
    ckpt = Path(checkpoint)
    name = f"{Path(config).stem}_{split}.json"
    return ckpt / name if ckpt.is_dir() else ckpt.with_name(f"{ckpt.stem}.{name}")


def _init_distributed(device: torch.device) -> tuple[int, int]:
    apply_slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_command(args: argparse.Namespace) -> int:
    from model.albef import ALBEF
    from model.retrieval_metrics import format_table
    from model.retrieval_weights import load_retrieval_weights, retrieval_model_config
    from pipeline.tokenize import load_tokenizer

    cfg = load_retrieval_config(args.config, args.overrides)
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device(args.device or "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    rank, world = _init_distributed(device)
    dataset = eval_dataset(cfg, args.split)
    tokenizer = load_tokenizer(cfg["model"]["text"]["tokenizer"])
    model = ALBEF(retrieval_model_config(cfg, tokenizer))
    report, source = load_retrieval_weights(model, args.checkpoint)
    model.to(device).eval()
    result, timings, scores = run_evaluation(model, dataset, tokenizer, cfg, device)
    if rank == 0:
        out = Path(args.output) if args.output else default_output(args.checkpoint, args.config, args.split)
        record = result_record(result, dataset, timings, checkpoint=source, config=args.config,
                               split=args.split, k_test=cfg["eval"]["k_test"], world_size=world,
                               load_report=str(report))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record) + "\n")
        if args.save_scores:
            np.savez_compressed(out.with_suffix(".npz"), i2t=scores[0], t2i=scores[1])
        print(str(report))
        if dataset.problems:
            print(f"annotation problems: {dataset.problem_counts()} (each listed in the JSON)")
        print(format_table(result.metrics, f"{Path(args.config).stem}/{args.split}"))
        print(f"written: {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "evaluate":
            return evaluate_command(args)
        from model.retrieval_finetune import finetune
        return finetune(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"[retrieval] rank {os.environ.get('RANK', '0')}: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
