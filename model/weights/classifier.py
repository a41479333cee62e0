"""Weights of the classification models (`model.classifier`) in and out of the reference's layouts.

Sources a released-layout state dict may come from (`model.weights.files.read_checkpoint`):
- a pretraining checkpoint (ALBEF_4M.pth, our export/albef.pth): `text_encoder.bert.*`,
  MLM head, projections, ITM head, temperature, queues, momentum copies;
- a retrieval checkpoint (`bert.` stripped, no MLM head);
- the reference's SNLI-VE / NLVR2 fine-tuned models (`cls_head`, momentum copies);
- the NLVR2 text-assignment checkpoint (fusion layers already doubled, `ta_head`,
  no momentum copies), or our export of a TA run.

A one-fusion-stack source goes into the NLVR2 pair blocks as the reference's
Pretrain_nlvr.py does: BERT layer k+i fills both blocks 2i and 2i+1 (their
shared key/value receive the same tensor). Every source key that is not used
and every model key that is not filled is listed in the `LoadReport` with its
reason; one without a known reason raises `CheckpointMismatchError` (the
reference loads with `strict=False` and says nothing).

Teacher initialisation when the source has no momentum copies (the TA
checkpoint): `after_load` copies the loaded student into the teacher;
`reference` keeps the teacher as built, i.e. the model's initialisation before
loading, which is what the reference's NLVR.py gets by calling `copy_params()`
before `load_state_dict` (its teacher: BERT layers 0-11 and random elsewhere;
ours: random everywhere, the task models take no `init` weights).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from model.classifier import PairFusionEncoder
from model.weights.files import load_engine_state
from model.weights.released import (POSITION_IDS, CheckpointMismatchError, LoadReport, bert_key_to_text,
                                    resize_pos_embed, text_key_to_bert)

TEACHER_INITS = ("after_load", "reference")
_QUEUES = ("image_queue", "text_queue", "queue_ptr", "idx_queue")
_TEXT = ("text_encoder", "text_encoder_m")
_POS_EMBED = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
_SOURCE_LAYER = re.compile(r"^text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.")
_FUSION = re.compile(r"^fusion_layers\.(\d+)\.(.+)$")
# source modules a task model may leave unused, and why
_UNUSED = {
    "vision_proj": "ITC projection: no contrastive loss in this task",
    "vision_proj_m": "momentum ITC projection: no contrastive loss in this task",
    "text_proj": "ITC projection: no contrastive loss in this task",
    "text_proj_m": "momentum ITC projection: no contrastive loss in this task",
    "temp": "ITC temperature: no contrastive loss in this task",
    "itm_head": "ITM head of pretraining: the task has its own head (the reference drops it too)",
    "ta_head": "text-assignment head of the NLVR2 pre-training step: fine-tuning uses cls_head",
}


def _state_dict_of(state: dict) -> dict[str, torch.Tensor]:
    return state["model"] if isinstance(state.get("model"), dict) else state


def _aliases(model: nn.Module) -> dict[str, str]:
    """state_dict key -> earlier key holding the same Parameter (the pair blocks' shared key/value)."""
    first: dict[int, str] = {}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, nn.Parameter):
            continue
        if id(value) in first:
            out[key] = first[id(value)]
        else:
            first[id(value)] = key
    return out


def _source_depth(sd: dict) -> int:
    layers = [int(m.group(1)) for m in map(_SOURCE_LAYER.match, sd) if m]
    return max(layers) + 1 if layers else 0


def _text_targets(key: str, k: int, double: bool) -> tuple[list[str], str | None]:
    """A source text-encoder key (online or momentum) -> (our keys, reason when it has none)."""
    prefix, rest = key.split(".", 1)
    if not rest.startswith(("bert.", "cls.")):
        rest = "bert." + rest           # fine-tuned layouts strip `bert.`
    if rest == POSITION_IDS:
        return [], "constant buffer (0..max_position-1), recomputed"
    if rest.startswith("cls."):
        return [], "MLM head of pretraining: unused by a classifier (the reference drops it too)"
    if rest.startswith("bert.pooler."):
        return [], "BERT pooler: not part of ALBEF"
    ours = bert_key_to_text(rest, k)
    if ours is None:
        return [], None
    m = _FUSION.match(ours)
    if double and m:                    # fusion layer i -> pair blocks 2i and 2i+1
        j, part = int(m.group(1)), m.group(2)
        return [f"{prefix}.fusion_layers.{2 * j + b}.{part}" for b in (0, 1)], None
    return [f"{prefix}.{ours}"], None


