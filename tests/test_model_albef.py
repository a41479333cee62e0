"""The pretraining module: its forward against a recomputation from the spec, gradients, EMA,
queue, inference API, retrieval mode, bad configs, and overfitting a fixed batch."""
import copy
import dataclasses

import pytest
import torch

from model.albef import ALBEF
from model.weights import build_albef
from model.losses import IGNORE_INDEX, mask_tokens, sample_negatives, total_loss

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _unit(x):
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


def _log_softmax(x):
    return x - x.exp().sum(-1, keepdim=True).log()


def _softmax(x):
    return x.exp() / x.exp().sum(-1, keepdim=True)


def _inputs(batch):
    return batch["image"], batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def _manual_ema(model):
    m = model.settings.momentum
    seen = set()
    for online, momentum in model.momentum_modules():
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                p_m.copy_(m * p_m + (1 - m) * p)


def test_training_forward_equals_spec_recomputation(tiny_albef, tiny_batch):
    model = tiny_albef
    ref = copy.deepcopy(model)
    image, ids, mask = _inputs(tiny_batch)
    bs, alpha, s = image.shape[0], 0.4, model.settings
    with torch.no_grad():
        model.temp.fill_(0.9)  # above temp_max: the forward must clamp it first
        ref.temp.fill_(0.9)
    out = model(image, ids, mask, alpha=alpha, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        temp = min(max(0.9, s.temp_min), s.temp_max)
        _manual_ema(ref)
        img_tok = ref.visual_encoder(image)
        txt_tok = ref.text_encoder.encode(ids, mask)
        f_i, f_t = _unit(ref.vision_proj(img_tok[:, 0])), _unit(ref.text_proj(txt_tok[:, 0]))
        img_tok_m = ref.visual_encoder_m(image)
        f_i_m = _unit(ref.vision_proj_m(img_tok_m[:, 0]))
        f_t_m = _unit(ref.text_proj_m(ref.text_encoder_m.encode(ids, mask)[:, 0]))
        # ITC (docs/METHOD.md §2.1)
        i_all = torch.cat([f_i_m.t(), ref.queue.image_queue], 1)
        t_all = torch.cat([f_t_m.t(), ref.queue.text_queue], 1)
        y = torch.zeros(bs, i_all.shape[1])
        y[:, :bs] = torch.eye(bs)
        s_i2t, s_t2i = f_i @ t_all / temp, f_t @ i_all / temp
        tgt_i2t = alpha * _softmax(f_i_m @ t_all / temp) + (1 - alpha) * y
        tgt_t2i = alpha * _softmax(f_t_m @ i_all / temp) + (1 - alpha) * y
        itc = (-(_log_softmax(s_i2t) * tgt_i2t).sum(1).mean() - (_log_softmax(s_t2i) * tgt_t2i).sum(1).mean()) / 2
        # ITM: the same draws (image negatives, text negatives, then masking) from the same seed
        g = torch.Generator().manual_seed(3)
        eye = torch.eye(bs, dtype=torch.bool)
        neg_image = sample_negatives(s_t2i[:, :bs], eye, g)
        neg_text = sample_negatives(s_i2t[:, :bs], eye, g)
        assert not (neg_image == torch.arange(bs)).any() and not (neg_text == torch.arange(bs)).any()
        rows = []
        for i in range(bs):
            rows.append(ref.itm_logits(img_tok[i:i + 1], txt_tok[i:i + 1], mask[i:i + 1]))
        for i in range(bs):
            j = neg_image[i]
            rows.append(ref.itm_logits(img_tok[j:j + 1], txt_tok[i:i + 1], mask[i:i + 1]))
        for i in range(bs):
            j = neg_text[i]
            rows.append(ref.itm_logits(img_tok[i:i + 1], txt_tok[j:j + 1], mask[j:j + 1]))
        logp = _log_softmax(torch.cat(rows))
        labels = [1] * bs + [0] * (2 * bs)
        itm = -sum(logp[k, labels[k]] for k in range(3 * bs)) / (3 * bs)
        # MLM (docs/METHOD.md §2.3) on the full vocabulary at every position, then selected
        t = s.text
        masked, mlm_labels = mask_tokens(ids, vocab_size=t.vocab_size, pad_token_id=t.pad_token_id,
                                         cls_token_id=t.cls_token_id, mask_token_id=t.mask_token_id,
                                         probability=s.mlm.probability, mask_fraction=s.mlm.mask_fraction,
                                         random_fraction=s.mlm.random_fraction, generator=g)
        sel = mlm_labels != IGNORE_INDEX
        assert sel.any()
        student = ref.text_encoder.mlm_head(ref.text_encoder.fuse(ref.text_encoder.encode(masked, mask), mask, img_tok))
        teacher = ref.text_encoder_m.mlm_head(
            ref.text_encoder_m.fuse(ref.text_encoder_m.encode(masked, mask), mask, img_tok_m))
        logp_mlm = _log_softmax(student[sel])
        ce = -logp_mlm[torch.arange(int(sel.sum())), mlm_labels[sel]].mean()
        distill = -(logp_mlm * _softmax(teacher[sel])).sum(-1).mean()
        mlm = (1 - alpha) * ce + alpha * distill

    assert model.temp.item() == pytest.approx(s.temp_max)
    assert out["loss_itc"].item() == pytest.approx(itc.item(), rel=1e-4)
    assert out["loss_itm"].item() == pytest.approx(itm.item(), rel=1e-4)
    assert out["loss_mlm"].item() == pytest.approx(mlm.item(), rel=1e-4)
    assert total_loss(out).item() == pytest.approx((itc + itm + mlm).item(), rel=1e-4)
    assert total_loss(out, {"loss_itm": 0.0, "loss_mlm": 2.0}).item() == pytest.approx((itc + 2 * mlm).item(),
                                                                                       rel=1e-4)
    for key in ("acc_itc", "acc_itm", "acc_mlm"):
        assert 0.0 <= out[key].item() <= 1.0
    # then the momentum features were enqueued at columns 0..bs-1
    assert torch.allclose(model.queue.image_queue[:, :bs], f_i_m.t(), atol=1e-6)
    assert torch.allclose(model.queue.text_queue[:, :bs], f_t_m.t(), atol=1e-6)
    assert torch.equal(model.queue.image_queue[:, bs:], ref.queue.image_queue[:, bs:])
    assert model.queue.queue_ptr.item() == bs


def test_itm_with_injected_negatives(tiny_albef, tiny_batch):
    model = tiny_albef
    image, ids, mask = _inputs(tiny_batch)
    bs = image.shape[0]
    neg_image = torch.roll(torch.arange(bs), 1)
    neg_text = torch.roll(torch.arange(bs), -3)
    with torch.no_grad():
        img_tok, _ = model.encode_image(image)
        txt_tok, _ = model.encode_text(ids, mask)
        loss, acc = model.itm(img_tok, txt_tok, mask, neg_image, neg_text)
        pairs = ([(i, i, 1) for i in range(bs)] + [(int(neg_image[i]), i, 0) for i in range(bs)]
                 + [(i, int(neg_text[i]), 0) for i in range(bs)])
        terms, hits = [], 0
        for img, txt, label in pairs:
            logits = model.itm_logits(img_tok[img:img + 1], txt_tok[txt:txt + 1], mask[txt:txt + 1])[0]
            terms.append(-_log_softmax(logits)[label])
            hits += int(logits.argmax() == label)
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert acc.item() == pytest.approx(hits / len(pairs))


def test_mlm_with_injected_masks_and_momentum_soft_labels(tiny_albef, tiny_batch):
    model = tiny_albef
    image, ids, mask = _inputs(tiny_batch)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1] = ids[:, 1]
    labels[0, 3] = ids[0, 3]
    masked = ids.clone()
    masked[:, 1] = model.settings.text.mask_token_id
    with torch.no_grad():
        model.text_encoder_m.embeddings.word_embeddings.weight.add_(0.05)  # teacher != student
        img_tok, img_tok_m = model.visual_encoder(image), model.visual_encoder_m(image)
        loss, acc = model.mlm(masked, labels, mask, img_tok, img_tok_m, alpha=0.3)
        te, te_m = model.text_encoder, model.text_encoder_m
        student = te.mlm_head(te.fuse(te.encode(masked, mask), mask, img_tok))
        soft = _softmax(te_m.mlm_head(te_m.fuse(te_m.encode(masked, mask), mask, img_tok_m)))
        terms_ce, terms_kd = [], []
        for b, p in (labels != IGNORE_INDEX).nonzero().tolist():
            logp = _log_softmax(student[b, p])
            terms_ce.append(-logp[labels[b, p]])
            terms_kd.append(-(logp * soft[b, p]).sum())
        expected = 0.7 * torch.stack(terms_ce).mean() + 0.3 * torch.stack(terms_kd).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradients_reach_the_online_model_and_never_the_momentum_model(tiny_albef, tiny_batch):
    model = tiny_albef
    out = model(*_inputs(tiny_batch), alpha=0.4)
    total_loss(out).backward()
    trainable = model.trainable_named_parameters()
    momentum_ids = {id(p) for _, m in model.momentum_modules() for p in m.parameters()}
    assert {id(p) for _, p in trainable}.isdisjoint(momentum_ids)
    assert len({id(p) for p in model.parameters()}) == len(trainable) + len(momentum_ids)
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name
    for _, m in model.momentum_modules():
        for p in m.parameters():
            assert not p.requires_grad and p.grad is None


