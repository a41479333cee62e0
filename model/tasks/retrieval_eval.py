"""Retrieval evaluation as the reference: ITC similarity, top-k re-ranked by the ITM head.

1. Unimodal features of every image and every caption (`encode_image`,
   `encode_text`; captions padded to `max_tokens` as the reference's
   `padding="max_length"`), on every rank, as the reference does.
2. `sims = image_feat @ text_feat.T` (ITC similarity, no temperature).
3. For each image (row of sims) the `k` best captions, for each caption the `k`
   best images, are re-scored with the ITM head's class-1 logit; every other
   entry of the score matrix is -100.
4. Queries (rows) are split across ranks in contiguous blocks of
   `N // world + 1` (the reference's split). Each rank writes only its own rows
   into a zero matrix (its rows start at -100), so the `all_reduce(SUM)` gives
   exactly the single-process matrix. (The reference fills every row with -100
   on every rank, which shifts all summed scores by -100*(world-1): same ranks,
   different numbers.)

Every rank makes the same number of forward calls (padding queries are run on a
valid item and discarded), so a ZeRO-3-partitioned model never waits on a rank
that has stopped.

Unusable items (image missing or undecodable, empty caption) are not
candidates and their query rows stay -100; the metric function counts those
queries as misses and lists them.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from model.tasks.retrieval_metrics import RetrievalResult, retrieval_metrics
from pipeline.annotations import RetrievalEvalDataset, collate_eval_images
from pipeline.tokenize import text_batch

# Score of every (query, candidate) pair outside the re-ranked top-k (the reference's fill).
NOT_RERANKED = -100.0


@dataclass
class Features:
    image_tokens: torch.Tensor  # [N_img, N_patch+1, D] (zeros for unusable images)
    image_feat: torch.Tensor    # [N_img, E] L2-normalised
    text_tokens: torch.Tensor   # [N_txt, L, D]
    text_mask: torch.Tensor     # [N_txt, L]
    text_feat: torch.Tensor     # [N_txt, E]
    image_ok: torch.Tensor      # [N_img] bool
    text_ok: torch.Tensor       # [N_txt] bool


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


@torch.no_grad()
def text_features(model, texts: list[str], tokenizer, max_tokens: int, batch_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token states [N, max_tokens, D], masks [N, max_tokens] and features [N, E] of all captions."""
    tokens, masks, feats = [], [], []
    for lo in range(0, len(texts), batch_size):
        ids, mask = text_batch(tokenizer, texts[lo:lo + batch_size], max_tokens)
        ids = _pad_to(ids, max_tokens, tokenizer.pad_token_id).to(device)
        mask = _pad_to(mask, max_tokens, 0).to(device)
        tok, feat = model.encode_text(ids, mask)
        tokens.append(tok.float())
        masks.append(mask)
        feats.append(feat.float())
    return torch.cat(tokens), torch.cat(masks), torch.cat(feats)


@torch.no_grad()
def image_features(model, dataset: RetrievalEvalDataset, batch_size: int, device: torch.device,
                   num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states and features of every image slot; failed decodes are marked on the dataset.

    Unusable slots keep zero rows, so indices stay those of the annotation file.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_eval_images)
    tokens = feats = None
    for batch in loader:
        for index, error in batch["failed"]:
            dataset.mark_unreadable(index, error)
        if batch["image"] is None:
            continue
        tok, feat = model.encode_image(batch["image"].to(device))
        if tokens is None:
            tokens = torch.zeros((len(dataset),) + tuple(tok.shape[1:]), device=device)
            feats = torch.zeros((len(dataset), feat.shape[1]), device=device)
        idx = batch["index"].to(device)
        tokens[idx] = tok.float()
        feats[idx] = feat.float()
    if tokens is None:
        raise ValueError(f"no image of {dataset.ann_file} could be loaded: "
                         f"problems {dataset.problem_counts()}")
    return tokens, feats


@torch.no_grad()
def compute_features(model, dataset: RetrievalEvalDataset, tokenizer, *, max_tokens: int,
                     image_batch_size: int, text_batch_size: int, device: torch.device,
                     num_workers: int = 0) -> Features:
    """Features of every image slot and caption; an evaluation set with nothing usable is refused."""
    if not any(dataset.text_ok):
        raise ValueError(f"no usable caption in {dataset.ann_file}: problems {dataset.problem_counts()}")
    img_tok, img_feat = image_features(model, dataset, image_batch_size, device, num_workers)
    txt_tok, txt_mask, txt_feat = text_features(model, dataset.texts, tokenizer, max_tokens,
                                                text_batch_size, device)
    return Features(img_tok, img_feat, txt_tok, txt_mask, txt_feat,
                    torch.tensor(dataset.image_ok, device=device),
                    torch.tensor(dataset.text_ok, device=device))


def itc_similarity(features: Features) -> torch.Tensor:
    """[N_img, N_txt] cosine similarity; pairs with an unusable item are -inf (never a candidate)."""
    sims = features.image_feat @ features.text_feat.t()
    usable = features.image_ok[:, None] & features.text_ok[None, :]
    return sims.masked_fill(~usable, float("-inf"))


@torch.no_grad()
def distinct_candidate_sets(sims: torch.Tensor, k: int) -> dict[str, float]:
    """How many different top-k candidate sets the ITC stage hands the queries, per direction.

    A collapsed ITC (all features alike) gives every query the same k candidates,
    and an ITM re-ranking of them can still look better than chance: this makes
    that visible. `itc_distinct_frac_*` = distinct sets / usable queries.
    """
    out = {}
    for name, sim in (("i2t", sims), ("t2i", sims.t())):
        rows = sim[torch.isfinite(sim).any(1)]
        kk = min(k, int(torch.isfinite(sim).any(0).sum()))
        if rows.shape[0] == 0 or kk == 0:
            continue
        top = rows.topk(kk, dim=1).indices.sort(dim=1).values
        distinct = int(torch.unique(top, dim=0).shape[0])
        out[f"itc_distinct_sets_{name}"] = distinct
        out[f"itc_distinct_frac_{name}"] = distinct / rows.shape[0]
    return out


