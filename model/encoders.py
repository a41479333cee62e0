"""The three encoders of ALBEF and the MLM head.

- Image: timm's VisionTransformer, returning every token after the final norm.
- Text + fusion: our own BERT-compatible layers on
  `torch.nn.functional.scaled_dot_product_attention`. Parameter shapes and the
  arithmetic follow BERT (post-LayerNorm, exact GELU, learned absolute
  positions, token type 0), so Hugging Face BERT weights load layer by layer
  (`model.weights.released`) without using any of transformers' layer classes.
  Layers 0..k-1 are text layers (self-attention, FFN); layers k.. are fusion
  layers (self-attention, cross-attention to image tokens, FFN).
  `set_grad_checkpointing()` (timm's name, `model.grad_checkpointing`) recomputes
  each layer in backward (`torch.utils.checkpoint`, non-reentrant) when training.
- MLM head: BERT's prediction head, decoder tied to the word embeddings.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.settings import TextSettings, VisionSettings


class VisionEncoder(VisionTransformer):
    """timm ViT without classifier; forward gives all tokens [B, 1+N, D] (CLS at 0).

    A subclass rather than a wrapper so that parameter names are exactly the
    released `visual_encoder.*` names and DeepSpeed ZeRO-3 hooks see the call.
    """

    def __init__(self, s: VisionSettings):
        super().__init__(img_size=s.image_res, patch_size=s.patch_size, embed_dim=s.width,
                         depth=s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio,
                         qkv_bias=s.qkv_bias, num_classes=0, global_pool="",
                         norm_layer=partial(nn.LayerNorm, eps=s.layer_norm_eps),
                         drop_path_rate=s.drop_path)
        self.checkpoint_blocks = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.checkpoint_blocks = enable

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,1+N,D]
        # timm checkpoints its blocks whenever `grad_checkpointing` is set; only a training backward
        # gains from it (as on the text side, eval-mode Grad-CAM needs the forward's own attention)
        self.grad_checkpointing = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        return self.forward_features(images)


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type-0 embeddings, LayerNorm, dropout."""

    def __init__(self, s: TextSettings):
        super().__init__()
        self.word_embeddings = nn.Embedding(s.vocab_size, s.hidden_size, padding_idx=s.pad_token_id)
        self.position_embeddings = nn.Embedding(s.max_position_embeddings, s.hidden_size)
        self.token_type_embeddings = nn.Embedding(s.type_vocab_size, s.hidden_size)
        self.norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout)
        self.max_positions = s.max_position_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B,L] -> [B,L,H]
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"text of {length} tokens exceeds model.text.max_position_embeddings="
                             f"{self.max_positions}")
        positions = torch.arange(length, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(torch.zeros_like(input_ids)))
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """BERT attention block: multi-head attention, output dense, dropout, residual, post-LayerNorm.

    Self-attention when `context` is the input itself; cross-attention when it
    is the image tokens (key/value input width `kv_width`).
    """

    def __init__(self, s: TextSettings, kv_width: int):
        super().__init__()
        self.num_heads = s.num_heads
        self.query = nn.Linear(s.hidden_size, s.hidden_size)
        self.key = nn.Linear(kv_width, s.hidden_size)
        self.value = nn.Linear(kv_width, s.hidden_size)
        self.dense = nn.Linear(s.hidden_size, s.hidden_size)
        self.norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout)
        self.attention_dropout = s.attention_dropout
        self.keep_attention = False   # True: explicit softmax, probabilities kept in `attention_probs`
        self.attention_probs: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B,S,H] -> [B,heads,S,H/heads]
        b, n, h = x.shape
        return x.view(b, n, self.num_heads, h // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
                causal: bool = False, context_index: torch.Tensor | None = None) -> torch.Tensor:
        # x [B,L,H]; context [B,S,W]; context_mask bool [B,1,1,S] (True = attend) or None (all);
        # causal: position i attends to context positions <= i only (decoder self-attention);
        # context_index long [B]: context is [C,S,W] (C distinct contexts, e.g. images) and row i of x
        # attends to context[context_index[i]]: keys/values are projected once per distinct context
        b, n, h = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        if context_index is not None:
            k, v = k.index_select(0, context_index), v.index_select(0, context_index)
        mask = context_mask
        if causal:
            lower = torch.ones(n, context.shape[1], dtype=torch.bool, device=x.device).tril()
            mask = lower if mask is None else mask & lower
        dropout_p = self.attention_dropout if self.training else 0.0
        if self.keep_attention:
            out = self._explicit(q, k, v, mask, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(b, n, h)
        return self.norm(x + self.dropout(self.dense(out)))

    def _explicit(self, q, k, v, mask, dropout_p: float) -> torch.Tensor:
        """Attention with the softmax written out, keeping its probabilities [B,heads,L,S] and their gradient.

        Used only when `keep_attention` is set (Grad-CAM needs the probabilities and
        d(score)/d(probabilities), which SDPA does not expose); same result as SDPA.
        """
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if probs.requires_grad:
            probs.retain_grad()
        self.attention_probs = probs
        return F.dropout(probs, dropout_p, self.training) @ v


class FeedForward(nn.Module):
    """BERT FFN: dense, GELU, dense, dropout, residual, post-LayerNorm."""

    def __init__(self, s: TextSettings):
        super().__init__()
        self.dense_in = nn.Linear(s.hidden_size, s.intermediate_size)
        self.dense_out = nn.Linear(s.intermediate_size, s.hidden_size)
        self.norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,L,H] -> [B,L,H]
        return self.norm(x + self.dropout(self.dense_out(F.gelu(self.dense_in(x)))))


