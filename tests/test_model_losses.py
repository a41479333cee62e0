"""The loss functions against independent recomputations of the spec's formulas (section 2),
and the two random choices (hard negatives, MLM masking)."""
import pytest
import torch

from model.losses import (IGNORE_INDEX, itc_loss, itc_positives, itm_loss, mask_tokens, mlm_loss,
                          sample_negatives)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _unit(x):
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


def _log_softmax(x):
    return x - x.exp().sum(1, keepdim=True).log()


def _softmax(x):
    return x.exp() / x.exp().sum(1, keepdim=True)


def _features(bs=4, dim=8, queue=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda n: _unit(torch.randn(n, dim, generator=g))  # noqa: E731
    return f(bs), f(bs), f(bs), f(bs), f(queue).t().contiguous(), f(queue).t().contiguous()


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_itc_equals_spec_formula_with_queue_and_alpha(alpha):
    f_i, f_t, f_i_m, f_t_m, image_queue, text_queue = _features()
    bs, q = f_i.shape[0], image_queue.shape[1]
    temp = torch.tensor(0.1, requires_grad=True)
    out = itc_loss(f_i, f_t, f_i_m, f_t_m, image_queue, text_queue, temp, alpha, itc_positives(bs, q, "cpu"))

    # spec: I_all = [f_i_m ; image_queue], T_all = [f_t_m ; text_queue], one-hot y on the batch diagonal
    i_all = torch.cat([f_i_m.t(), image_queue], 1)
    t_all = torch.cat([f_t_m.t(), text_queue], 1)
    y = torch.zeros(bs, bs + q)
    for i in range(bs):
        y[i, i] = 1.0
    t = temp.detach()
    targets_i2t = alpha * _softmax(f_i_m @ t_all / t) + (1 - alpha) * y
    targets_t2i = alpha * _softmax(f_t_m @ i_all / t) + (1 - alpha) * y
    loss_i2t = -(_log_softmax(f_i @ t_all / t) * targets_i2t).sum(1).mean()
    loss_t2i = -(_log_softmax(f_t @ i_all / t) * targets_t2i).sum(1).mean()
    assert out.loss.item() == pytest.approx(((loss_i2t + loss_t2i) / 2).item(), rel=1e-5)
    assert out.sim_i2t.shape == (bs, bs + q)
    out.loss.backward()
    assert temp.grad is not None and temp.grad != 0


def test_itc_retrieval_targets_spread_over_every_pair_with_the_same_image():
    f_i, f_t, f_i_m, f_t_m, image_queue, text_queue = _features()
    bs, q = 4, image_queue.shape[1]
    idx = torch.tensor([7, 7, 3, 5])
    idx_queue = torch.full((1, q), -100)
    idx_queue[0, 2] = 3
    idx_queue[0, 5] = 7
    pos = itc_positives(bs, q, "cpu", idx, idx_queue)
    assert pos[0].nonzero().view(-1).tolist() == [0, 1, bs + 5]
    assert pos[2].nonzero().view(-1).tolist() == [2, bs + 2]
    assert pos[3].nonzero().view(-1).tolist() == [3]

    alpha, temp = 0.0, torch.tensor(0.07)
    out = itc_loss(f_i, f_t, f_i_m, f_t_m, image_queue, text_queue, temp, alpha, pos)
    y = pos.float() / pos.float().sum(1, keepdim=True)
    t_all = torch.cat([f_t_m.t(), text_queue], 1)
    i_all = torch.cat([f_i_m.t(), image_queue], 1)
    expected = (-(_log_softmax(f_i @ t_all / temp) * y).sum(1).mean()
                - (_log_softmax(f_t @ i_all / temp) * y).sum(1).mean()) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_itm_loss_is_cross_entropy_with_positives_first():
    g = torch.Generator().manual_seed(0)
    bs = 3
    logits = torch.randn(3 * bs, 2, generator=g)
    loss, acc = itm_loss(logits, bs)
    labels = [1] * bs + [0] * (2 * bs)
    expected = -sum(_log_softmax(logits)[i, labels[i]] for i in range(3 * bs)) / (3 * bs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert acc.item() == pytest.approx(sum(int(logits[i].argmax() == labels[i]) for i in range(3 * bs)) / (3 * bs))


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_loss_with_given_soft_labels(alpha):
    g = torch.Generator().manual_seed(0)
    m, v = 5, 11
    logits = torch.randn(m, v, generator=g, requires_grad=True)
    targets = torch.randint(v, (m,), generator=g)
    soft = _softmax(torch.randn(m, v, generator=g))
    loss, _ = mlm_loss(logits, targets, soft, alpha)
    logp = _log_softmax(logits.detach())
    ce = -logp[torch.arange(m), targets].mean()
    distill = -(logp * soft).sum(1).mean()
    assert loss.item() == pytest.approx(((1 - alpha) * ce + alpha * distill).item(), rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_mlm_loss_without_masked_tokens_is_a_connected_zero():
    logits = torch.zeros(0, 11, requires_grad=True)
    loss, acc = mlm_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 11), 0.4)
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()  # must not raise


MASK_KW = dict(vocab_size=100, pad_token_id=0, cls_token_id=2, mask_token_id=4,
               probability=0.15, mask_fraction=0.8, random_fraction=0.1)


def _ids(rows=256, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 100, (rows, length), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(2, length + 1, (rows,), generator=g)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids


def test_mlm_masking_never_touches_pad_or_cls_and_chooses_about_15_percent():
    ids = _ids()
    real = (ids != 0) & (ids != 2)
    g = torch.Generator().manual_seed(5)
    chosen = n_mask = n_random_or_same = n_same = 0
    draws = 20
    for _ in range(draws):
        masked, labels = mask_tokens(ids, generator=g, **MASK_KW)
        sel = labels != IGNORE_INDEX
        assert not sel[~real].any(), "PAD or CLS chosen"
        assert torch.equal(masked[~real], ids[~real]), "PAD or CLS changed"
        assert torch.equal(labels[sel], ids[sel])
        assert torch.equal(masked[~sel], ids[~sel]), "an unchosen token changed"
        chosen += sel.sum().item()
        n_mask += (masked[sel] == 4).sum().item()
        n_same += (masked[sel] == ids[sel]).sum().item()
        n_random_or_same += (masked[sel] != 4).sum().item()
    rate = chosen / (draws * real.sum().item())
    assert 0.14 < rate < 0.16
    assert 0.78 < n_mask / chosen < 0.82
    # unchanged: 10% kept + a random id that happens to equal the original (1/100 of 10%)
    assert 0.09 < n_same / chosen < 0.115
    assert 0.18 < n_random_or_same / chosen < 0.22


def test_mlm_masking_is_reproducible_with_a_generator():
    ids = _ids(rows=8)
    a = mask_tokens(ids, generator=torch.Generator().manual_seed(9), **MASK_KW)
    b = mask_tokens(ids, generator=torch.Generator().manual_seed(9), **MASK_KW)
    c = mask_tokens(ids, generator=torch.Generator().manual_seed(10), **MASK_KW)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_negatives_are_never_positives():
    g = torch.Generator().manual_seed(0)
    bs = 6
    eye = torch.eye(bs, dtype=torch.bool)
    idx = torch.tensor([0, 0, 1, 2, 2, 2])
    same_image = idx[:, None] == idx[None, :]
    for _ in range(200):
        sim = torch.randn(bs, bs, generator=g) * 5
        assert not eye[torch.arange(bs), sample_negatives(sim, eye, g)].any()
        assert not same_image[torch.arange(bs), sample_negatives(sim, same_image, g)].any()


def test_negatives_follow_the_similarity_weights():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    eye = torch.eye(3, dtype=torch.bool)
    draws = torch.stack([sample_negatives(sim, eye, g) for _ in range(4000)])
    # row 0: weights over columns 1, 2 are e^2 : 1
    share = (draws[:, 0] == 1).float().mean().item()
    assert share == pytest.approx(torch.e ** 2 / (torch.e ** 2 + 1), abs=0.03)
    assert set(draws[:, 1].tolist()) == {0, 2}


def test_all_zero_weight_rows_fall_back_instead_of_crashing():
    g = torch.Generator().manual_seed(0)
    bs = 4
    eye = torch.eye(bs, dtype=torch.bool)
    # softmax underflows to exactly 0 off the diagonal: every row all-zero after removing positives
    sim = torch.eye(bs) * 1e5
    draws = torch.stack([sample_negatives(sim, eye, g) for _ in range(400)])
    assert not (draws == torch.arange(bs)).any()
    assert all(len(set(draws[:, i].tolist())) == bs - 1 for i in range(bs))  # uniform over the others
    # non-finite similarities: treated as zero weights
    nan_sim = torch.full((bs, bs), float("nan"))
    assert not (sample_negatives(nan_sim, eye, g) == torch.arange(bs)).any()
    # every item shares the image id: no non-positive exists, fall back to any other item
    everything = torch.ones(bs, bs, dtype=torch.bool)
    draws = torch.stack([sample_negatives(torch.randn(bs, bs), everything, g) for _ in range(100)])
    assert not (draws == torch.arange(bs)).any()


def test_one_sample_batches_are_refused_with_a_message():
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
