"""Weakly supervised grounding: Grad-CAM heatmaps of an ALBEF model and detector-box ranking.

The paper (and `docs/METHOD.md §12`) localises a referring expression without
ever training on boxes: the gradient of the image-text score with respect to
an attention map says which image patches made the pair match.

- ITM mode (default): the cross-attention of one fusion layer (fusion layer 2 =
  BERT layer 8, the reference's `--block_num 8`), all heads. Score = the ITM
  head's raw "match" logit (class 1), summed over the batch; each sample's
  logit depends only on its own inputs in eval mode, so the sum gives every
  sample its own gradient. cam = A * max(dA, 0) over the image patches (CLS
  dropped), zeroed at padded text positions, averaged over heads, then over
  all text positions (padded ones included, as the reference: a positive
  factor per expression that changes no ranking).
- ITC mode: the self-attention of one ViT block; score = the ITC similarity
  s(I_b, T_b) = v_b . t_b / temp; cam = the CLS query's row, A * max(dA, 0),
  averaged over heads.

Box ranking, as the reference's `grounding_eval`: the patch-grid map is
upsampled bicubically to the image's pixel frame; proposal [x, y, w, h] scores
map[int(y):int(y+h), int(x):int(x+w)].sum() / sqrt(w*h); the highest score
strictly above 0 wins (first one on ties). When no proposal scores above 0
(or there is none) the expression has NO prediction: a miss, counted apart as
`no_positive` (the reference keeps an undefined or stale box there). A hit is
IoU >= 0.5 with the ground-truth box under the reference's IoU convention
(`box_iou`).

Everything here is plain tensors and lists; the task recipe
(`model/tasks/grounding.py`) feeds it batches and gathers the outcomes.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F

IOU_HIT = 0.5            # a prediction counts when IoU(pred, truth) >= this
AREA_EXPONENT = 0.5      # proposal score = map sum / area ** AREA_EXPONENT (the reference's alpha)
GRADCAM_MODES = ("itm", "itc")


def _grid(n_patches: int) -> int:
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"{n_patches} image patches do not form a square grid")
    return side


def gradcam_itm(attention: torch.Tensor, gradient: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Cross-attention Grad-CAM: A [B,heads,L,1+N], dA [B,heads,L,1+N], text mask [B,L] -> [B,g,g] (g*g = N)."""
    b, heads, length, keys = attention.shape
    g = _grid(keys - 1)
    mask = text_mask.to(attention.dtype).view(b, 1, length, 1)
    cam = attention[..., 1:] * gradient[..., 1:].clamp(min=0) * mask   # [B,heads,L,N]
    return cam.mean(dim=1).mean(dim=1).view(b, g, g)