def query_block(n: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, end, per_rank) of this rank's contiguous query block, as the reference splits."""
    step = n // world + 1
    start = min(n, rank * step)
    return start, min(n, start + step), step


@torch.no_grad()
def rerank(model, features: Features, sims: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices i2t [N_img, N_txt] and t2i [N_txt, N_img]: ITM logits on the top-k, -100 elsewhere."""
    rank, world = _dist()
    f = features
    # models whose itm_logits takes `image_index` (ALBEF) get each image's keys/values once per query
    indexed = "image_index" in inspect.signature(model.itm_logits).parameters

    def one_direction(sim: torch.Tensor, query_ok: torch.Tensor, cand_ok: torch.Tensor, i2t: bool):
        n_q, n_c = sim.shape
        kk = min(k, int(cand_ok.sum()))
        scores = torch.zeros((n_q, n_c), device=sim.device)
        start, end, step = query_block(n_q, rank, world)
        scores[start:end] = NOT_RERANKED
        ok_rows = torch.nonzero(query_ok).flatten().tolist()
        for slot in range(step if kk and ok_rows else 0):
            q = start + slot
            real = q < end and bool(query_ok[q])
            run_q = q if real else ok_rows[0]   # padding: same forward on every rank, result dropped
            top_idx = sim[run_q].topk(kk).indices
            if i2t and indexed:   # one image, k texts: its cross-attention keys/values computed once, not k times
                logits = model.itm_logits(f.image_tokens[run_q:run_q + 1], f.text_tokens[top_idx],
                                          f.text_mask[top_idx], image_index=top_idx.new_zeros(kk))
            elif i2t:
                logits = model.itm_logits(f.image_tokens[run_q].expand(kk, -1, -1),
                                          f.text_tokens[top_idx], f.text_mask[top_idx])
            else:
                logits = model.itm_logits(f.image_tokens[top_idx],
                                          f.text_tokens[run_q].expand(kk, -1, -1),
                                          f.text_mask[run_q].expand(kk, -1))
            if real:
                scores[q, top_idx] = logits[:, 1].float()
        if world > 1:
            dist.all_reduce(scores, op=dist.ReduceOp.SUM)
        return scores.cpu().numpy()

    s_i2t = one_direction(sims, f.image_ok, f.text_ok, True)
    s_t2i = one_direction(sims.t(), f.text_ok, f.image_ok, False)
    return s_i2t, s_t2i


def _metrics(dataset: RetrievalEvalDataset, s_i2t, s_t2i) -> RetrievalResult:
    return retrieval_metrics(s_i2t, s_t2i, dataset.img2txt, dataset.txt2img,
                             image_ok=dataset.image_ok, text_ok=dataset.text_ok)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}   # eval.precision -> autocast dtype (None: off)


def eval_autocast(device: torch.device, precision: str):
    """The autocast context of `eval.precision` (fp32: none). Stored features and scores stay fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"eval.precision={precision!r} is unknown; known: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model, dataset: RetrievalEvalDataset, tokenizer, *, k_test: int, max_tokens: int = 30,
             image_batch_size: int = 64, text_batch_size: int = 256, device=None,
             num_workers: int = 0, precision: str = "fp32"
             ) -> tuple[RetrievalResult, dict, tuple[np.ndarray, np.ndarray]]:
    """Full evaluation (ITC top-k + ITM re-ranking).

    Returns the result, timings in seconds and the score matrices (i2t, t2i).
    `precision` "bf16" runs the encoders and the re-ranking under bf16 autocast (features,
    similarities and scores are kept in fp32).

    Collective: every rank calls it with the same dataset.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    with eval_autocast(device, precision):
        features = compute_features(model, dataset, tokenizer, max_tokens=max_tokens,
                                    image_batch_size=image_batch_size, text_batch_size=text_batch_size,
                                    device=device, num_workers=num_workers)
    t1 = time.perf_counter()
    sims = itc_similarity(features)
    with eval_autocast(device, precision):
        s_i2t, s_t2i = rerank(model, features, sims, k_test)
    t2 = time.perf_counter()
    result = _metrics(dataset, s_i2t, s_t2i)
    result.metrics.update(distinct_candidate_sets(sims, k_test))
    model.train(was_training)
    timings = {"features_s": t1 - t0, "rerank_s": t2 - t1, "metrics_s": time.perf_counter() - t2}
    return result, timings, (s_i2t, s_t2i)


@torch.no_grad()
def evaluate_itc(model, dataset: RetrievalEvalDataset, tokenizer, *, max_tokens: int = 30,
                 image_batch_size: int = 64, text_batch_size: int = 256, device=None,
                 num_workers: int = 0) -> dict:
    """ITC-only retrieval metrics (no re-ranking): fast zero-shot monitoring during training.

    Returns the metric dict (`txt_r1` ... `r_mean`, counts, and the distinct top-10
    candidate sets of `distinct_candidate_sets`). Every rank computes
    the same features, so it is safe (and must be called on every rank) under a
    ZeRO-3-partitioned model.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = compute_features(model, dataset, tokenizer, max_tokens=max_tokens,
                                image_batch_size=image_batch_size, text_batch_size=text_batch_size,
                                device=device, num_workers=num_workers)
    sims = itc_similarity(features)
    model.train(was_training)
    scores = sims.cpu().numpy()
    return {**_metrics(dataset, scores, scores.T).metrics, **distinct_candidate_sets(sims, k=10)}
