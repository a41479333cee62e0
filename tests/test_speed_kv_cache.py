"""Image keys/values computed once per distinct image (`fuse(..., image_index=...)`) change no number.

The fusion layers' cross-attention used to project every pair's image tokens to
keys and values: 3B projections per layer in ALBEF's ITM pass (positives,
negative images, negative texts) and k per image query in retrieval re-ranking.
With `image_index` they are projected once per distinct image and gathered.
These tests compare that path with the old one (images repeated per pair) in fp32:
fusion outputs and gradients, the whole training forward of the tiny model (loss
dict and the gradient of every parameter), the explicit-softmax path grounding
uses, and the retrieval re-ranking scores.
"""
import copy
import types
from pathlib import Path

import numpy as np
import torch

from model.albef import ALBEF
from model.engine.config import load_config
from model.losses import itm_loss, total_loss
from model.tasks import retrieval_eval
from model.tasks.retrieval_eval import Features, itc_similarity, rerank

REPO = Path(__file__).resolve().parents[1]


def _tiny(retrieval: bool = False) -> ALBEF:
    cfg = load_config(REPO / "configs" / "tiny.yaml")["model"]
    cfg["retrieval"] = retrieval
    torch.manual_seed(0)
    return ALBEF(cfg)


def _inputs(model: ALBEF, bs: int = 6, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = model.settings
    image = torch.randn(bs, 3, s.vision.image_res, s.vision.image_res, generator=g)
    ids = torch.randint(s.text.mask_token_id + 1, s.text.vocab_size, (bs, length), generator=g)
    ids[:, 0] = s.text.cls_token_id
    mask = torch.ones_like(ids)
    for row, keep in enumerate(torch.randint(3, length + 1, (bs,), generator=g).tolist()):
        ids[row, keep:] = s.text.pad_token_id
        mask[row, keep:] = 0
    return image, ids, mask


def _old_itm(self, image_tokens, text_tokens, attention_mask, neg_image, neg_text):
    """ALBEF.itm before the cache: the images concatenated once per pair."""
    texts = torch.cat([text_tokens, text_tokens, text_tokens[neg_text]])
    masks = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
    images = torch.cat([image_tokens, image_tokens[neg_image], image_tokens])
    return itm_loss(self.itm_logits(images, texts, masks), text_tokens.shape[0])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|; gradients that are analytically zero (the keys' bias: softmax ignores a shift
    common to all keys) are rounding noise around 1e-11: a gradient of norm below 1e-4 is compared against 1e-4."""
    return float((a - b).norm() / b.norm().clamp_min(1e-4))


def test_fuse_with_image_index_equals_repeated_images_forward_and_backward():
    model = _tiny()
    model.eval()   # dropout off: the two paths draw the same dropout masks anyway, this isolates the arithmetic
    image, ids, mask = _inputs(model)
    with torch.no_grad():
        img_tok, _ = model.encode_image(image)
        txt_tok, _ = model.encode_text(ids, mask)
    index = torch.tensor([0, 0, 3, 5, 1, 0, 2, 2, 4, 5, 5, 3])      # 12 pairs over 6 images, repeats
    texts, masks = txt_tok[index % 6].clone(), mask[index % 6]

    results = []
    for cached in (False, True):
        model.zero_grad(set_to_none=True)
        images = img_tok.clone().requires_grad_(True)
        text_in = texts.clone().requires_grad_(True)
        if cached:
            out = model.text_encoder.fuse(text_in, masks, images, image_index=index)
        else:
            out = model.text_encoder.fuse(text_in, masks, images[index])
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.text_encoder.named_parameters() if p.grad is not None}
        results.append((out.detach(), images.grad, text_in.grad, grads))
    (o0, gi0, gt0, gp0), (o1, gi1, gt1, gp1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gi1, gi0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt1, gt0, rtol=1e-5, atol=1e-6)
    assert gp0.keys() == gp1.keys() and any(".cross_attn.key." in n for n in gp0)
    for name in gp0:
        assert _relative(gp1[name], gp0[name]) < 1e-5, name


def test_keep_attention_path_with_image_index():
    """The explicit-softmax path (Grad-CAM) gives the same logits and probabilities with the index."""
    model = _tiny().eval()
    image, ids, mask = _inputs(model)
    index = torch.tensor([2, 2, 2, 0, 5])
    with torch.no_grad():
        img_tok, _ = model.encode_image(image)
        txt_tok, _ = model.encode_text(ids, mask)
        layer = model.text_encoder.fusion_layers[1].cross_attn
        layer.keep_attention = True
        try:
            ref = model.itm_logits(img_tok[index], txt_tok[:5], mask[:5])
            ref_probs = layer.attention_probs.clone()
            got = model.itm_logits(img_tok, txt_tok[:5], mask[:5], image_index=index)
            got_probs = layer.attention_probs.clone()
        finally:
            layer.keep_attention = False
        sdpa = model.itm_logits(img_tok, txt_tok[:5], mask[:5], image_index=index)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_probs, ref_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sdpa, ref, rtol=1e-5, atol=1e-5)


def _training_forward(model: ALBEF, inputs, retrieval: bool):
    image, ids, mask = inputs
    torch.manual_seed(123)                          # dropout draws
    gen = torch.Generator().manual_seed(7)          # negatives and MLM masking
    idx = torch.tensor([0, 1, 1, 2, 3, 3]) if retrieval else None
    out = model(image, ids, mask, alpha=0.4, idx=idx, generator=gen)
    total_loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _check_training_equivalence(retrieval: bool) -> None:
    cached = _tiny(retrieval).train()
    reference = copy.deepcopy(cached)
    reference.itm = types.MethodType(_old_itm, reference)
    inputs = _inputs(cached)
    out_new, grads_new = _training_forward(cached, inputs, retrieval)
    out_old, grads_old = _training_forward(reference, inputs, retrieval)
    assert out_new.keys() == out_old.keys()
    for key in out_old:
        torch.testing.assert_close(out_new[key], out_old[key], rtol=1e-5, atol=1e-7, msg=key)
    assert grads_new.keys() == grads_old.keys()
    assert len(grads_old) == len(cached.trainable_parameters())
    for name in grads_old:
        assert _relative(grads_new[name], grads_old[name]) < 1e-5, name


def test_training_forward_same_losses_and_gradients_as_uncached():
    """Tiny pretraining model in train mode (dropout on): loss dict and every parameter's gradient."""
    _check_training_equivalence(retrieval=False)


def test_retrieval_mode_forward_same_losses_and_gradients_as_uncached():
    _check_training_equivalence(retrieval=True)


def _old_rerank(model, f: Features, sims: torch.Tensor, k: int):
    """The re-ranking before the cache (one process): the image expanded k times in i2t."""
    def one(sim, query_ok, cand_ok, i2t):
        n_q, n_c = sim.shape
        kk = min(k, int(cand_ok.sum()))
        scores = torch.full((n_q, n_c), retrieval_eval.NOT_RERANKED)
        for q in range(n_q):
            if not bool(query_ok[q]):
                continue
            top = sim[q].topk(kk).indices
            if i2t:
                logits = model.itm_logits(f.image_tokens[q].expand(kk, -1, -1), f.text_tokens[top], f.text_mask[top])
            else:
                logits = model.itm_logits(f.image_tokens[top], f.text_tokens[q].expand(kk, -1, -1),
                                          f.text_mask[q].expand(kk, -1))
            scores[q, top] = logits[:, 1].float()
        return scores.numpy()
    return one(sims, f.image_ok, f.text_ok, True), one(sims.t(), f.text_ok, f.image_ok, False)


def test_rerank_scores_equal_uncached():
    model = _tiny(retrieval=True).eval()
    g = torch.Generator().manual_seed(3)
    n_img, n_txt = 5, 12
    image = torch.randn(n_img, 3, 32, 32, generator=g)
    ids = torch.randint(5, 388, (n_txt, 8), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    with torch.no_grad():
        img_tok, img_feat = model.encode_image(image)
        txt_tok, txt_feat = model.encode_text(ids, mask)
        image_ok = torch.tensor([True, True, False, True, True])
        text_ok = torch.ones(n_txt, dtype=torch.bool)
        text_ok[4] = False
        f = Features(img_tok, img_feat, txt_tok, mask, txt_feat, image_ok, text_ok)
        sims = itc_similarity(f)
        new = rerank(model, f, sims, k=4)
        old = _old_rerank(model, f, sims, k=4)
    for got, ref in zip(new, old):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        assert (got != retrieval_eval.NOT_RERANKED).sum() > 0