def test_one_ema_step_moves_each_momentum_parameter_by_one_minus_m_times_the_gap(tiny_albef):
    model = tiny_albef
    m = model.settings.momentum
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))
    pairs = []
    for online, momentum in model.momentum_modules():
        pairs += list(zip(online.parameters(), momentum.parameters()))
    before = [(p.detach().clone(), p_m.detach().clone()) for p, p_m in pairs]
    model.momentum_update()
    for (p, p_m), (p0, p_m0) in zip(pairs, before):
        assert p_m.dtype == torch.float32
        assert torch.equal(p, p0)
        assert torch.allclose(p_m - p_m0, (1 - m) * (p0 - p_m0), atol=1e-6, rtol=1e-5)
    # the tied decoder weight is the word-embedding parameter: moved once, still tied
    te_m = model.text_encoder_m
    assert te_m.mlm_head.decoder.weight is te_m.embeddings.word_embeddings.weight


def test_forward_moves_momentum_in_train_mode_only(tiny_albef, tiny_batch):
    model = tiny_albef
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    before = model.vision_proj_m.weight.detach().clone()
    queue_before = model.queue.image_queue.clone()
    model.eval()
    model(*_inputs(tiny_batch), alpha=0.4)
    assert torch.equal(model.vision_proj_m.weight, before)
    assert torch.equal(model.queue.image_queue, queue_before)
    model.train()
    model(*_inputs(tiny_batch), alpha=0.4)
    m = model.settings.momentum
    assert torch.allclose(model.vision_proj_m.weight - before, (1 - m) * (model.vision_proj.weight - before),
                          atol=1e-6)


