"""Image-text retrieval metrics (TR/IR R@1/5/10, their means, r_mean) with per-query ranks.

As the reference `itm_eval` (docs/METHOD.md §8):
- text retrieval (TR, image -> text): an image's rank is the best rank of any of
  its ground-truth captions in that image's row of `scores_i2t`;
- image retrieval (IR, text -> image): a caption's rank is the rank of its image
  in that caption's row of `scores_t2i`;
- R@K = 100 * fraction of queries with rank < K (ranks are 0-based: 0 means
  retrieved first); `txt_r_mean`/`img_r_mean` average R@1/5/10 and `r_mean`
  averages those two.

Ties. The reference ranks with `np.argsort(score)[::-1]`; numpy's default sort
is stable only for short rows, so the reference orders tied scores arbitrarily
on real data. We pin the order that a stable ascending sort reversed gives:
among equal scores the candidate with the HIGHER index comes first. Hence

    rank(target) = #{c : s_c > s_t} + #{c : s_c == s_t and c > t}

which equals `np.where(np.argsort(s, kind="stable")[::-1] == t)[0][0]`. A model
that scores every candidate alike therefore gets chance-level ranks, not R@1=100.

Queries that cannot be scored never disappear: a query whose own item is unusable
(`image_ok`/`text_ok` False, e.g. an image that failed to load or an empty
caption), or whose ground truth holds no usable item, gets rank `None` (inf
internally), counts as a miss in every R@K, and is listed with its reason.
Unusable candidates rank below every usable one (their scores are ignored), so
they can never push a usable target down. NaN scores are treated as -inf and
counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

RECALL_AT = (1, 5, 10)
# Score comparisons the rank computation holds in memory at once (bounds RAM on 25k x 5k).
_CHUNK_ELEMENTS = 1 << 24

REASON_QUERY = "query item unusable"
REASON_TARGETS = "no usable ground-truth item"


@dataclass
class RetrievalResult:
    """Metrics, 0-based per-query ranks (None = unscored) and the unscored queries with reasons."""
    metrics: dict
    ranks_i2t: list  # per image: best rank of its captions, or None
    ranks_t2i: list  # per caption: rank of its image, or None
    unscored_images: dict = field(default_factory=dict)  # image index -> reason
    unscored_texts: dict = field(default_factory=dict)   # text index -> reason
    nan_scores: int = 0

    def to_json(self) -> dict:
        return {
            "metrics": self.metrics,
            "ranks_i2t": self.ranks_i2t,
            "ranks_t2i": self.ranks_t2i,
            "unscored_images": {str(k): v for k, v in self.unscored_images.items()},
            "unscored_texts": {str(k): v for k, v in self.unscored_texts.items()},
            "nan_scores": self.nan_scores,
        }


def pair_ranks(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """0-based rank of candidate `cols[p]` in row `rows[p]` of `scores` [Q, C], ties as documented.

    Works in chunks of pairs so that a 25k x 5k evaluation never materialises
    more than `_CHUNK_ELEMENTS` comparisons at once.
    """
    n_cand = scores.shape[1]
    out = np.empty(len(rows), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(n_cand, 1))
    cand_index = np.arange(n_cand)
    for lo in range(0, len(rows), step):
        r, c = rows[lo:lo + step], cols[lo:lo + step]
        block = scores[r]                              # [P, C]
        target = block[np.arange(len(r)), c][:, None]  # [P, 1]
        higher = (block > target).sum(1)
        tied_after = ((block == target) & (cand_index[None, :] > c[:, None])).sum(1)
        out[lo:lo + step] = higher + tied_after
    return out


def query_ranks(scores: np.ndarray, targets: Sequence[Sequence[int]],
                query_ok: np.ndarray, candidate_ok: np.ndarray) -> tuple[np.ndarray, dict]:
    """Best rank over each query's usable targets (inf when unscored) and the reasons for inf."""
    scores = np.where(candidate_ok[None, :], scores, -np.inf)
    ranks = np.full(len(targets), np.inf)
    unscored: dict[int, str] = {}
    rows, cols = [], []
    for q, tgt in enumerate(targets):
        usable = [t for t in tgt if candidate_ok[t]]
        if not query_ok[q]:
            unscored[q] = REASON_QUERY
        elif not usable:
            unscored[q] = REASON_TARGETS
        else:
            rows.extend([q] * len(usable))
            cols.extend(usable)
    if rows:
        rows_a, cols_a = np.asarray(rows), np.asarray(cols)
        np.minimum.at(ranks, rows_a, pair_ranks(scores, rows_a, cols_a).astype(float))
    return ranks, unscored


