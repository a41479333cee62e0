"""ALBEF: align (ITC) before fuse (ITM, MLM), with momentum distillation.

`ALBEF(cfg["model"], global_batch_size)` builds the online encoders, their
frozen fp32 momentum copies and the feature queues, all randomly initialised;
`model.weights.build_albef` also loads the `vision.init` / `text.init` weights
(timm ViT / Hugging Face BERT). A training forward (module in train mode):

1. clamp the temperature (no grad; pretraining only, as the reference, whose
   retrieval model never clamps it);
2. unimodal features; EMA step of the momentum copies; momentum features;
3. ITC against batch + queue, targets distilled from the momentum model;
4. ITM on the positive pairs and on hard negatives drawn from the ITC similarities;
5. MLM on masked text, distilled from the momentum model (not in retrieval mode);
6. enqueue the momentum features (all-gathered across ranks).

The forward returns the loss terms as a dict (`loss_itc`, `loss_itm`, `loss_mlm`,
with their graphs) and detached accuracies; the caller weighs and sums them
(`model.losses.total_loss`; all weights 1.0 is the paper's objective).
In eval mode the same losses are computed, without the EMA step and the enqueue.
The random draws use `generator` when given, in this order: a negative image
for each text, a negative text for each image, then the MLM masking.

Retrieval fine-tuning (`model.retrieval: true`): `idx` (image id per sample)
is required; ITC treats every pair sharing an image id as positive (also in
the queue, via `idx_queue`), ITM negatives never share the image id, no MLM.

Under DeepSpeed: pass `trainable_parameters()` to `deepspeed.initialize`
(the momentum copies are not trained), run it in torch_autocast mode (keeps
the momentum copies and queues fp32), and call `sync_buffers()` once after it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.encoders import build_text_encoder, build_vision_encoder
from model.feature_queue import FeatureQueue
from model.losses import (IGNORE_INDEX, itc_loss, itc_positives, itm_loss, mask_tokens, mean_pairwise_cosine,
                          mlm_loss, sample_negatives)
from model.momentum import MomentumModel, make_momentum_copies
from model.settings import ALBEFSettings

def text_settings_from_tokenizer(tokenizer) -> dict:
    """The ids the model needs from a tokenizer, to merge into `cfg["model"]["text"]`."""
    settings = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "cls_token_id": tokenizer.cls_token_id, "mask_token_id": tokenizer.mask_token_id}
    absent = [name for name, value in settings.items() if value is None]
    if absent:
        raise ValueError(f"tokenizer has no {', '.join(absent)} (ALBEF needs [PAD], [CLS] and [MASK])")
    return settings


def compile_encoders(model: nn.Module) -> list[nn.Module]:
    """`model.compile: true`: torch.compile, in place, the ViT (online and momentum) and every BERT layer.

    `nn.Module.compile` compiles a module's `__call__` and leaves its parameters and their names
    as they are (checkpoints, exports, DeepSpeed and the EMA see the same tensors). The text side is
    compiled layer by layer because `encode` / `fuse` are methods, not `forward`. Compilation
    happens at the first call (minutes for the base model). Returns the compiled modules.
    """
    compiled = []
    for name in ("visual_encoder", "visual_encoder_m"):
        if hasattr(model, name):
            compiled.append(getattr(model, name))
    for name in ("text_encoder", "text_encoder_m"):
        encoder = getattr(model, name, None)
        if encoder is not None:
            compiled.extend(encoder.text_layers)
            compiled.extend(encoder.fusion_layers)
    for module in compiled:
        module.compile()
    return compiled


class ALBEF(MomentumModel):
    def __init__(self, cfg: dict, global_batch_size: int | None = None):
        super().__init__()
        s = ALBEFSettings.from_dict(cfg)
        self.settings = s
        self.visual_encoder = build_vision_encoder(s.vision)
        self.text_encoder = build_text_encoder(s.text, s.vision.width, with_mlm_head=not s.retrieval)
        self.vision_proj = nn.Linear(s.vision.width, s.embed_dim)
        self.text_proj = nn.Linear(s.text.hidden_size, s.embed_dim)
        self.itm_head = nn.Linear(s.text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(s.temp))

        (self.visual_encoder_m, self.vision_proj_m, self.text_encoder_m,
         self.text_proj_m) = make_momentum_copies(
            [self.visual_encoder, self.vision_proj, self.text_encoder, self.text_proj])
        self.queue = FeatureQueue(s.embed_dim, s.queue_size, with_idx=s.retrieval,
                                  global_batch_size=global_batch_size)
        if s.grad_checkpointing:  # the online encoders only: the momentum copies never run backward
            self.visual_encoder.set_grad_checkpointing(True)
            self.text_encoder.set_grad_checkpointing(True)
        if s.compile:
            compile_encoders(self)

    # ------------------------------------------------------------ parameters

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs of the EMA (not the ITM head nor the temperature)."""
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def sync_buffers(self) -> None:
        """Broadcast the queues from rank 0; call once after deepspeed.initialize (no-op in one process)."""
        self.queue.sync_buffers()

    # ------------------------------------------------------------ inference API

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] -> (tokens [B,1+N,Dv], L2-normalised feature [B,E])."""
        tokens = self.visual_encoder(images)
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask [B,L] -> (text-mode token states [B,L,Dt], L2-normalised feature [B,E])."""
        tokens = self.text_encoder.encode(input_ids, attention_mask)
        return tokens, F.normalize(self.text_proj(self._text_summary(tokens, attention_mask)), dim=-1)

    def _text_summary(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The state ITC projects: [CLS] (the reference) or, with `itc_text_pool: mean`, the mean over
        the caption's tokens, which differs between captions even while a random-init [CLS] does not."""
        if self.settings.itc_text_pool == "cls":
            return tokens[:, 0]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   attention_mask: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion layers over text-mode states with image tokens, ITM head on CLS -> [B,2] (1 = match).

        image_index long [B] (optional): `image_tokens` [B_img,N,D] are distinct images and text i is
        paired with image_tokens[image_index[i]]; the cross-attention keys/values are then computed once
        per distinct image (same logits as passing `image_tokens[image_index]`).
        """
        fused = self.text_encoder.fuse(text_tokens, attention_mask, image_tokens, image_index=image_index)
        return self.itm_head(fused[:, 0])

    # ------------------------------------------------------------ losses

    @torch.no_grad()
    def _momentum_features(self, image, input_ids, attention_mask):
        image_tokens_m = self.visual_encoder_m(image)
        image_feat_m = F.normalize(self.vision_proj_m(image_tokens_m[:, 0]), dim=-1)
        text_tokens_m = self.text_encoder_m.encode(input_ids, attention_mask)
        text_feat_m = F.normalize(self.text_proj_m(self._text_summary(text_tokens_m, attention_mask)), dim=-1)
        return image_tokens_m, image_feat_m, text_feat_m

    def itm(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, attention_mask: torch.Tensor,
            neg_image: torch.Tensor, neg_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM loss over bs positives, bs (text, negative image) and bs (negative text, image) pairs.

        neg_image[i]: the image paired with text i; neg_text[i]: the text paired with image i.
        One fusion pass over the 3*bs pairs; the bs distinct images go in once with an index per pair,
        so each cross-attention projects them to keys/values once, not 3 times. Returns (loss, accuracy).
        """
        bs = text_tokens.shape[0]
        texts = torch.cat([text_tokens, text_tokens, text_tokens[neg_text]])
        masks = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
        own = torch.arange(bs, device=neg_image.device)
        image_index = torch.cat([own, neg_image, own])   # pair -> row of image_tokens
        return itm_loss(self.itm_logits(image_tokens, texts, masks, image_index=image_index), bs)

    def mlm(self, masked_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
            image_tokens: torch.Tensor, image_tokens_m: torch.Tensor, alpha: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM distilled from the momentum model, scored only at the chosen positions.

        The chosen positions are listed once (`nonzero`: their number M is data dependent, so this
        is the forward's one device-to-host sync, docs/SPEED.md) and gathered from the
        online states, the momentum states and the labels, in the order boolean-mask indexing gives.
        """
        states = self.text_encoder.fuse(self.text_encoder.encode(masked_ids, attention_mask),
                                        attention_mask, image_tokens)
        positions = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # [M] into the B*L positions
        logits = self.text_encoder.mlm_head(states.flatten(0, 1).index_select(0, positions))  # [M,V]
        with torch.no_grad():
            states_m = self.text_encoder_m.fuse(self.text_encoder_m.encode(masked_ids, attention_mask),
                                                attention_mask, image_tokens_m)
            soft_labels = F.softmax(self.text_encoder_m.mlm_head(
                states_m.flatten(0, 1).index_select(0, positions)).float(), dim=-1)
        return mlm_loss(logits, labels.flatten().index_select(0, positions), soft_labels, alpha)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float, idx: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """image [B,3,H,W], input_ids/attention_mask [B,L], idx [B] (retrieval) -> loss terms and accuracies.

        Keys: `loss_itc`, `loss_itm`, `loss_mlm` (not in retrieval mode), `acc_itc`, `acc_itm`, `acc_mlm`,
        and `cos_image` / `cos_text` (mean pairwise cosine of the batch's features: near 1 = collapsed).
        """
        s = self.settings
        if s.retrieval != (idx is not None):
            raise ValueError("idx (image id per sample) must be given exactly when model.retrieval is true")
        bs = image.shape[0]
        if not s.retrieval:
            with torch.no_grad():
                self.temp.clamp_(s.temp_min, s.temp_max)

        image_tokens, image_feat = self.encode_image(image)
        text_tokens, text_feat = self.encode_text(input_ids, attention_mask)
        if self.training:
            self.momentum_update()
        image_tokens_m, image_feat_m, text_feat_m = self._momentum_features(image, input_ids, attention_mask)

        positives = itc_positives(bs, s.queue_size, image.device, idx,
                                  self.queue.idx_queue if idx is not None else None)
        # clones: backward needs the queues as they are now, and the enqueue below overwrites them
        itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.queue.image_queue.clone(),
                       self.queue.text_queue.clone(), self.temp, alpha, positives)

        in_batch = positives[:, :bs]
        neg_image = sample_negatives(itc.sim_t2i[:, :bs].detach(), in_batch, generator)
        neg_text = sample_negatives(itc.sim_i2t[:, :bs].detach(), in_batch, generator)
        loss_itm, acc_itm = self.itm(image_tokens, text_tokens, attention_mask, neg_image, neg_text)

        out = {"loss_itc": itc.loss, "loss_itm": loss_itm, "acc_itc": itc.accuracy, "acc_itm": acc_itm,
               # spread of the unimodal features (near 1 = collapsed), for the trainer's health check
               "cos_image": mean_pairwise_cosine(image_feat), "cos_text": mean_pairwise_cosine(text_feat)}
        if not s.retrieval:
            masked_ids, labels = mask_tokens(
                input_ids, vocab_size=s.text.vocab_size, pad_token_id=s.text.pad_token_id,
                cls_token_id=s.text.cls_token_id, mask_token_id=s.text.mask_token_id,
                probability=s.mlm.probability, mask_fraction=s.mlm.mask_fraction,
                random_fraction=s.mlm.random_fraction, generator=generator)
            out["loss_mlm"], acc_mlm = self.mlm(masked_ids, labels, attention_mask, image_tokens,
                                                image_tokens_m, alpha)
            out["acc_mlm"] = acc_mlm.detach()

        if self.training:
            self.queue.enqueue(image_feat_m, text_feat_m, idx)
        return out
