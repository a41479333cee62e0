"""Weights in other layouts: released ALBEF checkpoints, Hugging Face BERT, timm/DeiT ViT.

Every loader returns a `LoadReport`: what was loaded, which keys were missing
or unexpected and why, what was resized. A missing or unexpected key that has
no known reason (a different architecture, a typo'd layout) raises
`CheckpointMismatchError` listing them, instead of a silently half-loaded model.

Text keys. Our text side (`model.encoders.TextFusionEncoder`) is BERT with
renamed parts; the released ALBEF `text_encoder` is a BertForMaskedLM
(`bert.embeddings`, `bert.encoder.layer.N`, `cls.predictions`), fine-tuned
ALBEF checkpoints drop the `bert.` prefix and the MLM head. Layer N of BERT is
our `text_layers.N` for N < num_text_layers, else `fusion_layers.(N - k)`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model.settings import TextSettings, VisionSettings

if TYPE_CHECKING:
    from model.albef import ALBEF
    from model.encoders import TextFusionEncoder, VisionEncoder


class CheckpointMismatchError(ValueError):
    """Keys that are missing or unexpected for no known reason, or shapes that cannot be reconciled."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)      # our key -> why it was not in the source
    unexpected: dict[str, str] = field(default_factory=dict)   # source key -> why it was not used
    resized: dict[str, str] = field(default_factory=dict)      # our key -> old and new shape

    def __str__(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for title, entries in (("missing", self.missing), ("unexpected", self.unexpected),
                               ("resized", self.resized)):
            by_reason: dict[str, list[str]] = {}
            for key, reason in entries.items():
                by_reason.setdefault(reason, []).append(key)
            for reason, keys in by_reason.items():
                shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} keys)" if len(keys) > 3 else "")
                lines.append(f"  {title}: {shown}: {reason}")
        return "\n".join(lines)


