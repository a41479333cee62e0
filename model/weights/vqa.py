"""Released-layout weights <-> the VQA model (`model.vqa.ALBEFVQA`).

Two layouts come in, told apart by their keys (never by a command-line flag,
which is how the reference mangles a fine-tuned checkpoint loaded for training):

- a pretraining checkpoint (`ALBEF_4M.pth`, our pretraining export): the text
  encoder is a BertForMaskedLM (`text_encoder.bert.*`, `text_encoder.cls.*`).
  As in the reference (docs/METHOD.md §11), BERT layers become our text and
  fusion layers, AND the fusion layers j = 0.. also initialise decoder layer j
  (cross-attention included), the embeddings also initialise the decoder's
  embeddings, and the MLM head becomes the decoder's LM head; the same for the
  momentum (`_m`) copies. The ITC projections, ITM head, temperature and
  queues are unused (reported). A checkpoint without an MLM head (a retrieval
  fine-tuned one) is refused: the LM head would start untrained.
- a VQA checkpoint (the reference's `vqa.pth`, our VQA export, written by
  `export_vqa_state_dict`): `text_encoder.*` (BertModel names, no `bert.`),
  `text_decoder.bert.*` and `text_decoder.cls.*`; loaded one to one.

Both: position embeddings resized to the configured resolution; no momentum
keys at all -> the momentum copies start as the online weights. Every key
that is not loaded is listed in the `LoadReport` with its reason; any other
missing or unexpected key raises `CheckpointMismatchError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.weights.files import load_engine_state
from model.weights.released import (DECODER_BIAS, HEAD_BIAS, CheckpointMismatchError, LoadReport,
                                    _bert_unused_reason, _fold_tied, _refuse, _same, _tied_aliases,
                                    bert_key_to_text, resize_pos_embed, text_key_to_bert)

if TYPE_CHECKING:
    from model.vqa import ALBEFVQA

_POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
_MOMENTUM_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "text_decoder_m.")
_UNUSED = {  # pretraining parts VQA has no use for: key prefix -> reason
    "vision_proj": "ITC projection: VQA has no contrastive loss",
    "text_proj": "ITC projection: VQA has no contrastive loss",
    "itm_head": "ITM head: VQA has no image-text matching loss",
    "temp": "ITC temperature: VQA has no contrastive loss",
    "image_queue": "ITC feature queue: VQA has no contrastive loss",
    "text_queue": "ITC feature queue: VQA has no contrastive loss",
    "queue_ptr": "ITC feature queue: VQA has no contrastive loss",
    "idx_queue": "image-id queue of retrieval fine-tuning: unused by VQA",
}
_POSITION_IDS = "constant buffer (0..max_position-1), recomputed"


def _unused_reason(key: str) -> str | None:
    head = key.split(".", 1)[0].removesuffix("_m")
    return _UNUSED.get(head)


def _pretraining_targets(rest: str, online: bool, num_text_layers: int) -> list[str]:
    """A BertForMaskedLM key of the text encoder -> our keys (encoder and/or decoder)."""
    enc, dec = ("text_encoder.", "text_decoder.") if online else ("text_encoder_m.", "text_decoder_m.")
    ours = bert_key_to_text(rest, num_text_layers)
    if ours is None:
        return []
    if ours.startswith("text_layers."):
        return [enc + ours]
    if ours.startswith("fusion_layers."):
        return [enc + ours, dec + "layers." + ours.removeprefix("fusion_layers.")]
    if ours.startswith("embeddings."):
        return [enc + ours, dec + ours]
    if ours.startswith("mlm_head."):
        return [dec + "lm_head." + ours.removeprefix("mlm_head.")]
    raise AssertionError(f"unhandled text key {ours}")


def _vqa_targets(key: str, num_text_layers: int) -> list[str] | None:
    """A key of the VQA layout -> [our key], [] for a dropped constant, None when unknown."""
    for enc in ("text_encoder.", "text_encoder_m."):
        if key.startswith(enc):
            ours = bert_key_to_text("bert." + key[len(enc):], num_text_layers)
            return None if ours is None or ours.startswith("mlm_head.") else [enc + ours]
    for dec in ("text_decoder.", "text_decoder_m."):
        if key.startswith(dec):
            ours = bert_key_to_text(key[len(dec):], 0)   # decoder layer j = BERT layer j
            if ours is None:
                return None
            ours = ours.replace("fusion_layers.", "layers.", 1).replace("mlm_head.", "lm_head.", 1)
            return [dec + ours]
    return [key] if key.startswith(("visual_encoder.", "visual_encoder_m.")) else None


def is_vqa_layout(sd: dict) -> bool:
    return any(key.startswith("text_decoder.") for key in sd)


def load_vqa_state_dict(model: "ALBEFVQA", state: dict, source: str = "ALBEF checkpoint") -> LoadReport:
    """Load a pretraining or VQA released-layout state dict (or `{"model": sd}`) into `model`."""
    engine = load_engine_state(model, state, source, "VQA")
    if engine is not None:
        return engine
    sd = state["model"] if isinstance(state.get("model"), dict) else state
    k = model.settings.text.num_text_layers
    vqa_layout = is_vqa_layout(sd)
    if not vqa_layout and not any(key.startswith("text_encoder.cls.") for key in sd):
        raise CheckpointMismatchError(
            f"{source} has no MLM head (text_encoder.cls.*): a retrieval fine-tuned checkpoint? The answer "
            f"decoder's LM head is initialised from the MLM head; start VQA from a pretraining checkpoint")
    layout = ("VQA layout" if vqa_layout
              else "pretraining layout: fusion layers -> answer decoder, MLM head -> LM head")
    report = LoadReport(f"{source} ({layout})")
    ours = model.state_dict()
    aliases = _tied_aliases(model)
    mapped: dict[str, torch.Tensor] = {}
    unexplained, conflicts = [], []          # unexpected keys without a reason; shape or tie conflicts

    for key, value in sd.items():
        if key.endswith("embeddings.position_ids"):
            report.unexpected[key] = _POSITION_IDS
            continue
        if vqa_layout:
            targets = _vqa_targets(key, k)
        elif key.startswith(("text_encoder.", "text_encoder_m.")):
            online = key.startswith("text_encoder.")
            rest = key.split(".", 1)[1]
            rest = rest if rest.startswith(("bert.", "cls.")) else "bert." + rest
            targets = _pretraining_targets(rest, online, k)
            if not targets:
                reason = _bert_unused_reason(rest)
                if reason is not None:
                    report.unexpected[key] = reason
                    continue
                targets = None
        elif key.startswith(("visual_encoder.", "visual_encoder_m.")):
            targets = [key]
        else:
            reason = _unused_reason(key)
            if reason is not None:
                report.unexpected[key] = reason
                continue
            targets = None
        if targets is None or any(t not in ours for t in targets):
            unexplained.append(key)
            continue
        for target in targets:
            if target in mapped:   # tied duplicates: cls.predictions.bias / cls.predictions.decoder.bias
                if not _same(mapped[target], value):
                    conflicts.append(f"{key} differs from the tensor it is tied to")
                continue
            mapped[target] = value

    _fold_tied(mapped, aliases, conflicts)
    for key, value in list(mapped.items()):
        want = ours[key].shape
        if value.shape == want:
            continue
        if key in _POS_EMBED_KEYS:
            mapped[key] = resize_pos_embed(value, model.settings.vision.grid)
            report.resized[key] = f"{tuple(value.shape)} -> {tuple(want)}"
        elif ".cross_attn." in key and key.startswith(("text_decoder.", "text_decoder_m.")):
            s = model.settings
            raise CheckpointMismatchError(
                f"{source}: the fusion layers' cross-attention reads image tokens (model.vision.width="
                f"{s.vision.width}), the answer decoder's reads question states (model.text.hidden_size="
                f"{s.text.hidden_size}); they must be equal for the fusion layers to initialise the decoder")
        else:
            conflicts.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(want)}")

    wanted = [key for key in ours if key not in aliases]
    missing = [key for key in wanted if key not in mapped]
    momentum_keys = [key for key in wanted if key.startswith(_MOMENTUM_PREFIXES)]
    no_momentum = not any(key in mapped for key in momentum_keys)
    if no_momentum:
        for key in momentum_keys:
            report.missing[key] = "checkpoint has no momentum copies: copied from the online weights"
    _refuse(source, [key for key in missing if key not in report.missing], unexplained, conflicts)

    model.load_state_dict(mapped, strict=False)
    if no_momentum:
        model.copy_online_to_momentum()
    report.loaded = sorted(mapped)
    return report


def export_vqa_state_dict(model: "ALBEFVQA") -> dict[str, torch.Tensor]:
    """Our VQA model in the reference's fine-tuned VQA layout (its `vqa.pth`):
    `text_encoder.*` as BertModel (no `bert.`), `text_decoder.bert.*` + `text_decoder.cls.*`."""
    k = model.settings.text.num_text_layers
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        head, _, rest = key.partition(".")
        if head in ("text_encoder", "text_encoder_m"):
            out[f"{head}.{text_key_to_bert(rest, k).removeprefix('bert.')}"] = value
        elif head in ("text_decoder", "text_decoder_m"):
            rest = rest.replace("layers.", "fusion_layers.", 1) if rest.startswith("layers.") else rest
            rest = rest.replace("lm_head.", "mlm_head.", 1) if rest.startswith("lm_head.") else rest
            name = text_key_to_bert(rest, 0)
            out[f"{head}.{name}"] = value
            if name == HEAD_BIAS:
                out[f"{head}.{DECODER_BIAS}"] = value
        else:
            out[key] = value
    positions = torch.arange(model.settings.text.max_position_embeddings).unsqueeze(0)
    for head in ("text_encoder", "text_encoder_m"):
        out[f"{head}.embeddings.position_ids"] = positions
    for head in ("text_decoder", "text_decoder_m"):
        out[f"{head}.bert.embeddings.position_ids"] = positions
    return out


def load_vqa_weights(model: "ALBEFVQA", path: str | Path) -> LoadReport:
    """`--checkpoint` (file, run folder or DeepSpeed checkpoint: `model.weights.files.read_checkpoint`)."""
    from model.weights.files import read_checkpoint
    state, source = read_checkpoint(path)
    return load_vqa_state_dict(model, state, source)
