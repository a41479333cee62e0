"""Grounding maths: the explicit attention path, Grad-CAM, box ranking, IoU and accuracy.

Hand-made tensors and boxes against the formulas and the reference's
conventions (`docs/METHOD.md §12`); the two Grad-CAM modes on a tiny ALBEF
against the reference's way of getting the gradient (a full backward with
the probabilities' `.grad` retained).
"""
import math

import pytest
import torch

from model.albef import ALBEF
from model.grounding import (accuracy, box_iou, box_scores, ground, gradcam_itc, gradcam_itm, itc_heatmaps,
                             itm_heatmaps, pick_box, upsample, vit_attention_kept)


@pytest.fixture
def albef(tiny_model_cfg, torch_single_thread):
    torch.manual_seed(0)
    tiny_model_cfg["retrieval"] = True
    return ALBEF(tiny_model_cfg).eval()


# ------------------------------------------------------------------ attention paths


def test_explicit_cross_attention_equals_sdpa(albef, tiny_batch):
    """`keep_attention` (softmax written out) gives SDPA's output and probabilities that sum to 1."""
    image_tokens, _ = albef.encode_image(tiny_batch["image"])
    text_tokens, _ = albef.encode_text(tiny_batch["input_ids"], tiny_batch["attention_mask"])
    mask = tiny_batch["attention_mask"]
    with torch.no_grad():
        sdpa = albef.itm_logits(image_tokens, text_tokens, mask)
        layer = albef.text_encoder.fusion_layers[1].cross_attn
        layer.keep_attention = True
        explicit = albef.itm_logits(image_tokens, text_tokens, mask)
        layer.keep_attention = False
    torch.testing.assert_close(explicit, sdpa, rtol=0, atol=1e-5)
    probs = layer.attention_probs                                     # [B,heads,L,1+N]
    assert probs.shape == (8, 2, mask.shape[1], image_tokens.shape[1])
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_explicit_vit_attention_equals_sdpa(albef, tiny_batch):
    attn = albef.visual_encoder.blocks[1].attn
    fused = attn.fused_attn
    with torch.no_grad():
        sdpa = albef.visual_encoder(tiny_batch["image"])
        with vit_attention_kept(albef.visual_encoder.blocks[1]) as kept:
            explicit = albef.visual_encoder(tiny_batch["image"])
    torch.testing.assert_close(explicit, sdpa, rtol=0, atol=1e-5)
    assert kept["probs"].shape == (8, 2, 17, 17)                     # [B,heads,1+N,1+N]
    assert attn.fused_attn == fused and not attn.attn_drop._forward_hooks


# ------------------------------------------------------------------ Grad-CAM formulas