def _refuse(source: str, missing: list[str], unexpected: list[str], conflicts: list[str]) -> None:
    if not (missing or unexpected or conflicts):
        return
    parts = [f"{source} does not fit the model:"]
    for title, keys in (("missing (no known reason)", missing), ("unexpected (no known reason)", unexpected),
                        ("shape mismatch or conflict", conflicts)):
        if keys:
            parts.append(f"  {title}: {len(keys)}: " + ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
    raise CheckpointMismatchError("\n".join(parts))


# ---------------------------------------------------------------- BERT key names

# ours inside a text/fusion layer  <->  BERT inside `encoder.layer.N`
_LAYER_PARTS = (
    ("self_attn.query", "attention.self.query"),
    ("self_attn.key", "attention.self.key"),
    ("self_attn.value", "attention.self.value"),
    ("self_attn.dense", "attention.output.dense"),
    ("self_attn.norm", "attention.output.LayerNorm"),
    ("cross_attn.query", "crossattention.self.query"),
    ("cross_attn.key", "crossattention.self.key"),
    ("cross_attn.value", "crossattention.self.value"),
    ("cross_attn.dense", "crossattention.output.dense"),
    ("cross_attn.norm", "crossattention.output.LayerNorm"),
    ("ffn.dense_in", "intermediate.dense"),
    ("ffn.dense_out", "output.dense"),
    ("ffn.norm", "output.LayerNorm"),
)
# ours (relative to the text encoder)  <->  BertForMaskedLM
_OTHER_PARTS = (
    ("embeddings.word_embeddings", "bert.embeddings.word_embeddings"),
    ("embeddings.position_embeddings", "bert.embeddings.position_embeddings"),
    ("embeddings.token_type_embeddings", "bert.embeddings.token_type_embeddings"),
    ("embeddings.norm", "bert.embeddings.LayerNorm"),
    ("mlm_head.dense", "cls.predictions.transform.dense"),
    ("mlm_head.norm", "cls.predictions.transform.LayerNorm"),
)
_OURS_LAYER = re.compile(r"^(text_layers|fusion_layers)\.(\d+)\.(.+)\.(weight|bias)$")
_BERT_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_SPLIT = re.compile(r"^(.+)\.(weight|bias)$")
POSITION_IDS = "bert.embeddings.position_ids"
DECODER_WEIGHT = "cls.predictions.decoder.weight"   # tied to the word embeddings
DECODER_BIAS = "cls.predictions.decoder.bias"       # the same tensor as cls.predictions.bias
HEAD_BIAS = "cls.predictions.bias"


def text_key_to_bert(key: str, num_text_layers: int) -> str:
    """Our text-encoder key -> BertForMaskedLM key (with `bert.`)."""
    m = _OURS_LAYER.match(key)
    if m:
        stack, i, part, kind = m.groups()
        index = int(i) + (num_text_layers if stack == "fusion_layers" else 0)
        for ours, bert in _LAYER_PARTS:
            if part == ours:
                return f"bert.encoder.layer.{index}.{bert}.{kind}"
    if key == "mlm_head.decoder.weight":
        return DECODER_WEIGHT
    if key == "mlm_head.decoder.bias":
        return HEAD_BIAS
    m = _SPLIT.match(key)
    if m:
        for ours, bert in _OTHER_PARTS:
            if m.group(1) == ours:
                return f"{bert}.{m.group(2)}"
    raise KeyError(f"no BERT name for text-encoder key {key!r}")


def bert_key_to_text(key: str, num_text_layers: int) -> str | None:
    """BertForMaskedLM key (with `bert.`) -> our text-encoder key, or None if we have no such tensor."""
    m = _BERT_LAYER.match(key)
    if m:
        i, part, kind = m.groups()
        index = int(i)
        for ours, bert in _LAYER_PARTS:
            if part == bert:
                if index < num_text_layers:
                    return None if ours.startswith("cross_attn") else f"text_layers.{index}.{ours}.{kind}"
                return f"fusion_layers.{index - num_text_layers}.{ours}.{kind}"
        return None
    if key == DECODER_WEIGHT:
        return "mlm_head.decoder.weight"
    if key in (HEAD_BIAS, DECODER_BIAS):
        return "mlm_head.decoder.bias"
    m = _SPLIT.match(key)
    if m:
        for ours, bert in _OTHER_PARTS:
            if m.group(1) == bert:
                return f"{ours}.{m.group(2)}"
    return None


def _bert_unused_reason(key: str) -> str | None:
    """Why a BERT tensor that maps to nothing of ours may be dropped (None: no known reason)."""
    if key.startswith("bert.pooler."):
        return "ALBEF has no pooler"
    if key.startswith("cls.seq_relationship."):
        return "next-sentence-prediction head is not part of ALBEF"
    return None


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """state_dict keys that are the same Parameter as an earlier key: alias -> first key."""
    first: dict[int, str] = {}
    aliases = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            if id(value) in first:
                aliases[key] = first[id(value)]
            else:
                first[id(value)] = key
    return aliases


def _fold_tied(mapped: dict[str, torch.Tensor], aliases: dict[str, str], conflicts: list[str]) -> None:
    """Keep one value per shared Parameter (under its first name); differing copies are conflicts."""
    for alias, first in aliases.items():
        if alias in mapped and first in mapped and not _same(mapped[alias], mapped[first]):
            conflicts.append(f"{alias} differs from {first}, to which it is tied")
        elif alias in mapped:
            mapped.setdefault(first, mapped[alias])
        mapped.pop(alias, None)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.device.type == "meta" or torch.equal(a, b))


# ---------------------------------------------------------------- position embedding