def load_classifier_state_dict(model: nn.Module, state: dict, source: str,
                               teacher_init: str = "after_load") -> LoadReport:
    """Load a released-layout checkpoint dict into an `ALBEFClassifier` or `TextAssignment`."""
    if teacher_init not in TEACHER_INITS:
        raise ValueError(f"teacher_init={teacher_init!r}: one of {', '.join(TEACHER_INITS)}")
    engine = load_engine_state(model, state, source, type(model).__name__)
    if engine is not None:
        return engine
    sd = _state_dict_of(state)
    s = model.settings.text
    k, f = s.num_text_layers, s.num_fusion_layers
    pair_model = isinstance(model.text_encoder, PairFusionEncoder)
    depth = _source_depth(sd)
    if depth == k + 2 * f and not pair_model:
        raise CheckpointMismatchError(f"{source} has its fusion layers doubled for two images (an NLVR2 or "
                                      f"text-assignment checkpoint): it cannot initialise a one-image model")
    if depth not in (k + f, k + 2 * f):
        raise CheckpointMismatchError(f"{source}: the text encoder has {depth} layers; this model takes "
                                      f"{k + f} (ALBEF, {k} text + {f} fusion) or, for two images, {k + 2 * f}")
    double = pair_model and depth == k + f

    ours = model.state_dict()
    aliases = _aliases(model)
    has_momentum = any(key.endswith("_m") for key, _ in model.named_children())
    report = LoadReport(source)
    mapped: dict[str, torch.Tensor] = {}
    unexplained, conflicts = [], []
    for key, value in sd.items():
        top = key.split(".", 1)[0]
        if top in _TEXT:
            targets, reason = _text_targets(key, k, double)
        elif key in _QUEUES:
            targets, reason = [], "ITC feature queue: no contrastive loss in this task"
        else:
            targets, reason = [key], None
        if targets and top.endswith("_m") and not has_momentum:
            targets, reason = [], "momentum copy: this model has no teacher (text assignment or distill: false)"
        if targets and not all(t in ours for t in targets):
            targets, reason = [], _UNUSED.get(top)
        if not targets:
            if reason is None:
                unexplained.append(key)
            else:
                report.unexpected[key] = reason
            continue
        for target in targets:
            mapped[target] = value

    for alias, first in aliases.items():   # shared Parameters: one value, whichever name gave it
        if alias in mapped and first in mapped and not torch.equal(mapped[alias], mapped[first]):
            conflicts.append(f"{alias} differs from {first}, which is the same (shared) parameter here")
        elif alias in mapped:
            mapped[first] = mapped[alias]
        elif first in mapped:
            mapped[alias] = mapped[first]

    for key, value in mapped.items():
        if value.shape == ours[key].shape:
            continue
        if key in _POS_EMBED:
            mapped[key] = resize_pos_embed(value, model.settings.vision.grid)
            report.resized[key] = f"{tuple(value.shape)} -> {tuple(ours[key].shape)}"
        else:
            conflicts.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(ours[key].shape)}")

    source_momentum = any(key.split(".", 1)[0].endswith("_m") for key in sd)
    teacher_reason = ("checkpoint has no momentum copies: the teacher starts as a copy of the loaded student"
                      if teacher_init == "after_load" else
                      "checkpoint has no momentum copies: the teacher keeps the model's initialisation "
                      "(teacher_init: reference, the reference's copy-before-load)")
    missing_unexplained = []
    for key in ours:
        if key in mapped:
            continue
        top = key.split(".", 1)[0]
        if top.endswith("_m") and not source_momentum:
            report.missing[key] = teacher_reason
        elif top == "cls_head":
            report.missing[key] = "new classification head: random init (as the reference)"
        elif top == "cls_head_m":
            report.missing[key] = "momentum head: starts as a copy of the new head (as the reference)"
        elif top == "ta_head":
            report.missing[key] = "new text-assignment head: random init (as the reference)"
        else:
            missing_unexplained.append(key)

    if missing_unexplained or unexplained or conflicts:
        parts = [f"{source} does not fit the {type(model).__name__}:"]
        for title, keys in (("missing (no known reason)", missing_unexplained),
                            ("unexpected (no known reason)", unexplained), ("conflicts", conflicts)):
            if keys:
                shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
                parts.append(f"  {title}: {len(keys)}: {shown}")
        raise CheckpointMismatchError("\n".join(parts))

    model.load_state_dict(mapped, strict=False)
    if not source_momentum and teacher_init == "after_load":
        model.copy_online_to_momentum()
    report.loaded = sorted(mapped)
    return report


def export_classifier_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model in the reference's layout for its task: text keys as the fine-tuned BertModel
    (`text_encoder.encoder.layer.N...`, no `bert.`), everything else under its own name."""
    k = model.settings.text.num_text_layers
    out = {}
    for key, value in model.state_dict().items():
        top, rest = key.split(".", 1)
        out[f"{top}.{text_key_to_bert(rest, k).removeprefix('bert.')}" if top in _TEXT else key] = value
    return out
