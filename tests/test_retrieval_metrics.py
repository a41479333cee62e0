"""Retrieval metrics on hand-built score matrices with known ranks."""
import numpy as np
import pytest

from model.tasks.retrieval_metrics import (REASON_QUERY, REASON_TARGETS, format_table, pair_ranks,
                                     retrieval_metrics)

# 3 images; image 0 has captions 0,1; image 1 has caption 2; image 2 has captions 3,4.
IMG2TXT = [[0, 1], [2], [3, 4]]
TXT2IMG = [0, 0, 1, 2, 2]


def reference_itm_eval_ranks(s_i2t, s_t2i, img2txt, txt2img):
    """The reference's loops, with the stable sort whose tie order we pin."""
    tr = []
    for i, row in enumerate(s_i2t):
        inds = np.argsort(row, kind="stable")[::-1]
        tr.append(min(int(np.where(inds == t)[0][0]) for t in img2txt[i]))
    ir = []
    for t, row in enumerate(s_t2i):
        inds = np.argsort(row, kind="stable")[::-1]
        ir.append(int(np.where(inds == txt2img[t])[0][0]))
    return tr, ir


def test_known_ranks_with_several_captions_per_image():
    s_i2t = np.array([
        # image 0: its captions 0,1 at ranks 3 and 1 -> best rank 1
        [0.1, 0.8, 0.9, 0.5, 0.0],
        # image 1: its caption 2 first -> rank 0
        [0.0, 0.1, 0.9, 0.2, 0.3],
        # image 2: its captions 3,4 at ranks 4 and 2 -> best rank 2
        [0.9, 0.8, 0.5, 0.1, 0.6],
    ])
    s_t2i = np.array([
        [0.9, 0.1, 0.2],   # caption 0 -> image 0 at rank 0
        [0.1, 0.9, 0.2],   # caption 1 -> image 0 at rank 2
        [0.5, 0.4, 0.3],   # caption 2 -> image 1 at rank 1
        [0.0, 0.1, 0.2],   # caption 3 -> image 2 at rank 0
        [0.3, 0.2, 0.1],   # caption 4 -> image 2 at rank 2
    ])
    res = retrieval_metrics(s_i2t, s_t2i, IMG2TXT, TXT2IMG)
    assert res.ranks_i2t == [1, 0, 2]
    assert res.ranks_t2i == [0, 2, 1, 0, 2]
    m = res.metrics
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == 100.0 and m["txt_r10"] == 100.0
    assert m["img_r1"] == pytest.approx(40.0) and m["img_r5"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["img_r_mean"] == pytest.approx((40 + 200) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    assert (m["n_images"], m["n_texts"], m["n_unscored_images"], m["n_unscored_texts"]) == (3, 5, 0, 0)
    assert tr_ir_match_reference(s_i2t, s_t2i)


def tr_ir_match_reference(s_i2t, s_t2i):
    res = retrieval_metrics(s_i2t, s_t2i, IMG2TXT, TXT2IMG)
    tr, ir = reference_itm_eval_ranks(s_i2t, s_t2i, IMG2TXT, TXT2IMG)
    return res.ranks_i2t == tr and res.ranks_t2i == ir


def test_ties_rank_higher_index_first():
    # All scores equal: the candidate with the higher index wins every tie.
    s_i2t = np.zeros((3, 5))
    s_t2i = np.zeros((5, 3))
    res = retrieval_metrics(s_i2t, s_t2i, IMG2TXT, TXT2IMG)
    # image i: best of its captions' ranks = 4 - max(caption index)
    assert res.ranks_i2t == [3, 2, 0]
    assert res.ranks_t2i == [2, 2, 1, 0, 0]
    # Constant scores must not give perfect recall.
    assert res.metrics["txt_r1"] == pytest.approx(100 / 3)
    # A tie with a lower-index candidate does not cost a rank, one with a higher index does.
    s = np.array([[0.5, 0.5, 0.2]])
    assert pair_ranks(s, np.array([0, 0]), np.array([0, 1])).tolist() == [1, 0]


def test_matches_reference_loop_on_random_tied_matrices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        # few distinct values -> many ties, rows longer than numpy's insertion-sort cutoff
        s_i2t = rng.integers(0, 3, size=(3, 5)).astype(float)
        s_t2i = rng.integers(0, 3, size=(5, 3)).astype(float)
        assert tr_ir_match_reference(s_i2t, s_t2i)
    n_img, per = 8, 3
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    s_i2t = rng.integers(0, 4, size=(n_img, n_img * per)).astype(float)
    s_t2i = rng.integers(0, 4, size=(n_img * per, n_img)).astype(float)
    res = retrieval_metrics(s_i2t, s_t2i, img2txt, txt2img)
    tr, ir = reference_itm_eval_ranks(s_i2t, s_t2i, img2txt, txt2img)
    assert res.ranks_i2t == tr and res.ranks_t2i == ir


def test_minus_100_fill_outside_top_k_behaves_like_reference():
    # Re-ranked matrices: top-k entries carry ITM logits, the rest -100.
    s_i2t = np.full((3, 5), -100.0)
    s_i2t[0, [1, 3]] = [2.0, 1.0]     # caption 1 of image 0 re-scored first
    s_i2t[1, [0, 4]] = [3.0, -1.0]    # caption 2 not in the top-k
    s_i2t[2, [4, 2]] = [0.5, 0.7]     # caption 4 second
    s_t2i = np.full((5, 3), -100.0)
    res = retrieval_metrics(s_i2t, s_t2i, IMG2TXT, TXT2IMG)
    assert res.ranks_i2t[0] == 0 and res.ranks_i2t[2] == 1
    assert res.ranks_i2t[1] >= 2 and res.metrics["txt_r1"] == pytest.approx(100 / 3)
    assert tr_ir_match_reference(s_i2t, s_t2i)


def test_unscorable_queries_are_misses_and_reported():
    rng = np.random.default_rng(1)
    s_i2t = rng.normal(size=(3, 5))
    s_t2i = rng.normal(size=(5, 3))
    # Make everything perfectly retrievable, then break items.
    for i, caps in enumerate(IMG2TXT):
        s_i2t[i, caps] = 10.0
    for t, i in enumerate(TXT2IMG):
        s_t2i[t, i] = 10.0
    image_ok = np.array([True, False, True])          # image 1 failed to load
    text_ok = np.array([True, True, True, False, False])  # both captions of image 2 empty
    res = retrieval_metrics(s_i2t, s_t2i, IMG2TXT, TXT2IMG, image_ok, text_ok)
    assert res.ranks_i2t == [0, None, None]
    assert res.unscored_images == {1: REASON_QUERY, 2: REASON_TARGETS}
    # caption 2 belongs to the failed image; captions 3,4 are empty
    assert res.ranks_t2i == [0, 0, None, None, None]
    assert res.unscored_texts == {2: REASON_TARGETS, 3: REASON_QUERY, 4: REASON_QUERY}
    m = res.metrics
    assert m["txt_r10"] == pytest.approx(100 / 3) and m["img_r10"] == pytest.approx(40.0)
    assert (m["n_unscored_images"], m["n_unscored_texts"]) == (2, 3)


def test_unusable_candidate_cannot_outrank_a_usable_target():
    s_i2t = np.array([[0.5, 0.1, 9.0, 0.0, 0.0]] * 3)   # caption 2 scores highest everywhere
    s_t2i = np.zeros((5, 3))
    text_ok = np.array([True, True, False, True, True])
    res = retrieval_metrics(s_i2t, s_t2i, IMG2TXT, TXT2IMG, text_ok=text_ok)
    assert res.ranks_i2t[0] == 0   # caption 0 first once unusable caption 2 is set aside


def test_nan_scores_counted_and_ranked_last():
    s_i2t = np.array([[np.nan, 0.1, 0.2, 0.3, 0.0]] + [[0.0] * 5] * 2)
    s_t2i = np.zeros((5, 3))
    res = retrieval_metrics(s_i2t, s_t2i, IMG2TXT, TXT2IMG)
    assert res.nan_scores == 1
    assert res.ranks_i2t[0] == 2      # caption 1 (0.1) after 0.3 and 0.2; NaN caption 0 last


def test_bad_shapes_and_indices_are_refused():
    with pytest.raises(ValueError, match="scores_t2i has shape"):
        retrieval_metrics(np.zeros((3, 5)), np.zeros((3, 5)), IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError, match="img2txt\\[0\\]"):
        retrieval_metrics(np.zeros((3, 5)), np.zeros((5, 3)), [[0, 7], [2], [3, 4]], TXT2IMG)


def test_table_and_json():
    res = retrieval_metrics(np.eye(3)[:, [0, 0, 1, 2, 2]], np.eye(3)[[0, 0, 1, 2, 2]], IMG2TXT, TXT2IMG)
    table = format_table(res.metrics)
    assert "TR (i->t)" in table and "IR (t->i)" in table and "r_mean" in table
    js = res.to_json()
    assert js["ranks_i2t"] == res.ranks_i2t and js["metrics"]["txt_r1"] == 100.0