def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[1, P + g*g, D] -> [1, P + new_grid^2, D]: grid resized bicubically, prefix (CLS) tokens kept."""
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise ValueError(f"position embedding with {grid_tokens.shape[1]} patch tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# ---------------------------------------------------------------- released ALBEF layout

_QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_m.")
_MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
_POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")


def _text_prefix(key: str) -> str | None:
    return next((p for p in _TEXT_PREFIXES if key.startswith(p)), None)


def export_albef_state_dict(model: "ALBEF") -> dict[str, torch.Tensor]:
    """Our state dict in the released layout (docs/METHOD.md §7): the `model` entry of ALBEF_4M.pth.

    Pretraining models use the BertForMaskedLM names (`text_encoder.bert.*`,
    `text_encoder.cls.*`); retrieval models the fine-tuned names (no `bert.`,
    no MLM head), as the reference's checkpoints do.
    """
    k = model.settings.text.num_text_layers
    strip_bert = model.settings.retrieval
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix = _text_prefix(key)
        if prefix is not None:
            name = text_key_to_bert(key[len(prefix):], k)
            if strip_bert:
                name = name.removeprefix("bert.")
            out[prefix + name] = value
            if name == HEAD_BIAS:
                out[prefix + DECODER_BIAS] = value
        elif key.startswith("queue."):
            out[key[len("queue."):]] = value
        else:
            out[key] = value
    position_ids = torch.arange(model.settings.text.max_position_embeddings,
                                device=model.temp.device).unsqueeze(0)
    for prefix in _TEXT_PREFIXES:
        out[prefix + (POSITION_IDS.removeprefix("bert.") if strip_bert else POSITION_IDS)] = position_ids
    return out


def _albef_key_to_ours(key: str, num_text_layers: int) -> tuple[str | None, str | None]:
    """Released key -> (our key or None, reason it may be dropped or None)."""
    if key in _QUEUE_KEYS:
        return "queue." + key, None
    prefix = _text_prefix(key)
    if prefix is None:
        return key, None
    rest = key[len(prefix):]
    if not rest.startswith(("bert.", "cls.")):
        rest = "bert." + rest  # fine-tuned layout: `bert.` stripped
    if rest == POSITION_IDS:
        return None, "constant buffer (0..max_position-1), recomputed"
    ours = bert_key_to_text(rest, num_text_layers)
    if ours is None:
        return None, _bert_unused_reason(rest)
    return prefix + ours, None


def _read_checkpoint_dict(state: dict) -> dict[str, torch.Tensor]:
    if "model" in state and isinstance(state["model"], dict):
        return state["model"]
    return state


def load_albef_state_dict(model: "ALBEF", state: dict) -> LoadReport:
    """Load a released-layout state dict (or a whole checkpoint dict with `model`) into `model`.

    Expected differences, loaded anyway and reported: no `idx_queue` in a
    pretraining checkpoint (starts empty); `idx_queue` in a checkpoint for a
    pretraining model (unused); an MLM head for a retrieval model (unused); no
    queues or a queue of another size (fresh queues); no momentum copies at all
    (copied from the online weights); a position embedding for another image
    resolution (resized bicubically). Anything else missing or unexpected raises.
    """
    source = "ALBEF checkpoint"
    sd = _read_checkpoint_dict(state)
    k = model.settings.text.num_text_layers
    ours = model.state_dict()
    aliases = _tied_aliases(model)
    report = LoadReport(source)
    mapped: dict[str, torch.Tensor] = {}
    unexplained_unexpected, conflicts = [], []

    for key, value in sd.items():
        target, reason = _albef_key_to_ours(key, k)
        if target is None:
            if reason is None:
                unexplained_unexpected.append(key)
            else:
                report.unexpected[key] = reason
            continue
        if target not in ours:
            if target == "queue.idx_queue":
                report.unexpected[key] = "image-id queue of retrieval fine-tuning, unused in pretraining"
            elif ".mlm_head." in target:
                report.unexpected[key] = "retrieval models have no MLM head (as the reference's)"
            else:
                unexplained_unexpected.append(key)
            continue
        if target in mapped:  # tied duplicates: decoder.bias / predictions.bias
            if not _same(mapped[target], value):
                conflicts.append(f"{key} differs from the tensor it is tied to")
            continue
        mapped[target] = value

    _fold_tied(mapped, aliases, conflicts)

    # shapes
    queue_keys = [key for key in ours if key.startswith("queue.")]
    for key in list(mapped):
        if key not in mapped:  # dropped with the other queue buffers
            continue
        have, want = mapped[key].shape, ours[key].shape
        if have == want:
            continue
        if key in _POS_EMBED_KEYS:
            mapped[key] = resize_pos_embed(mapped[key], model.settings.vision.grid)
            report.resized[key] = f"{tuple(have)} -> {tuple(want)}"
        elif key in queue_keys:
            for q in queue_keys:
                if q in mapped:
                    report.unexpected[q.removeprefix("queue.")] = (
                        f"queue of another size ({tuple(have)} vs model {tuple(want)}): fresh queues kept")
                    mapped.pop(q)
        else:
            conflicts.append(f"{key}: checkpoint {tuple(have)}, model {tuple(want)}")

    # missing
    wanted = [key for key in ours if key not in aliases]
    missing = [key for key in wanted if key not in mapped]
    momentum_keys = [key for key in wanted if key.startswith(_MOMENTUM_PREFIXES)]
    no_momentum = bool(momentum_keys) and not any(key in mapped for key in momentum_keys)
    unexplained_missing = []
    for key in missing:
        if key == "queue.idx_queue" and "queue.image_queue" in mapped:
            report.missing[key] = "pretraining checkpoint has no image-id queue: starts empty (-100)"
        elif key in queue_keys and not any(q in mapped for q in queue_keys):
            report.missing[key] = "checkpoint has no queues (or another queue size): fresh random queues"
        elif no_momentum and key.startswith(_MOMENTUM_PREFIXES):
            report.missing[key] = "checkpoint has no momentum copies: copied from the online weights"
        else:
            unexplained_missing.append(key)
    _refuse(source, unexplained_missing, unexplained_unexpected, conflicts)

    model.load_state_dict(mapped, strict=False)
    if no_momentum:
        model.copy_online_to_momentum()
    report.loaded = sorted(mapped)
    return report


# ---------------------------------------------------------------- Hugging Face BERT

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# our TextSettings field  <->  Hugging Face BertConfig field
_BERT_CONFIG_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("num_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("vocab_size", "vocab_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("type_vocab_size", "type_vocab_size"),
)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state.get(wrapper), dict):
            return state[wrapper]
    return state


def _bert_files(name_or_path: str) -> tuple[Path, Path]:
    """config.json and weights of a local BERT directory, or of a hub name (through the HF cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.text.init={name_or_path!r}: the directory needs config.json and "
                                    f"one of {', '.join(_WEIGHT_FILES)}")
        return path / "config.json", weights
    if path.suffix or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model.text.init={name_or_path!r}: no such directory")
    from huggingface_hub import hf_hub_download
    try:
        config = Path(hf_hub_download(name_or_path, "config.json"))
        for filename in _WEIGHT_FILES:
            try:
                return config, Path(hf_hub_download(name_or_path, filename))
            except Exception:
                continue
        raise FileNotFoundError(f"none of {', '.join(_WEIGHT_FILES)} in the repository")
    except Exception as exc:
        raise FileNotFoundError(f"model.text.init={name_or_path!r}: not a local directory, and the Hugging "
                                f"Face hub or its cache could not provide it ({exc})") from exc