def gradcam_itc(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """ViT self-attention Grad-CAM on the CLS query: A, dA [B,heads,1+N,1+N] -> [B,g,g]."""
    b = attention.shape[0]
    g = _grid(attention.shape[-1] - 1)
    cam = attention[:, :, 0, 1:] * gradient[:, :, 0, 1:].clamp(min=0)   # [B,heads,N]
    return cam.mean(dim=1).view(b, g, g)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Dropout off while the maps are computed (the reference evaluates in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def itm_heatmaps(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 layer: int) -> torch.Tensor:
    """ITM Grad-CAM on fusion layer `layer`'s cross-attention: images [B,3,H,W], text [B,L] -> [B,g,g] float.

    The image and text-mode encoders run without a graph (their weights do not
    enter the gradient); `autograd.grad` takes d(logit)/dA directly, so no
    parameter's `.grad` is touched (the reference runs a full backward and
    zeroes the model's gradients instead).
    """
    fusion = model.text_encoder.fusion_layers
    if not 0 <= layer < len(fusion):
        raise ValueError(f"eval.gradcam_layer={layer}: ITM mode needs a fusion layer index in "
                         f"0..{len(fusion) - 1}")
    attn = fusion[layer].cross_attn
    with _eval_mode(model):
        with torch.no_grad():
            image_tokens = model.visual_encoder(image)
            text_tokens = model.text_encoder.encode(input_ids, attention_mask)
        attn.keep_attention = True
        try:
            with torch.enable_grad():
                # a leaf that requires grad, so the graph exists even for a frozen model
                text_tokens = text_tokens.detach().requires_grad_(True)
                logits = model.itm_logits(image_tokens, text_tokens, attention_mask)   # [B,2]
                probs = attn.attention_probs                                          # [B,heads,L,1+N]
                grads, = torch.autograd.grad(logits[:, 1].sum(), probs)
        finally:
            attn.keep_attention = False
            attn.attention_probs = None
    return gradcam_itm(probs.detach().float(), grads.float(), attention_mask)


@contextmanager
def vit_attention_kept(block):
    """Make a timm ViT block compute its softmax explicitly and keep the probabilities.

    timm's `Attention` uses SDPA unless `fused_attn` is off; its explicit path
    sends the probabilities [B,heads,1+N,1+N] through `attn_drop`, whose input
    a forward hook records in `kept["probs"]` (pre-dropout, as the reference).
    """
    attn = block.attn
    kept: dict = {}
    fused = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda module, inputs, output: kept.update(probs=inputs[0]))
    try:
        yield kept
    finally:
        handle.remove()
        attn.fused_attn = fused


def itc_heatmaps(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 block: int) -> torch.Tensor:
    """ITC Grad-CAM on ViT block `block`'s self-attention: -> [B,g,g] float."""
    blocks = model.visual_encoder.blocks
    if not 0 <= block < len(blocks):
        raise ValueError(f"eval.gradcam_layer={block}: ITC mode needs a ViT block index in 0..{len(blocks) - 1}")
    with _eval_mode(model):
        with torch.no_grad():
            _, text_feat = model.encode_text(input_ids, attention_mask)
        with vit_attention_kept(blocks[block]) as kept, torch.enable_grad():
            _, image_feat = model.encode_image(image.detach().requires_grad_(True))
            similarity = (image_feat * text_feat).sum(dim=-1) / model.temp     # [B] = diag(sim)
            grads, = torch.autograd.grad(similarity.sum(), kept["probs"])
    return gradcam_itc(kept["probs"].detach().float(), grads.float())


def heatmaps(model, image, input_ids, attention_mask, mode: str, layer: int) -> torch.Tensor:
    """Grad-CAM maps [B,g,g] of one batch in `mode` ("itm" or "itc")."""
    if mode == "itm":
        return itm_heatmaps(model, image, input_ids, attention_mask, layer)
    if mode == "itc":
        return itc_heatmaps(model, image, input_ids, attention_mask, layer)
    raise ValueError(f"eval.gradcam_mode={mode!r} is unknown; known: {', '.join(GRADCAM_MODES)}")


# ------------------------------------------------------------------ box ranking


def upsample(heatmap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[g,g] -> [height,width], bicubic (align_corners False), the reference's resize to the image frame."""
    return F.interpolate(heatmap[None, None].float(), size=(height, width), mode="bicubic",
                         align_corners=False)[0, 0]


def box_scores(full_map: torch.Tensor, proposals: Sequence[Sequence[float]]) -> list[float]:
    """Score of each proposal [x, y, w, h, ...] on a full-frame map [H,W]: sum inside / area ** 0.5.

    Slices as the reference (`int(y):int(y+h)`); a start left of or above the
    frame is clamped to 0 (a Python slice would wrap around). A zero-area box
    scores NaN, which never wins.
    """
    scores = []
    for x, y, w, h, *_ in proposals:
        inside = full_map[max(int(y), 0):int(y + h), max(int(x), 0):int(x + w)]
        area = w * h
        scores.append(float(inside.sum()) / area ** AREA_EXPONENT if area > 0 else math.nan)
    return scores


def pick_box(scores: Sequence[float]) -> int | None:
    """Index of the best proposal: the first strict maximum above 0; None when no score is above 0."""
    best, best_score = None, 0.0
    for i, score in enumerate(scores):
        if score > best_score:      # NaN compares False: never chosen
            best, best_score = i, score
    return best


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of [x, y, w, h] boxes, the reference's convention (`computeIoU`).

    Corners are inclusive (x2 = x + w - 1) and the intersection counts only when
    x1 < x2 and y1 < y2 strictly (+1 on each side), while the union uses the
    plain areas w * h: a mixed convention, kept so that accuracies compare.
    """
    x1, y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def ground(heatmap: torch.Tensor, height: int, width: int, proposals: Sequence[Sequence[float]],
           truth: Sequence[float]) -> dict:
    """One expression: rank its proposals on the upsampled map -> {pred_box, iou, hit, no_positive}."""
    best = pick_box(box_scores(upsample(heatmap, height, width), proposals))
    if best is None:
        return {"pred_box": None, "iou": None, "hit": False, "no_positive": True}
    pred = [float(v) for v in proposals[best][:4]]
    iou = box_iou(truth, pred)
    return {"pred_box": pred, "iou": iou, "hit": iou >= IOU_HIT, "no_positive": False}


def accuracy(outcomes: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{split: {acc (% of expressions hit), n, hits, no_positive, unscored}}.

    `outcomes`: {"split", "hit", "no_positive", "unscored"} per expression; every
    one counts in `n`, so unusable entries (`unscored`) and expressions with no
    proposal above zero (`no_positive`) are misses.
    """
    table: dict[str, dict[str, float]] = {}
    for o in outcomes:
        row = table.setdefault(o["split"], {"acc": 0.0, "n": 0, "hits": 0, "no_positive": 0, "unscored": 0})
        row["n"] += 1
        row["hits"] += int(o["hit"])
        row["no_positive"] += int(o["no_positive"])
        row["unscored"] += int(o["unscored"])
    for row in table.values():
        row["acc"] = 100.0 * row["hits"] / row["n"]
    return table