class TextLayer(nn.Module):
    """Text-mode BERT layer: self-attention, FFN."""

    def __init__(self, s: TextSettings):
        super().__init__()
        self.self_attn = Attention(s, s.hidden_size)
        self.ffn = FeedForward(s)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn(x, x, mask))


class FusionLayer(nn.Module):
    """Fusion BERT layer: self-attention over text, cross-attention to image tokens, FFN."""

    def __init__(self, s: TextSettings, vision_width: int):
        super().__init__()
        self.self_attn = Attention(s, s.hidden_size)
        self.cross_attn = Attention(s, vision_width)
        self.ffn = FeedForward(s)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        # every image token is attended (the reference's image attention mask is all ones);
        # image_index [B]: `image` holds distinct images, row i of x pairs with image[image_index[i]]
        return self.ffn(self.cross_attn(self.self_attn(x, x, mask), image, None, context_index=image_index))


class MLMHead(nn.Module):
    """BERT prediction head: dense, GELU, LayerNorm, decoder (weight tied to word embeddings) + bias."""

    def __init__(self, s: TextSettings):
        super().__init__()
        self.dense = nn.Linear(s.hidden_size, s.hidden_size)
        self.norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.decoder = nn.Linear(s.hidden_size, s.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V]
        return self.decoder(self.norm(F.gelu(self.dense(x))))


def _attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,L] 0/1 -> bool [B,1,1,L] for SDPA (True = may be attended)."""
    return attention_mask[:, None, None, :].bool()


class TextFusionEncoder(nn.Module):
    """BERT with its layers split into a text encoder and a fusion encoder, plus the MLM head.

    `encode` is the text mode (unimodal features for ITC and retrieval);
    `fuse` runs the fusion layers on text states with image tokens; `mlm_head`
    is absent in retrieval models (as in the reference's fine-tuning model).
    """

    def __init__(self, s: TextSettings, vision_width: int, with_mlm_head: bool):
        super().__init__()
        self.embeddings = BertEmbeddings(s)
        self.text_layers = nn.ModuleList(TextLayer(s) for _ in range(s.num_text_layers))
        self.fusion_layers = nn.ModuleList(FusionLayer(s, vision_width) for _ in range(s.num_fusion_layers))
        self.mlm_head = MLMHead(s) if with_mlm_head else None
        self.grad_checkpointing = False
        self.apply(partial(_bert_init, std=s.init_std))
        if self.mlm_head is not None:
            # one shared Parameter (tied as in BERT; ZeRO-3 gathers it for either module)
            self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _layer(self, layer: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """One layer, its activations recomputed in backward when checkpointing (training only: Grad-CAM
        in eval mode reads the attention probabilities of the forward it ran)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *inputs, use_reentrant=False)
        return layer(*inputs)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # [B,L] ids, [B,L] mask -> [B,L,H] text-mode states
        mask = _attention_mask(attention_mask)
        x = self.embeddings(input_ids)
        for layer in self.text_layers:
            x = self._layer(layer, x, mask)
        return x

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
             image_states: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        # [B,L,H] text states, [B,L] mask, [B,N,W] image tokens -> [B,L,H] multimodal states.
        # image_index long [B] (optional): image_states is [B_img,N,W], the distinct images, and text i
        # pairs with image_states[image_index[i]]; each cross-attention then projects the image tokens
        # to keys/values once per distinct image and gathers them per pair (same result as
        # `fuse(text_states, attention_mask, image_states[image_index])`, less work when images repeat)
        mask = _attention_mask(attention_mask)
        x = text_states
        for layer in self.fusion_layers:
            if image_index is None:
                x = self._layer(layer, x, mask, image_states)
            else:
                x = self._layer(layer, x, mask, image_states, image_index)
        return x


@torch.no_grad()
def _bert_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorm, zero PAD row."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


VISION_ENCODERS = {"vit": VisionEncoder}
TEXT_ENCODERS = {"bert": TextFusionEncoder}


def build_vision_encoder(s: VisionSettings) -> VisionEncoder:
    if s.encoder not in VISION_ENCODERS:
        raise ValueError(f"model.vision.encoder={s.encoder!r} is unknown; known: {', '.join(VISION_ENCODERS)}")
    return VISION_ENCODERS[s.encoder](s)


def build_text_encoder(s: TextSettings, vision_width: int, with_mlm_head: bool) -> TextFusionEncoder:
    if s.encoder not in TEXT_ENCODERS:
        raise ValueError(f"model.text.encoder={s.encoder!r} is unknown; known: {', '.join(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[s.encoder](s, vision_width, with_mlm_head)
