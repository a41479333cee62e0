"""ALBEF with a classification head on the fused [CLS]: SNLI-VE, NLVR2 and NLVR2's text-assignment step.

- `ALBEFClassifier(cfg, num_classes, num_images, distill)`: SNLI-VE is one image
  and 3 classes (contradiction, neutral, entailment), NLVR2 two images and 2
  classes (False, True). Head: Linear-ReLU-Linear (`cls_head`). With `distill`,
  fp32 momentum copies of the ViT, the text encoder and the head are the
  teacher: loss = (1-alpha) CE(p, y) + alpha CE(p, softmax(p_m)) (docs/METHOD.md §9, §10).
- Two images (`PairFusionEncoder`): both go through one ViT call; every fusion
  layer is doubled into a pair of blocks, the first cross-attending image 0,
  the second image 1. Inside a pair the cross-attention key and value
  projections are the same Parameters (the reference's `share_cross_attention`);
  everything else in the two blocks is separate. `fusion_layers[j]` is the
  reference's BERT layer `num_text_layers + j`, so its checkpoint names map as for ALBEF.
- `TextAssignment(cfg)`: NLVR2's pre-training step (§10). For each caption b a
  second image j is drawn from softmax(v_b . v_j / 0.07) over the other images
  of the batch (v = normalised `vision_proj` of the ViT [CLS], no gradient);
  the pair is (b, j) -> label 0, (j, b) -> 1, or two drawn images (j1, j2) -> 2
  ("none"), with probabilities 1/3 each. `ta_head` (Linear) on the fused
  [CLS], plain cross-entropy, no teacher.

The modules offer what the engine needs: `trainable_parameters()` (momentum
copies and the frozen `vision_proj` excluded), `momentum_modules()`,
`momentum_update()`, `copy_online_to_momentum()` and `sync_buffers()`.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from model.encoders import TextFusionEncoder, build_text_encoder, build_vision_encoder
from model.losses import mlm_loss
from model.momentum import MomentumModel, make_momentum_copies
from model.settings import ALBEFSettings, TextSettings

TA_TEMPERATURE = 0.07          # fixed in the reference's TA sampling (the learned `temp` is not used)
TA_LABELS = ("image0", "image1", "none")


class PairFusionEncoder(TextFusionEncoder):
    """Text encoder with 2 x num_fusion_layers fusion blocks: block 2i attends image 0, block 2i+1 image 1."""

    def __init__(self, s: TextSettings, vision_width: int):
        super().__init__(dataclasses.replace(s, num_fusion_layers=2 * s.num_fusion_layers), vision_width,
                         with_mlm_head=False)
        for first, second in zip(self.fusion_layers[0::2], self.fusion_layers[1::2]):
            for name in ("key", "value"):
                # the same Parameter objects in both blocks (as the reference; ZeRO-3 handles them
                # like the tied MLM decoder weight)
                getattr(first.cross_attn, name).weight = getattr(second.cross_attn, name).weight
                getattr(first.cross_attn, name).bias = getattr(second.cross_attn, name).bias

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
             image_states: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # [B,L,H] text states, [B,L] mask, two [B,N,W] image token sets -> [B,L,H]
        mask = attention_mask[:, None, None, :].bool()
        x = text_states
        for j, layer in enumerate(self.fusion_layers):
            x = layer(x, mask, image_states[j % 2])
        return x


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """Linear-ReLU-Linear; the Sequential's names (`0.weight`, `2.weight`) are the reference's."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def classify_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy): CE, or with a teacher (1-alpha) CE + alpha CE against softmax(teacher).

    logits, teacher_logits [B,C]; targets long [B]. The distilled form is the
    MLM one (`model.losses.mlm_loss`) over B rows instead of masked tokens.
    """
    if teacher_logits is None:
        logits = logits.float()
        return F.cross_entropy(logits, targets), (logits.detach().argmax(1) == targets).float().mean()
    return mlm_loss(logits, targets, F.softmax(teacher_logits.float(), dim=-1), alpha)


class _WithMomentum(MomentumModel):
    """The task models' base: momentum bookkeeping (model/momentum.py), no queues to sync."""

    def sync_buffers(self) -> None:
        """No queues here; every rank builds the same weights from the same seed and checkpoint."""


