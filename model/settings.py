"""Typed, checked views of the `model` config section.

A config is a plain dict (YAML). Building the model from it goes through these
dataclasses so that a typo, a missing key or a value that cannot work fails at
construction with the dotted name of the setting (`model.text.num_heads`),
never later as a shape error deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints


def build_settings(cls, data: Any, where: str):
    """Instantiate dataclass `cls` from dict `data`: unknown keys (with the closest known one named),
    missing keys without a default and wrong types are refused with the dotted setting name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ValueError(unknown_key_message(f"{where}.{key}", key, fields))
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                continue
            raise ValueError(f"missing setting {where}.{name}")
        values[name] = coerce(data[name], hints[name], f"{where}.{name}")
    out = cls(**values)
    check = getattr(out, "check", None)
    if check is not None:
        check(where)
    return out



def unknown_key_message(dotted: str, key: str, known) -> str:
    """One line naming an unknown setting and the closest known one."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"did you mean {dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}{close[0]}?" if close \
        else f"known: {', '.join(sorted(known))}"
    return f"unknown setting {dotted}; {hint}"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, where: str):
    """Check `value` against its annotation and return it (ints widen to floats; lists to tuples
    where the annotation says tuple). Handles scalars, Optional/unions, list, tuple, dict, dataclasses."""
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build_settings(hint, value, where)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ValueError as err:
                errors.append(err)
        names = " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
        raise ValueError(f"{where}={value!r} must be {names}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r} must be a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}={value!r} must have {len(args)} entries")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}={value!r} must be a mapping")
        key_t, val_t = args or (Any, Any)
        return {coerce(k, key_t, where): coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
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
    # recompute the online encoders' layer activations in backward: less memory, ~20% more FLOPs
    grad_checkpointing: bool = False
    # torch.compile each ViT and BERT layer in place (nn.Module.compile: parameter names unchanged)
    compile: bool = False
    # text feature for ITC: "cls" (the reference: the [CLS] state) or "mean" (deviation, docs/COLLAPSE.md:
    # the mean of the caption's token states, which carries the words from the first step of a random init)
    itc_text_pool: str = "cls"

    def check(self, where: str) -> None:
        _positive(where, embed_dim=self.embed_dim, queue_size=self.queue_size, temp_min=self.temp_min)
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(f"{where}.temp={self.temp} must lie in [{where}.temp_min={self.temp_min}, "
                             f"{where}.temp_max={self.temp_max}]")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{where}.momentum={self.momentum} must lie in [0, 1)")
        if self.itc_text_pool not in ("cls", "mean"):
            raise ValueError(f"{where}.itc_text_pool={self.itc_text_pool!r} must be 'cls' or 'mean'")

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "ALBEFSettings":
        return build_settings(cls, data, where)