def _check_bert_config(config: dict, s: TextSettings, source: str) -> None:
    for ours, theirs in _BERT_CONFIG_FIELDS:
        if config.get(theirs) != getattr(s, ours):
            raise ValueError(f"model.text.{ours}={getattr(s, ours)} but {source} has {theirs}={config.get(theirs)}")
    if config.get("num_hidden_layers") != s.num_layers:
        raise ValueError(f"model.text.num_text_layers + num_fusion_layers = {s.num_layers} but {source} has "
                         f"num_hidden_layers={config.get('num_hidden_layers')}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source} uses hidden_act={config['hidden_act']!r}; our BERT layers use exact GELU")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source} uses position_embedding_type={config['position_embedding_type']!r}; "
                         "our BERT layers use absolute positions")


def _normalise_bert_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertModel or BertForMaskedLM/BertForPreTraining keys -> BertForMaskedLM names; old gamma/beta names."""
    has_prefix = any(key.startswith("bert.") for key in sd)
    out = {}
    for key, value in sd.items():
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if not has_prefix and not key.startswith("cls."):
            key = "bert." + key
        out[key] = value
    return out


def load_hf_bert(text_encoder: "TextFusionEncoder", s: TextSettings, name_or_path: str) -> LoadReport:
    """BERT weights layer by layer: layers 0..k-1 -> text layers, k.. -> fusion layers.

    Cross-attention keeps its fresh initialisation (BERT has none), as in
    ALBEF. The MLM head is loaded when the checkpoint has one.
    """
    config_path, weights_path = _bert_files(name_or_path)
    source = f"BERT checkpoint {name_or_path}"
    _check_bert_config(json.loads(config_path.read_text()), s, source)
    sd = _normalise_bert_keys(_read_weights(weights_path))
    ours = text_encoder.state_dict()
    aliases = _tied_aliases(text_encoder)
    report = LoadReport(source)
    mapped: dict[str, torch.Tensor] = {}
    unexplained_unexpected, conflicts = [], []
    for key, value in sd.items():
        if key == POSITION_IDS:
            report.unexpected[key] = "constant buffer (0..max_position-1), recomputed"
            continue
        target = bert_key_to_text(key, s.num_text_layers)
        if target is None:
            reason = _bert_unused_reason(key)
            if reason is None:
                unexplained_unexpected.append(key)
            else:
                report.unexpected[key] = reason
            continue
        if target not in ours:
            if target.startswith("mlm_head."):
                report.unexpected[key] = "retrieval models have no MLM head"
            else:
                unexplained_unexpected.append(key)
            continue
        if target in mapped and not _same(mapped[target], value):
            conflicts.append(f"{key} differs from the tensor it is tied to")
        mapped[target] = value
    _fold_tied(mapped, aliases, conflicts)
    for key, value in mapped.items():
        if value.shape != ours[key].shape:
            conflicts.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(ours[key].shape)}")
    has_head = any(key.startswith("mlm_head.") for key in mapped)
    unexplained_missing = []
    for key in ours:
        if key in mapped or key in aliases:
            continue
        if ".cross_attn." in key:
            report.missing[key] = "cross-attention is new in ALBEF: fresh initialisation"
        elif key.startswith("mlm_head.") and not has_head:
            report.missing[key] = "checkpoint has no MLM head (a BertModel save): head keeps its random init"
        else:
            unexplained_missing.append(key)
    _refuse(source, unexplained_missing, unexplained_unexpected, conflicts)
    text_encoder.load_state_dict(mapped, strict=False)
    report.loaded = sorted(mapped)
    return report


# ---------------------------------------------------------------- timm / DeiT ViT

def _vit_weights(name_or_file: str) -> dict[str, torch.Tensor]:
    path = Path(name_or_file)
    if path.is_file():
        return _read_weights(path)
    import timm
    if not timm.is_model(name_or_file):
        raise ValueError(f"model.vision.init={name_or_file!r} is neither a file nor a timm model name")
    try:
        return timm.create_model(name_or_file, pretrained=True).state_dict()
    except Exception as exc:
        raise FileNotFoundError(f"model.vision.init={name_or_file!r}: timm could not provide pretrained "
                                f"weights (offline, and not in the cache?): {exc}") from exc


def load_vit_weights(visual_encoder: "VisionEncoder", s: VisionSettings, name_or_file: str) -> LoadReport:
    """DeiT/timm ViT weights (by timm name or local file) with the position embedding resized
    bicubically to the configured resolution, CLS position kept."""
    source = f"ViT weights {name_or_file}"
    sd = dict(_vit_weights(name_or_file))
    ours = visual_encoder.state_dict()
    report = LoadReport(source)
    if "dist_token" in sd:
        raise CheckpointMismatchError(f"{source} is a distilled DeiT (has dist_token): its position "
                                      "embedding has two prefix tokens; use the non-distilled DeiT")
    patch = sd.get("patch_embed.proj.weight")
    if patch is not None and patch.shape != ours["patch_embed.proj.weight"].shape:
        raise ValueError(f"model.vision.width={s.width} / patch_size={s.patch_size} give a patch embedding "
                         f"{tuple(ours['patch_embed.proj.weight'].shape)}, {source} has {tuple(patch.shape)}")
    if "pos_embed" in sd and sd["pos_embed"].shape != ours["pos_embed"].shape:
        old = tuple(sd["pos_embed"].shape)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], s.grid, visual_encoder.num_prefix_tokens)
        report.resized["pos_embed"] = f"{old} -> {tuple(sd['pos_embed'].shape)}"
    unexplained_unexpected, conflicts = [], []
    for key in list(sd):
        if key in ours:
            if sd[key].shape != ours[key].shape:
                conflicts.append(f"{key}: checkpoint {tuple(sd[key].shape)}, model {tuple(ours[key].shape)}")
        elif key.startswith(("head.", "fc_norm.")):
            report.unexpected[key] = "classifier head, not part of ALBEF's image encoder"
            del sd[key]
        else:
            unexplained_unexpected.append(key)
    missing = [key for key in ours if key not in sd]
    _refuse(source, missing, unexplained_unexpected, conflicts)
    visual_encoder.load_state_dict(sd, strict=True)
    report.loaded = sorted(sd)
    return report