def test_gradcam_itm_of_a_hand_built_case():
    """cam[b] = mean over heads and all L positions of A * max(dA, 0) * text_mask, patches only."""
    g = torch.Generator().manual_seed(0)
    b, heads, length, grid = 2, 3, 4, 2
    attention = torch.rand(b, heads, length, 1 + grid * grid, generator=g)
    gradient = torch.randn(b, heads, length, 1 + grid * grid, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    cam = gradcam_itm(attention, gradient, mask)
    assert cam.shape == (b, grid, grid)
    for i in range(b):
        for p in range(grid * grid):
            total = sum(attention[i, h, t, 1 + p] * max(gradient[i, h, t, 1 + p].item(), 0.0) * mask[i, t]
                        for h in range(heads) for t in range(length))
            assert cam[i, p // grid, p % grid].item() == pytest.approx(total.item() / (heads * length), rel=1e-6)


def test_gradcam_itc_of_a_hand_built_case():
    """cam[b] = mean over heads of the CLS query's row A[:, :, 0, 1:] * max(dA, 0)."""
    attention = torch.zeros(1, 2, 5, 5)
    gradient = torch.zeros(1, 2, 5, 5)
    attention[0, 0, 0, 1:] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    attention[0, 1, 0, 1:] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    gradient[0, 0, 0, 1:] = torch.tensor([1.0, -1.0, 2.0, 0.0])
    gradient[0, 1, 0, 1:] = torch.tensor([-3.0, 1.0, 1.0, 5.0])
    attention[0, :, 1:, :] = 9.0                                        # rows of other queries: ignored
    gradient[0, :, 1:, :] = 9.0
    expected = torch.tensor([[(0.1 * 1 + 0) / 2, (0 + 0.3 * 1) / 2], [(0.3 * 2 + 0.2 * 1) / 2, (0 + 0.1 * 5) / 2]])
    torch.testing.assert_close(gradcam_itc(attention, gradient)[0], expected)


def test_itm_heatmaps_match_the_reference_backward(albef, tiny_batch):
    """The map from `autograd.grad` equals the formula on the probabilities' `.grad` after a full backward
    (the reference's way), and no parameter gradient is left behind."""
    args = (tiny_batch["image"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    cam = itm_heatmaps(albef, *args, layer=1)
    assert cam.shape == (8, 4, 4) and (cam >= 0).all() and cam.sum() > 0
    assert all(p.grad is None for p in albef.parameters())
    assert not albef.text_encoder.fusion_layers[1].cross_attn.keep_attention

    layer = albef.text_encoder.fusion_layers[1].cross_attn
    layer.keep_attention = True
    image_tokens = albef.visual_encoder(args[0])
    text_tokens = albef.text_encoder.encode(args[1], args[2])
    albef.itm_logits(image_tokens, text_tokens, args[2])[:, 1].sum().backward()
    layer.keep_attention = False
    reference = gradcam_itm(layer.attention_probs.detach(), layer.attention_probs.grad, args[2])
    torch.testing.assert_close(cam, reference, rtol=1e-5, atol=1e-8)


def test_itc_heatmaps_match_the_reference_backward(albef, tiny_batch):
    args = (tiny_batch["image"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    cam = itc_heatmaps(albef, *args, block=1)
    assert cam.shape == (8, 4, 4) and (cam >= 0).all()
    with vit_attention_kept(albef.visual_encoder.blocks[1]) as kept:
        _, image_feat = albef.encode_image(args[0])
        kept["probs"].retain_grad()
        _, text_feat = albef.encode_text(args[1], args[2])
        (image_feat @ text_feat.t() / albef.temp).diag().sum().backward()
    torch.testing.assert_close(cam, gradcam_itc(kept["probs"].detach(), kept["probs"].grad), rtol=1e-5, atol=1e-8)


def test_heatmaps_refuse_a_layer_that_does_not_exist(albef, tiny_batch):
    args = (tiny_batch["image"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    with pytest.raises(ValueError, match="gradcam_layer=2: ITM mode needs a fusion layer index in 0..1"):
        itm_heatmaps(albef, *args, layer=2)
    with pytest.raises(ValueError, match="ITC mode needs a ViT block index in 0..1"):
        itc_heatmaps(albef, *args, block=5)


# ------------------------------------------------------------------ box ranking, IoU, accuracy


def test_upsample_is_bicubic_to_the_frame():
    assert torch.allclose(upsample(torch.full((4, 4), 2.0), 30, 20), torch.full((30, 20), 2.0), atol=1e-6)
    heat = torch.zeros(2, 2)
    heat[0, 0] = 1.0
    full = upsample(heat, 8, 8)
    assert full.shape == (8, 8) and full[:4, :4].sum() > full[4:, 4:].sum()


def test_box_scores_follow_the_reference_slicing():
    """score = map[int(y):int(y+h), int(x):int(x+w)].sum() / sqrt(w*h)."""
    full = torch.arange(100, dtype=torch.float32).view(10, 10)
    boxes = [[2, 3, 4, 2], [1.7, 0.2, 2.6, 1.9, 0.99], [0, 0, 10, 10]]
    expected = [full[3:5, 2:6].sum() / math.sqrt(8),
                full[0:2, 1:4].sum() / math.sqrt(2.6 * 1.9),            # int(0.2+1.9)=2, int(1.7+2.6)=4
                full.sum() / 10]
    assert box_scores(full, boxes) == pytest.approx([float(e) for e in expected])


def test_box_scores_clamp_negative_starts_and_give_nan_for_empty_boxes():
    full = torch.ones(10, 10)
    # a start above/left of the frame is clamped, not wrapped around as a Python slice would
    assert box_scores(full, [[-3, -2, 5, 4]]) == pytest.approx([2 * 2 / math.sqrt(20)])   # rows 0:2, cols 0:2
    assert math.isnan(box_scores(full, [[1, 1, 0, 5]])[0])


def test_pick_box_takes_the_first_strict_maximum_above_zero():
    assert pick_box([0.2, 0.5, 0.5, 0.1]) == 1
    assert pick_box([math.nan, 0.3]) == 1
    assert pick_box([0.0, -1.0, 0.0]) is None      # nothing above zero: no prediction
    assert pick_box([]) is None
    assert pick_box([math.nan]) is None


def test_ranking_equals_the_reference_loop_on_random_maps():
    """Our ranking against the reference's loop written out (upsample, slice, strict running maximum)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        cam = torch.rand(6, 6, generator=g) - 0.2
        height, width = torch.randint(20, 60, (2,), generator=g).tolist()
        boxes = [[float(v) for v in (torch.rand(4, generator=g) * torch.tensor([width, height, 25, 25]))]
                 for _ in range(5)]
        full = torch.nn.functional.interpolate(cam.view(1, 1, 6, 6), size=(height, width), mode="bicubic").squeeze()
        best, best_score = None, 0
        for i, (x, y, w, h) in enumerate(boxes):
            score = full[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** 0.5
            if score > best_score:
                best, best_score = i, score
        assert pick_box(box_scores(upsample(cam, height, width), boxes)) == best


def test_box_iou_uses_the_reference_convention():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    # intersection x 5..9, y 5..9 inclusive = 25 px; union = 100 + 100 - 25
    assert box_iou([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    # boxes sharing one pixel column: x1 == x2 is not counted (strict <)
    assert box_iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
    # a 2-column overlap counts 2 columns (+1), areas stay w*h
    assert box_iou([0, 0, 10, 10], [8, 0, 10, 10]) == pytest.approx(20 / 180)
    assert box_iou([0, 0, 4, 4], [20, 20, 4, 4]) == 0.0


def test_ground_defines_the_all_non_positive_case():
    """A map that is zero everywhere gives no prediction: a miss flagged `no_positive`, no stale box."""
    truth = [0, 0, 8, 8]
    out = ground(torch.zeros(4, 4), 16, 16, [[0, 0, 8, 8], [8, 8, 8, 8]], truth)
    assert out == {"pred_box": None, "iou": None, "hit": False, "no_positive": True}
    assert ground(torch.ones(4, 4), 16, 16, [], truth)["no_positive"]
    heat = torch.zeros(4, 4)
    heat[3, 3] = 1.0                                        # heat in the bottom right corner
    out = ground(heat, 16, 16, [[0, 0, 8, 8], [8, 8, 8, 8]], [8, 8, 8, 8])
    assert out["pred_box"] == [8.0, 8.0, 8.0, 8.0] and out["hit"] and out["iou"] == 1.0


def test_accuracy_counts_every_expression_per_split():
    outcomes = ([{"split": "val", "hit": True, "no_positive": False, "unscored": False}] * 3
                + [{"split": "val", "hit": False, "no_positive": True, "unscored": False}]
                + [{"split": "testA", "hit": False, "no_positive": False, "unscored": True},
                   {"split": "testA", "hit": True, "no_positive": False, "unscored": False}])
    assert accuracy(outcomes) == {"testA": {"acc": 50.0, "n": 2, "hits": 1, "no_positive": 0, "unscored": 1},
                                  "val": {"acc": 75.0, "n": 4, "hits": 3, "no_positive": 1, "unscored": 0}}
