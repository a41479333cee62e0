"""Analytic FLOPs of one ALBEF pretraining sample (matmuls and attention, 2 FLOPs per multiply-add).

    python benchmarks/flops.py [--config configs/pretrain_base.yaml] [--batch-size 64] [k=v ...]

`pretraining_flops(model_cfg, text_length, batch_size)` returns the per-sample
counts by part. What a training step runs per sample, as model/albef.py does it:

- online, trained (forward x 3 = forward + backward, whose two matmuls per
  forward matmul are the gradients of the input and of the weight):
  ViT on the image (the patch embedding x 2: the pixels need no gradient),
  vision_proj on CLS, the text layers on the caption, text_proj on CLS;
  ITM: the fusion layers over 3 pairs (positive, negative image, negative
  text), the cross-attention keys/values of the one distinct image once
  (model/encoders.py `image_index`), the ITM head on 3 CLS states;
  MLM: the text layers on the masked caption, the fusion layers over 1 pair
  (its own image keys/values), the MLM head on the masked positions;
  ITC: the similarities against batch + queue, both directions (x 2: only the
  online features get a gradient);
- momentum copies, forward only (x 1): ViT + vision_proj, text layers +
  text_proj, the masked caption through text and fusion layers and the MLM head
  (distillation targets), the ITC target similarities.

The masked positions are `mlm.probability x (text_length - 1)` (every token a
real word, as benchmarks/step.py's inputs; [CLS] is never masked). Embedding
look-ups, LayerNorms, softmaxes, GELUs and the optimiser are not counted
(elementwise, < 1% here). Queue size and batch enter only through ITC.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def vit_flops(res: int, patch: int, width: int, depth: int, mlp_ratio: float) -> tuple[float, float, int]:
    """(patch embedding, transformer blocks) forward FLOPs of one image, and its token count."""
    patches = (res // patch) ** 2
    n = patches + 1
    embed = 2 * patches * (3 * patch * patch) * width
    block = 2 * n * width * width * (3 + 1 + 2 * mlp_ratio) + 4 * n * n * width
    return embed, depth * block, n


def text_layer_flops(length: int, hidden: int, intermediate: int) -> float:
    """One BERT layer: Q/K/V and output projections, scores and weighted sum, FFN."""
    return 8 * length * hidden ** 2 + 4 * length ** 2 * hidden + 4 * length * hidden * intermediate


def fusion_layer_flops(length: int, hidden: int, intermediate: int, image_tokens: int) -> float:
    """One fusion layer per pair, without the image keys/values (counted once per distinct image)."""
    return (text_layer_flops(length, hidden, intermediate)     # self-attention + FFN
            + 4 * length * hidden ** 2                          # cross-attention query and output projections
            + 4 * length * image_tokens * hidden)               # cross-attention scores and weighted sum


def pretraining_flops(model: dict, text_length: int, batch_size: int) -> dict:
    """Per-sample FLOPs of one pretraining step, by part; `total` and `forward_only_equivalent` included."""
    v, t = model["vision"], model["text"]
    embed_dim, queue = model["embed_dim"], model["queue_size"]
    mlm_positions = model["mlm"]["probability"] * (text_length - 1)
    h, inter, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    vit_embed, vit_blocks, n_img = vit_flops(v["image_res"], v["patch_size"], v["width"], v["depth"],
                                             v["mlp_ratio"])
    text = t["num_text_layers"] * text_layer_flops(text_length, h, inter)
    fusion_pair = t["num_fusion_layers"] * fusion_layer_flops(text_length, h, inter, n_img)
    image_kv = t["num_fusion_layers"] * 4 * n_img * v["width"] * h       # keys + values of one image
    mlm_head = mlm_positions * (2 * h * h + 2 * h * vocab)
    itc = 2 * 2 * embed_dim * (batch_size + queue)                       # image->text and text->image
    fwd = {
        "vit": vit_embed + vit_blocks + 2 * v["width"] * embed_dim,
        "text": text + 2 * h * embed_dim,
        "itm_fusion_3_pairs": 3 * fusion_pair + image_kv + 3 * 2 * h * 2,
        "mlm": text + fusion_pair + image_kv + mlm_head,
        "itc": itc,
    }
    trained = {  # forward + backward
        "vit": 3 * fwd["vit"] - vit_embed,     # no gradient for the pixels
        "text": 3 * fwd["text"],
        "itm_fusion_3_pairs": 3 * fwd["itm_fusion_3_pairs"],
        "mlm": 3 * fwd["mlm"],
        "itc": 2 * fwd["itc"],
    }
    momentum = {"vit": fwd["vit"], "text": fwd["text"], "mlm": fwd["mlm"], "itc": fwd["itc"]}
    total = sum(trained.values()) + sum(momentum.values())
    return {
        "text_length": text_length, "batch_size": batch_size, "image_tokens": n_img,
        "mlm_positions": mlm_positions,
        "forward_gflop": {k: round(x / 1e9, 3) for k, x in fwd.items()},
        "trained_fwd_bwd_gflop": {k: round(x / 1e9, 3) for k, x in trained.items()},
        "momentum_fwd_gflop": {k: round(x / 1e9, 3) for k, x in momentum.items()},
        # what the uncached ITM pass would add: the image keys/values of 2 more pairs, x3
        "itm_kv_saved_gflop": round(3 * 2 * image_kv / 1e9, 3),
        "total_gflop": round(total / 1e9, 3),
        "total": total,
    }


def main() -> None:
    from model.engine.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain_base.yaml"))
    parser.add_argument("--batch-size", type=int, help="per rank (default: the config's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    batch = args.batch_size or cfg["train"]["batch_size_per_rank"]
    print(json.dumps(pretraining_flops(cfg["model"], cfg["train"]["max_tokens"], batch), indent=1))


if __name__ == "__main__":
    main()
