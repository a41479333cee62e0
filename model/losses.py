"""ALBEF's three pretraining losses and the two random choices they need.

Formulas: docs/METHOD.md §2. Similarities and log-softmaxes are
computed in fp32 even under autocast (a softmax over 65k queue columns at
temperature 0.07 is where low precision hurts). The random choices (ITM hard
negatives, MLM masking) take an optional `torch.Generator`, so a caller can
reproduce or inject them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of tokens that are not predicted (torch's cross-entropy default)


@dataclass
class ITCOutput:
    loss: torch.Tensor        # scalar, grad
    sim_i2t: torch.Tensor     # [bs, bs+Q] online image-to-text similarities / temp (grad)
    sim_t2i: torch.Tensor     # [bs, bs+Q]
    accuracy: torch.Tensor    # scalar, detached: argmax lands on a positive (mean of both directions)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def itc_positives(bs: int, queue_size: int, device: torch.device, idx: torch.Tensor | None = None,
                  idx_queue: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [bs, bs+Q]: which columns are positives of each row.

    Pretraining: the diagonal of the batch block. Retrieval (`idx` given): every
    column, batch or queue, holding the same image id.
    """
    if idx is None:
        pos = torch.zeros(bs, bs + queue_size, dtype=torch.bool, device=device)
        pos[:, :bs].fill_diagonal_(True)
        return pos
    idx_all = torch.cat([idx.view(1, -1), idx_queue.view(1, -1)], dim=1)  # [1, bs+Q]
    return idx.view(-1, 1) == idx_all


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
             text_feat_m: torch.Tensor, image_queue: torch.Tensor, text_queue: torch.Tensor,
             temp: torch.Tensor, alpha: float, positives: torch.Tensor) -> ITCOutput:
    """Image-text contrastive loss with momentum distillation.

    feats [bs, D] (L2-normalised; `_m` from the momentum model), queues [D, Q],
    positives bool [bs, bs+Q]. Targets: `alpha * softmax(s_m) + (1-alpha) * y`
    with y the positives normalised per row; the softmax covers batch + queue.
    """
    with _no_autocast(image_feat.device):
        image_feat, text_feat = image_feat.float(), text_feat.float()
        image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()
        image_queue, text_queue = image_queue.float(), text_queue.float()
        temp = temp.float()
        with torch.no_grad():
            y = positives.float()
            y = y / y.sum(1, keepdim=True)
            # [f_m ; queue] columns without concatenating the (large) queues
            sim_i2t_m = torch.cat([image_feat_m @ text_feat_m.t(), image_feat_m @ text_queue], 1) / temp
            sim_t2i_m = torch.cat([text_feat_m @ image_feat_m.t(), text_feat_m @ image_queue], 1) / temp
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * y
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * y
        sim_i2t = torch.cat([image_feat @ text_feat_m.t(), image_feat @ text_queue], 1) / temp
        sim_t2i = torch.cat([text_feat @ image_feat_m.t(), text_feat @ image_queue], 1) / temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
        with torch.no_grad():
            rows = torch.arange(positives.shape[0], device=positives.device)
            hit_i2t = positives[rows, sim_i2t.argmax(1)].float().mean()
            hit_t2i = positives[rows, sim_t2i.argmax(1)].float().mean()
    return ITCOutput((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i, (hit_i2t + hit_t2i) / 2)


@torch.no_grad()
def sample_negatives(sim: torch.Tensor, positives: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard negative per row, drawn with probability softmax(sim) over non-positive columns.

    sim [bs, bs] (row = query, column = in-batch candidate), positives bool [bs, bs]
    (the diagonal; in retrieval every pair sharing an image id). Returns long [bs].

    A row whose weights are all zero (every candidate is a positive, or the
    similarities underflow or are not finite) does not crash, unlike the
    reference: it draws uniformly over its non-positive columns, and a row with
    no non-positive column at all (every item shares its image id) draws
    uniformly over the other items, i.e. a pair labelled negative that shares
    the image id: the only negative that exists in that batch.
    """
    bs = sim.shape[0]
    if bs < 2:
        raise ValueError("ITM hard negatives need at least 2 samples per rank, got a batch of 1")
    weights = F.softmax(sim.float(), dim=1)
    weights = weights.masked_fill(positives | ~torch.isfinite(weights), 0.0)
    others = ~torch.eye(bs, dtype=torch.bool, device=sim.device)
    allowed = ~positives & others
    allowed = torch.where(allowed.any(1, keepdim=True), allowed, others)
    weights = torch.where((weights.sum(1) > 0)[:, None], weights, allowed.float())
    device = generator.device if generator is not None else weights.device
    return torch.multinomial(weights.to(device), 1, generator=generator).view(bs).to(sim.device)


def itm_loss(logits: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the ITM head over [bs positives ; 2*bs negatives]; returns (loss, accuracy)."""
    labels = torch.cat([torch.ones(bs, dtype=torch.long, device=logits.device),
                        torch.zeros(2 * bs, dtype=torch.long, device=logits.device)])
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(1) == labels).float().mean()
    return loss, accuracy


@torch.no_grad()
def mask_tokens(input_ids: torch.Tensor, *, vocab_size: int, pad_token_id: int, cls_token_id: int,
                mask_token_id: int, probability: float, mask_fraction: float, random_fraction: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose tokens with `probability` (never PAD or CLS); of those,
    `mask_fraction` -> [MASK], `random_fraction` -> a random id in [0, vocab), the rest unchanged.

    input_ids long [B, L] -> (masked ids [B, L], labels [B, L]: the original id where chosen,
    IGNORE_INDEX elsewhere). Three draws, in this order: choice, split, random ids.
    """
    device = generator.device if generator is not None else input_ids.device
    shape = input_ids.shape
    chosen = torch.rand(shape, generator=generator, device=device).to(input_ids.device) < probability
    chosen &= (input_ids != pad_token_id) & (input_ids != cls_token_id)
    split = torch.rand(shape, generator=generator, device=device).to(input_ids.device)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=device).to(input_ids.device)
    to_mask = chosen & (split < mask_fraction)
    to_random = chosen & (split >= mask_fraction) & (split < mask_fraction + random_fraction)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, soft_labels: torch.Tensor,
             alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM with distillation over the M masked positions; returns (loss, accuracy).

    logits [M, V] (student), targets long [M], soft_labels [M, V] (softmax of
    the momentum model's logits). `(1-alpha) * CE + alpha * mean(-sum(log_softmax * soft))`.
    With no masked token at all (possible for a batch of very short captions)
    the loss is a graph-connected zero rather than the NaN of an empty mean.
    """
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    log_probs = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_probs, targets)
    distill = -(log_probs * soft_labels.float()).sum(-1).mean()
    accuracy = (logits.detach().argmax(-1) == targets).float().mean()
    return (1 - alpha) * ce + alpha * distill, accuracy


def total_loss(terms: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """Weighted sum of the `loss_*` entries of a model's output (weight 1.0 where none is given)."""
    weights = weights or {}
    return sum(weights.get(name, 1.0) * value for name, value in terms.items() if name.startswith("loss_"))


@torch.no_grad()
def mean_pairwise_cosine(feat: torch.Tensor) -> torch.Tensor:
    """Mean cosine between the different rows of L2-normalised features [B, D] (0-d, detached).

    Near 1 when the encoder maps every input to the same direction (a collapse);
    `(|sum f|^2 - B) / (B (B-1))` without forming the B x B matrix.
    """
    feat = feat.float()
    b = feat.shape[0]
    if b < 2:
        return feat.new_zeros(())
    total = feat.sum(0)
    return ((total @ total) - (feat * feat).sum()) / (b * (b - 1))