def recall_at(ranks: np.ndarray, k: int) -> float:
    """100 * fraction of ranks below k; unscored queries (inf) count as misses."""
    return 100.0 * float((ranks < k).sum()) / len(ranks) if len(ranks) else 0.0


def _as_lists(mapping: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], n: int) -> list[list[int]]:
    if isinstance(mapping, Mapping):
        return [list(mapping.get(i, [])) for i in range(n)]
    return [list(v) for v in mapping]


def retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img,
                      image_ok=None, text_ok=None) -> RetrievalResult:
    """TR/IR recall from score matrices [N_img, N_txt] and [N_txt, N_img].

    `img2txt`: per image, the indices of its captions (list of lists or dict);
    `txt2img`: per caption, its image index (list or dict); `image_ok`/`text_ok`:
    optional bool masks of usable items. Metric keys follow the reference
    (`txt_r1` ... `r_mean`), plus the query counts.
    """
    s_i2t = np.asarray(scores_i2t, dtype=np.float64)
    s_t2i = np.asarray(scores_t2i, dtype=np.float64)
    n_img, n_txt = s_i2t.shape
    if s_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {s_t2i.shape}, expected {(n_txt, n_img)} "
                         f"(the transpose of scores_i2t {s_i2t.shape})")
    img2txt_l = _as_lists(img2txt, n_img)
    t2i = [txt2img[t] for t in range(n_txt)]
    if len(img2txt_l) != n_img:
        raise ValueError(f"img2txt has {len(img2txt_l)} images, scores have {n_img}")
    for i, caps in enumerate(img2txt_l):
        bad = [t for t in caps if not 0 <= t < n_txt]
        if bad:
            raise ValueError(f"img2txt[{i}] names captions {bad} outside 0..{n_txt - 1}")
    bad_t = [t for t, i in enumerate(t2i) if not 0 <= i < n_img]
    if bad_t:
        raise ValueError(f"txt2img maps captions {bad_t[:10]} to images outside 0..{n_img - 1}")
    image_ok = np.ones(n_img, bool) if image_ok is None else np.asarray(image_ok, bool)
    text_ok = np.ones(n_txt, bool) if text_ok is None else np.asarray(text_ok, bool)

    nan_scores = int(np.isnan(s_i2t).sum() + np.isnan(s_t2i).sum())
    s_i2t = np.nan_to_num(s_i2t, nan=-np.inf)
    s_t2i = np.nan_to_num(s_t2i, nan=-np.inf)

    tr_ranks, un_img = query_ranks(s_i2t, img2txt_l, image_ok, text_ok)
    ir_ranks, un_txt = query_ranks(s_t2i, [[i] for i in t2i], text_ok, image_ok)

    metrics = {f"txt_r{k}": recall_at(tr_ranks, k) for k in RECALL_AT}
    metrics["txt_r_mean"] = sum(metrics[f"txt_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    metrics.update({f"img_r{k}": recall_at(ir_ranks, k) for k in RECALL_AT})
    metrics["img_r_mean"] = sum(metrics[f"img_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics.update(n_images=n_img, n_texts=n_txt,
                   n_unscored_images=len(un_img), n_unscored_texts=len(un_txt))

    def listed(r):
        return [None if not np.isfinite(x) else int(x) for x in r]

    return RetrievalResult(metrics, listed(tr_ranks), listed(ir_ranks), un_img, un_txt, nan_scores)


def format_table(metrics: dict, title: str = "retrieval") -> str:
    """A fixed-width text table of the recall numbers."""
    head = f"{title:<12}" + "".join(f"{c:>8}" for c in ("R@1", "R@5", "R@10", "mean"))
    tr = f"{'TR (i->t)':<12}" + "".join(f"{metrics[k]:8.2f}" for k in ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean"))
    ir = f"{'IR (t->i)':<12}" + "".join(f"{metrics[k]:8.2f}" for k in ("img_r1", "img_r5", "img_r10", "img_r_mean"))
    foot = (f"r_mean {metrics['r_mean']:.2f}   images {metrics['n_images']} "
            f"(unscored {metrics['n_unscored_images']})   texts {metrics['n_texts']} "
            f"(unscored {metrics['n_unscored_texts']})")
    return "\n".join([head, tr, ir, foot])