def test_queue_pointer_wraps_across_training_steps(tiny_albef, tiny_batch):
    model = tiny_albef
    bs, q = tiny_batch["image"].shape[0], model.settings.queue_size
    for step in range(q // bs + 1):
        model(*_inputs(tiny_batch), alpha=0.4)
        assert model.queue.queue_ptr.item() == ((step + 1) * bs) % q


def test_inference_api_shapes_and_normalised_features(tiny_albef, tiny_batch):
    model = tiny_albef.eval()
    image, ids, mask = _inputs(tiny_batch)
    s = model.settings
    with torch.no_grad():
        img_tok, img_feat = model.encode_image(image)
        txt_tok, txt_feat = model.encode_text(ids, mask)
        logits = model.itm_logits(img_tok, txt_tok, mask)
    assert img_tok.shape == (8, 1 + s.vision.grid ** 2, s.vision.width)
    assert txt_tok.shape == (*ids.shape, s.text.hidden_size)
    assert img_feat.shape == txt_feat.shape == (8, s.embed_dim)
    assert torch.allclose(img_feat.norm(dim=-1), torch.ones(8)) and torch.allclose(txt_feat.norm(dim=-1), torch.ones(8))
    assert logits.shape == (8, 2)
    # padding does not change a caption's features
    longer_ids = torch.nn.functional.pad(ids, (0, 3), value=s.text.pad_token_id)
    longer_mask = torch.nn.functional.pad(mask, (0, 3), value=0)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(longer_ids, longer_mask)[1], txt_feat, atol=1e-5)


