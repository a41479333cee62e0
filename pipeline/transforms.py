"""ALBEF image transforms: the pretraining augmentation and the test resize.

Pretraining (reference `pretrain_transform`): RandomResizedCrop(res, scale
0.2-1.0, bicubic) -> horizontal flip -> ALBEF's RandomAugment(N=2, M=7) over
identity, autocontrast, equalize, brightness, sharpness, shearX/Y,
translateX/Y, rotate, each drawn op applied with p=0.5 -> ToTensor -> CLIP
normalisation. Test: Resize((res, res), bicubic) -> ToTensor -> normalise.

Every random draw comes from a `random.Random` passed by the caller, never
from a global generator: the loader seeds one per batch, so a resumed run
augments each sample exactly as an uninterrupted one, and running in the
training process (num_workers=0) leaves the trainer's RNG streams alone.

RandomAugment is re-implemented on PIL's C operations. The reference wrote it
with OpenCV "to match PIL"; the operations here are PIL's own (autocontrast,
equalize, brightness and sharpness enhancers, affine warps), with the
reference's level-to-magnitude mapping and its grey fill. One difference:
the reference's sharpness cast overflowing values to uint8 (wrapping);
PIL saturates, which is what the reference meant to reproduce.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

# CLIP normalisation (spec section 3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The reference RandomAugment's level-to-argument mapping (randaugment.py):
# a level M on a 0..MAX_LEVEL scale gives each op this fraction of its maximum.
RANDAUG_MAX_LEVEL = 10
ENHANCE_MIN_FACTOR = 0.1  # brightness/sharpness factor = 0.1 + 1.8 * M / MAX_LEVEL
ENHANCE_FACTOR_SPAN = 1.8
MAX_SHEAR = 0.3  # shear coefficient at MAX_LEVEL
MAX_TRANSLATE_PIXELS = 10  # absolute pixels in the reference (translate_const)
MAX_ROTATE_DEGREES = 30
FILL_RGB = (128, 128, 128)  # the reference's replace_value for uncovered pixels

# torchvision RandomResizedCrop defaults the reference kept.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

ALBEF_RANDAUG_OPS = (
    "identity", "autocontrast", "equalize", "brightness", "sharpness",
    "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
)


@dataclass(frozen=True)
class AugmentConfig:
    """Pretraining augmentation settings; the defaults are the reference's."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_p: float = 0.5
    randaug_n: int = 2
    randaug_m: int = 7
    randaug_p: float = 0.5
    randaug_ops: tuple[str, ...] = ALBEF_RANDAUG_OPS
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_dict(cls, values: dict | None) -> "AugmentConfig":
        """Build from a config section; unknown keys and ops are refused by name."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augment setting(s) {unknown}; known: {sorted(known)}")
        for key in ("crop_scale", "randaug_ops", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        cfg = cls(**values)
        bad_ops = [op for op in cfg.randaug_ops if op not in _OPS]
        if bad_ops:
            raise ValueError(f"augment.randaug_ops: unknown op(s) {bad_ops}; known: {sorted(_OPS)}")
        if not 0 <= cfg.randaug_m <= RANDAUG_MAX_LEVEL:
            raise ValueError(f"augment.randaug_m={cfg.randaug_m} must lie in [0, {RANDAUG_MAX_LEVEL}]")
        return cfg


def _signed(magnitude: float, rng: random.Random) -> float:
    # The reference flips the sign with probability 0.5 for geometric ops.
    return -magnitude if rng.random() > 0.5 else magnitude


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs,
                         resample=Image.Resampling.BILINEAR, fillcolor=FILL_RGB)


def _identity(img, level, rng):
    return img


def _autocontrast(img, level, rng):
    return ImageOps.autocontrast(img)


def _equalize(img, level, rng):
    return ImageOps.equalize(img)


def _enhance_factor(level: float) -> float:
    return ENHANCE_MIN_FACTOR + ENHANCE_FACTOR_SPAN * level / RANDAUG_MAX_LEVEL


def _brightness(img, level, rng):
    return ImageEnhance.Brightness(img).enhance(_enhance_factor(level))


def _sharpness(img, level, rng):
    return ImageEnhance.Sharpness(img).enhance(_enhance_factor(level))


def _shear_x(img, level, rng):
    shear = _signed(MAX_SHEAR * level / RANDAUG_MAX_LEVEL, rng)
    return _affine(img, (1.0, shear, 0.0, 0.0, 1.0, 0.0))


def _shear_y(img, level, rng):
    shear = _signed(MAX_SHEAR * level / RANDAUG_MAX_LEVEL, rng)
    return _affine(img, (1.0, 0.0, 0.0, shear, 1.0, 0.0))


def _translate_x(img, level, rng):
    offset = _signed(MAX_TRANSLATE_PIXELS * level / RANDAUG_MAX_LEVEL, rng)
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0))


def _translate_y(img, level, rng):
    offset = _signed(MAX_TRANSLATE_PIXELS * level / RANDAUG_MAX_LEVEL, rng)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset))


def _rotate(img, level, rng):
    # The reference draws the sign with `< 0.5` here (`> 0.5` elsewhere): same law.
    degrees = _signed(MAX_ROTATE_DEGREES * level / RANDAUG_MAX_LEVEL, rng)
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=FILL_RGB)


_OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "sharpness": _sharpness,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
    "rotate": _rotate,
}


def rand_augment(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    """ALBEF's RandomAugment: N ops drawn with replacement, each applied with p."""
    ops = [rng.choice(cfg.randaug_ops) for _ in range(cfg.randaug_n)]
    for name in ops:
        if rng.random() > cfg.randaug_p:
            continue
        img = _OPS[name](img, cfg.randaug_m, rng)
    return img


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`; returns (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageTransform:
    """Pretraining (`train=True`) or test transform for one decoded RGB image.

    `geometry_and_colour` returns the augmented res x res PIL image; the
    loader stacks those as uint8 and normalises the whole batch at once
    (`normalize_batch`), which is numerically what per-sample ToTensor +
    Normalize give. `__call__` is the per-sample form (float [3, res, res]).
    """

    def __init__(self, image_res: int, train: bool, augment: AugmentConfig | None = None):
        if image_res <= 0:
            raise ValueError(f"image_res={image_res} must be positive")
        self.image_res = image_res
        self.train = train
        self.augment = augment or AugmentConfig()

    def geometry_and_colour(self, img: Image.Image, rng: random.Random) -> Image.Image:
        size = (self.image_res, self.image_res)
        if not self.train:
            return img.resize(size, Image.Resampling.BICUBIC)
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.augment.crop_scale, rng)
        img = img.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < self.augment.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return rand_augment(img, self.augment, rng)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(self.geometry_and_colour(img, rng)).copy())
        return normalize_batch(pixels.unsqueeze(0), self.augment.mean, self.augment.std)[0]


def normalize_batch(pixels: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W]: ToTensor's /255, then (x - mean) / std.

    One strided copy into a contiguous float batch, then in-place passes: the
    same float32 operations as per-sample ToTensor + Normalize, bit for bit.
    """
    batch, height, width, channels = pixels.shape
    out = torch.empty((batch, channels, height, width), dtype=torch.float32)
    out.copy_(pixels.permute(0, 3, 1, 2))
    mean_t = torch.tensor(mean, dtype=out.dtype).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=out.dtype).view(1, channels, 1, 1)
    return out.div_(255.0).sub_(mean_t).div_(std_t)