class ALBEFClassifier(_WithMomentum):
    def __init__(self, cfg: dict, num_classes: int, num_images: int, distill: bool):
        super().__init__()
        if num_images not in (1, 2):
            raise ValueError(f"num_images={num_images}: 1 (SNLI-VE) or 2 (NLVR2)")
        s = ALBEFSettings.from_dict(cfg)
        self.settings, self.num_images, self.distill = s, num_images, distill
        self.visual_encoder = build_vision_encoder(s.vision)
        self.text_encoder = (PairFusionEncoder(s.text, s.vision.width) if num_images == 2
                             else build_text_encoder(s.text, s.vision.width, with_mlm_head=False))
        self.cls_head = classifier_head(s.text.hidden_size, num_classes)
        if distill:
            # one deepcopy call: the pair blocks' shared K/V stay shared in the teacher
            self.visual_encoder_m, self.text_encoder_m, self.cls_head_m = make_momentum_copies(
                [self.visual_encoder, self.text_encoder, self.cls_head])

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        if not self.distill:
            return []
        return [(self.visual_encoder, self.visual_encoder_m), (self.text_encoder, self.text_encoder_m),
                (self.cls_head, self.cls_head_m)]

    def _logits(self, visual_encoder, text_encoder, head, image, input_ids, attention_mask) -> torch.Tensor:
        if self.num_images == 1:
            tokens = visual_encoder(image)  # [B,1+N,D]
        else:  # one ViT call on [image 0s; image 1s], as the reference
            tokens = visual_encoder(image.transpose(0, 1).flatten(0, 1))  # [2B,1+N,D]
            tokens = tokens.view(2, image.shape[0], *tokens.shape[1:]).unbind(0)  # two [B,1+N,D]
        text = text_encoder.encode(input_ids, attention_mask)
        return head(text_encoder.fuse(text, attention_mask, tokens)[:, 0])

    def logits(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """image [B,3,H,W] (one image) or [B,2,3,H,W] (image pairs); ids, mask [B,L] -> [B,C]."""
        return self._logits(self.visual_encoder, self.text_encoder, self.cls_head, image, input_ids,
                            attention_mask)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                label: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
        """Training loss (`loss_cls`, grad) and batch accuracy (`acc`); EMA step first when training."""
        logits = self.logits(image, input_ids, attention_mask)
        teacher = None
        if self.distill:
            with torch.no_grad():
                if self.training:
                    self.momentum_update()
                teacher = self._logits(self.visual_encoder_m, self.text_encoder_m, self.cls_head_m, image,
                                       input_ids, attention_mask)
        loss, acc = classify_loss(logits, label, teacher, alpha)
        return {"loss_cls": loss, "acc": acc.detach()}


@torch.no_grad()
def assign_pairs(weights: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The TA pairs of a batch: (image-0 index [B], image-1 index [B], label [B]).

    weights [B,B]: row b's sampling weights over the other images (diagonal 0).
    Per row, with probability 2/3 one j ~ weights[b] and, by a fair coin, (b, j)
    label 0 or (j, b) label 1; else two distinct j1, j2 ~ weights[b] and (j1, j2)
    label 2. Draws: uniforms [B,2], then two picks without replacement per row
    (the first pick is what a single draw would give).
    """
    bs = weights.shape[0]
    if bs < 3:
        raise ValueError(f"text assignment needs at least 3 images per rank (two others per caption), got {bs}")
    device = generator.device if generator is not None else weights.device
    coins = torch.rand(bs, 2, generator=generator, device=device).to(weights.device)
    picks = torch.multinomial(weights.float().to(device), 2, replacement=False,
                              generator=generator).to(weights.device)
    own = torch.arange(bs, device=weights.device)
    single, own_first = coins[:, 0] > 1 / 3, coins[:, 1] > 0.5
    first = torch.where(single & own_first, own, picks[:, 0])
    second = torch.where(single, torch.where(own_first, picks[:, 0], own), picks[:, 1])
    label = torch.where(single, torch.where(own_first, 0, 1), 2)
    return first, second, label


class TextAssignment(_WithMomentum):
    def __init__(self, cfg: dict):
        super().__init__()
        s = ALBEFSettings.from_dict(cfg)
        self.settings = s
        self.visual_encoder = build_vision_encoder(s.vision)
        self.text_encoder = PairFusionEncoder(s.text, s.vision.width)
        # kept from pretraining for the similarities only: the reference computes it without gradient
        self.vision_proj = nn.Linear(s.vision.width, s.embed_dim).requires_grad_(False)
        self.ta_head = nn.Linear(s.text.hidden_size, len(TA_LABELS))

    @torch.no_grad()
    def pair_weights(self, image_cls: torch.Tensor) -> torch.Tensor:
        """ViT [CLS] [B,D] -> sampling weights [B,B]: softmax of feature similarity / 0.07, diagonal 0."""
        feat = F.normalize(self.vision_proj(image_cls).float(), dim=-1)
        return F.softmax(feat @ feat.t() / TA_TEMPERATURE, dim=1).fill_diagonal_(0.0)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """image [B,3,H,W], caption b belongs to image b -> `loss_ta` (grad), `acc`, label frequencies."""
        tokens = self.visual_encoder(image)  # [B,1+N,D]
        first, second, label = assign_pairs(self.pair_weights(tokens[:, 0]), generator)
        text = self.text_encoder.encode(input_ids, attention_mask)
        fused = self.text_encoder.fuse(text, attention_mask, (tokens[first], tokens[second]))
        loss, acc = classify_loss(self.ta_head(fused[:, 0]), label, None, 0.0)
        return {"loss_ta": loss, "acc": acc.detach(), "frac_none": (label == 2).float().mean()}