def test_itc_text_pool_mean_projects_the_masked_mean_token_state(tiny_model_cfg, tiny_batch):
    """`model.itc_text_pool: mean` (docs/METHOD.md §2.1): the ITC text feature of the online and the
    momentum model is the projection of the mean over real tokens; `cls` (default) keeps [CLS]."""
    torch.manual_seed(0)
    model = ALBEF({**tiny_model_cfg, "itc_text_pool": "mean"}).eval()
    _, ids, mask = _inputs(tiny_batch)
    with torch.no_grad():
        tokens, feat = model.encode_text(ids, mask)
        m = mask.unsqueeze(-1).float()
        expected = torch.nn.functional.normalize(model.text_proj((tokens * m).sum(1) / m.sum(1)), dim=-1)
        assert torch.allclose(feat, expected, atol=1e-6)
        cls = torch.nn.functional.normalize(model.text_proj(tokens[:, 0]), dim=-1)
        assert not torch.allclose(feat, cls, atol=1e-3)
        model.settings = dataclasses.replace(model.settings, itc_text_pool="cls")
        assert torch.allclose(model.encode_text(ids, mask)[1], cls, atol=1e-6)


def test_retrieval_mode_uses_image_ids_and_has_no_mlm(tiny_model_cfg, tiny_batch):
    tiny_model_cfg["retrieval"] = True
    torch.manual_seed(0)
    model = ALBEF(tiny_model_cfg).train()
    assert model.text_encoder.mlm_head is None
    idx = torch.tensor([5, 5, 6, 7, 7, 7, 8, 9])
    out = model(*_inputs(tiny_batch), alpha=0.4, idx=idx)
    assert "loss_mlm" not in out and "acc_mlm" not in out
    total_loss(out).backward()
    assert model.queue.idx_queue[0, :8].tolist() == idx.tolist()
    assert (model.queue.idx_queue[0, 8:] == -100).all()
    # a batch in which every caption belongs to the same image: no crash
    model(*_inputs(tiny_batch), alpha=0.4, idx=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        model(*_inputs(tiny_batch), alpha=0.4)


def test_retrieval_forward_leaves_the_temperature_unclamped(tiny_model_cfg, tiny_batch):
    """The reference clamps the temperature in pretraining only; its retrieval model never does."""
    tiny_model_cfg["retrieval"] = True
    torch.manual_seed(0)
    model = ALBEF(tiny_model_cfg).eval()  # eval: no EMA step, so momentum copies == online model
    image, ids, mask = _inputs(tiny_batch)
    bs, temp = image.shape[0], 0.9  # above temp_max
    with torch.no_grad():
        model.temp.fill_(temp)
        out = model(image, ids, mask, alpha=0.0, idx=torch.arange(bs))
        f_i, f_t = model.encode_image(image)[1], model.encode_text(ids, mask)[1]
        i_all = torch.cat([f_i.t(), model.queue.image_queue], 1)
        t_all = torch.cat([f_t.t(), model.queue.text_queue], 1)
        y = torch.zeros(bs, i_all.shape[1])
        y[:, :bs] = torch.eye(bs)  # distinct image ids, empty idx_queue: the diagonal only
        itc = (-(_log_softmax(f_i @ t_all / temp) * y).sum(1).mean()
               - (_log_softmax(f_t @ i_all / temp) * y).sum(1).mean()) / 2
    assert model.temp.item() == pytest.approx(temp)
    assert out["loss_itc"].item() == pytest.approx(itc.item(), rel=1e-4)


def test_queue_size_not_divisible_by_global_batch_is_refused(tiny_model_cfg):
    with pytest.raises(ValueError, match=r"queue_size=64.*global batch size 48"):
        ALBEF(tiny_model_cfg, global_batch_size=48)
    ALBEF(tiny_model_cfg, global_batch_size=16)


@pytest.mark.parametrize("path, value, message", [
    ("vision.encoder", "resnet50", r"model\.vision\.encoder='resnet50' is unknown"),
    ("text.encoder", "gpt2", r"model\.text\.encoder='gpt2' is unknown"),
    ("text.num_heads", 3, r"model\.text\.hidden_size=64 is not divisible by model\.text\.num_heads=3"),
    ("vision.num_heads", 5, r"model\.vision\.width=64 is not divisible by model\.vision\.num_heads=5"),
    ("vision.image_res", 36, r"model\.vision\.image_res=36 is not divisible by model\.vision\.patch_size=8"),
    ("text.widht", 64, r"unknown setting model\.text\.widht"),
    ("text.cls_token_id", 400, r"model\.text\.cls_token_id=400 is outside the vocabulary"),
    ("mlm.mask_fraction", 0.95, r"mask_fraction \+ model\.mlm\.random_fraction"),
    ("temp", 0.9, r"model\.temp=0\.9 must lie in"),
    ("queue_size", "big", r"model\.queue_size='big' must be an integer"),
    ("itc_text_pool", "max", r"model\.itc_text_pool='max' must be 'cls' or 'mean'"),
])
def test_bad_configs_fail_at_construction_naming_the_setting(tiny_model_cfg, path, value, message):
    node = tiny_model_cfg
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        ALBEF(tiny_model_cfg)


def test_missing_setting_is_named(tiny_model_cfg):
    del tiny_model_cfg["vision"]["depth"]
    with pytest.raises(ValueError, match=r"missing setting model\.vision\.depth"):
        ALBEF(tiny_model_cfg)


def test_init_weights_of_another_width_fail_naming_the_setting(tiny_model_cfg, hf_bert_dir, deit_checkpoint):
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg["text"].update(init=str(hf_bert_dir), hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match=r"model\.text\.hidden_size=32 but .* has hidden_size=64"):
        build_albef(cfg)
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg["vision"].update(init=str(deit_checkpoint), width=32)
    with pytest.raises(ValueError, match=r"model\.vision\.width=32"):
        build_albef(cfg)
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg["vision"]["init"] = "not_a_timm_model_xyz"
    with pytest.raises(ValueError, match=r"model\.vision\.init='not_a_timm_model_xyz' is neither"):
        build_albef(cfg)
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg["text"]["init"] = "./no/such/bert"
    with pytest.raises(FileNotFoundError, match=r"model\.text\.init='./no/such/bert'"):
        build_albef(cfg)


@pytest.mark.timeout(120)
def test_tiny_model_overfits_a_fixed_batch(tiny_albef, tiny_batch):
    """Without distillation (alpha 0): with it, the slowly moving teacher's soft targets put a
    floor under ITC and MLM that 100 steps do not reach (the teacher's entropy)."""
    model = tiny_albef
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        out = model(*_inputs(tiny_batch), alpha=0.0, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        total_loss(out).backward()
        opt.step()
        losses.append(total_loss(out).item())
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert end < 0.25 * start, (start, end)
