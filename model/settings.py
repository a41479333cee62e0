"""Typed, checked views of the `model` config section.

A config is a plain dict (YAML). Building the model from it goes through these
dataclasses so that a typo, a missing key or a value that cannot work fails at
construction with the dotted name of the setting (`model.text.num_heads`),
never later as a shape error deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, get_type_hints


def _build(cls, data: Any, where: str):
    """Instantiate dataclass `cls` from dict `data`, refusing unknown or missing keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                         f"known: {', '.join(sorted(fields))}")
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is not dataclasses.MISSING:
                continue
            raise ValueError(f"missing setting {where}.{name}")
        value = data[name]
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            value = _build(sub, value, f"{where}.{name}")
        else:
            value = _coerce(value, sub, f"{where}.{name}")
        values[name] = value
    out = cls(**values)
    out.check(where)
    return out


def _coerce(value: Any, hint: Any, where: str):
    """Check a scalar against its annotation (int, float, bool, str, Optional[str])."""
    if hint is Optional[str]:
        if value is None or isinstance(value, str):
            return value
        raise ValueError(f"{where}={value!r} must be a string or null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}={value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}={value!r} must be a string")
    raise TypeError(f"no coercion for {hint} at {where}")


def _positive(where: str, **values) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{where}.{name}={value} must be positive")


def _divisible(where: str, a: str, av: int, b: str, bv: int) -> None:
    if av % bv:
        raise ValueError(f"{where}.{a}={av} is not divisible by {where}.{b}={bv}")


def _fraction(where: str, **values) -> None:
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}.{name}={value} must lie in [0, 1]")


@dataclass(frozen=True)
class VisionSettings:
    """Image encoder: a timm VisionTransformer (`encoder: vit`)."""
    encoder: str
    init: Optional[str]       # timm model name or local weights file; null = random init
    image_res: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    layer_norm_eps: float
    drop_path: float

    def check(self, where: str) -> None:
        _positive(where, image_res=self.image_res, patch_size=self.patch_size, width=self.width,
                  depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  layer_norm_eps=self.layer_norm_eps)
        _divisible(where, "image_res", self.image_res, "patch_size", self.patch_size)
        _divisible(where, "width", self.width, "num_heads", self.num_heads)
        _fraction(where, drop_path=self.drop_path)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_res // self.patch_size


@dataclass(frozen=True)
class TextSettings:
    """BERT split into text layers and fusion layers (`encoder: bert`)."""
    encoder: str
    init: Optional[str]       # Hugging Face BERT name or local directory; null = random init
    tokenizer: str            # the tokenizer these ids belong to (read by the data loaders)
    vocab_size: int
    pad_token_id: int
    cls_token_id: int
    mask_token_id: int
    hidden_size: int
    num_text_layers: int
    num_fusion_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    init_std: float

    def check(self, where: str) -> None:
        _positive(where, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  num_text_layers=self.num_text_layers, num_fusion_layers=self.num_fusion_layers,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                  max_position_embeddings=self.max_position_embeddings,
                  type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
                  init_std=self.init_std)
        _divisible(where, "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        _fraction(where, hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout)
        for name in ("pad_token_id", "cls_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{where}.{name}={value} is outside the vocabulary "
                                 f"({where}.vocab_size={self.vocab_size})")

    @property
    def num_layers(self) -> int:
        return self.num_text_layers + self.num_fusion_layers


@dataclass(frozen=True)
class MLMSettings:
    """Masked language modelling: which tokens are chosen and what they become."""
    probability: float        # chance that a token (not PAD/CLS) is chosen
    mask_fraction: float      # of chosen tokens: replaced by [MASK]
    random_fraction: float    # of chosen tokens: replaced by a random token id (rest unchanged)

    def check(self, where: str) -> None:
        _fraction(where, probability=self.probability, mask_fraction=self.mask_fraction,
                  random_fraction=self.random_fraction)
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ValueError(f"{where}.mask_fraction + {where}.random_fraction = "
                             f"{self.mask_fraction + self.random_fraction} exceeds 1")


@dataclass(frozen=True)
class ALBEFSettings:
    """The whole `model` section."""
    embed_dim: int
    temp: float
    temp_min: float
    temp_max: float
    momentum: float
    queue_size: int
    retrieval: bool
    mlm: MLMSettings
    vision: VisionSettings
    text: TextSettings

    def check(self, where: str) -> None:
        _positive(where, embed_dim=self.embed_dim, queue_size=self.queue_size, temp_min=self.temp_min)
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(f"{where}.temp={self.temp} must lie in [{where}.temp_min={self.temp_min}, "
                             f"{where}.temp_max={self.temp_max}]")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{where}.momentum={self.momentum} must lie in [0, 1)")

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "ALBEFSettings":
        return _build(cls, data, where)
