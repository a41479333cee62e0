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

RandomAugment follows the reference's randaugment.py op for op: OpenCV
affine warps (bilinear, grey fill) for shear/translate/rotate, lookup tables
for brightness, autocontrast and equalize, a 3x3 smoothing blend for
sharpness, and the same level-to-magnitude mapping. That code imitates PIL
but has two uint8 overflows, and the published models were trained with
them, so they are reproduced by default:
- autocontrast computes the offset as `-low` on a uint8 scalar, which is
  `256 - low`: every channel whose minimum is above 0 becomes all 255; only
  channels that already reach 0 are stretched as PIL would;
- sharpness casts the blend (which overshoots 0..255 at edges for factors
  above 1) straight to uint8: values wrap around modulo 256 (x86 behaviour,
  reproduced portably here through int32).
`randaug_fix_overflow: true` (default false, a deviation from the
reference) gives PIL's intended results instead: a real autocontrast
stretch and a clipped sharpness blend.

Resizing (`resize_backend`): the reference resizes PIL images (antialiased
bicubic). The default "torch" runs torch's uint8 antialiased bicubic
interpolation, which implements PIL's filter: at most 1 grey level apart on
any pixel (tests), about 7x faster on one core (benchmarks/loader.py). "pil"
is PIL's own resize, bit for bit the reference's.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

# CLIP normalisation (docs/METHOD.md §5).
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
# PIL's SMOOTH filter, the "degenerate" image sharpness blends away from.
SHARPNESS_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13

# torchvision RandomResizedCrop defaults the reference kept.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

RESIZE_BACKENDS = ("torch", "pil")

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
    randaug_fix_overflow: bool = False  # deviation: PIL-correct autocontrast/sharpness (module docstring)
    resize_backend: str = "torch"  # "pil": PIL's bicubic, bit for bit the reference; "torch": <= 1 level off, faster
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
        if cfg.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"augment.resize_backend={cfg.resize_backend!r} must be one of {RESIZE_BACKENDS}")
        if not isinstance(cfg.randaug_fix_overflow, bool):
            raise ValueError(f"augment.randaug_fix_overflow={cfg.randaug_fix_overflow!r} must be true or false")
        if not 0 <= cfg.randaug_m <= RANDAUG_MAX_LEVEL:
            raise ValueError(f"augment.randaug_m={cfg.randaug_m} must lie in [0, {RANDAUG_MAX_LEVEL}]")
        return cfg


def _signed(magnitude: float, rng: random.Random) -> float:
    # The reference flips the sign with probability 0.5 for geometric ops.
    return -magnitude if rng.random() > 0.5 else magnitude


def _warp(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    # matrix [2, 3]: float32 for shear/translate, float64 for rotate, as the reference builds them
    # (OpenCV rounds float32 coefficients differently, which moves a few pixels of a rotation)
    height, width = img.shape[:2]
    return cv2.warpAffine(img, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=FILL_RGB)


def _per_channel_lut(img: np.ndarray, table_of) -> np.ndarray:
    """Apply a lookup table per channel; `table_of(channel_index)` gives that channel's 256 entries."""
    tables = np.stack([table_of(c) for c in range(img.shape[2])], axis=-1)
    return cv2.LUT(img, tables.reshape(256, 1, img.shape[2]))


def _identity(img, level, rng):
    return img


def _autocontrast_table(img: np.ndarray, fix_overflow: bool):
    extremes = [cv2.minMaxLoc(channel)[:2] for channel in cv2.split(img)]

    def table(c):
        low, high = int(extremes[c][0]), int(extremes[c][1])
        if high <= low:
            return np.arange(256, dtype=np.uint8)
        scale = 255.0 / (high - low)
        # the reference's offset `-low * scale` negates a uint8 scalar: (256 - low) % 256
        offset = -low * scale if fix_overflow else ((-low) % 256) * scale
        return (np.arange(256) * scale + offset).clip(0, 255).astype(np.uint8)

    return table


def _autocontrast(img, level, rng):
    return _per_channel_lut(img, _autocontrast_table(img, fix_overflow=False))


def _autocontrast_fixed(img, level, rng):
    return _per_channel_lut(img, _autocontrast_table(img, fix_overflow=True))


def _equalize(img, level, rng):
    def table(c):
        hist = cv2.calcHist([img], [c], None, [256], [0, 256]).reshape(-1)
        step = np.sum(hist[hist != 0][:-1]) // 255
        if step == 0:
            return np.arange(256, dtype=np.uint8)
        shifted = np.empty_like(hist)
        shifted[0] = step // 2
        shifted[1:] = hist[:-1]
        return (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)

    return _per_channel_lut(img, table)


def _enhance_factor(level: float) -> float:
    return ENHANCE_MIN_FACTOR + ENHANCE_FACTOR_SPAN * level / RANDAUG_MAX_LEVEL


def _brightness(img, level, rng):
    table = (np.arange(256, dtype=np.float32) * _enhance_factor(level)).clip(0, 255).astype(np.uint8)
    return cv2.LUT(img, table)


def _sharpness_blend(img: np.ndarray, level: float) -> np.ndarray:
    """float32 degenerate + factor * (img - degenerate) on the interior (border excluded)."""
    factor = _enhance_factor(level)
    degenerate = cv2.filter2D(img, -1, SHARPNESS_KERNEL)[1:-1, 1:-1].astype(np.float32)
    blend = img[1:-1, 1:-1].astype(np.float32)
    np.subtract(blend, degenerate, out=blend)
    blend *= factor
    blend += degenerate
    return blend


def _sharpness(img, level, rng):
    # the reference's float -> uint8 cast: truncate toward zero, wrap modulo 256; the border keeps img
    out = img.copy()
    out[1:-1, 1:-1] = _sharpness_blend(img, level).astype(np.int32).astype(np.uint8)
    return out


def _sharpness_fixed(img, level, rng):
    blend = _sharpness_blend(img, level)
    out = img.copy()
    out[1:-1, 1:-1] = np.clip(blend, 0, 255, out=blend)
    return out


def _shear_x(img, level, rng):
    shear = _signed(MAX_SHEAR * level / RANDAUG_MAX_LEVEL, rng)
    return _warp(img, np.float32([[1, shear, 0], [0, 1, 0]]))


def _shear_y(img, level, rng):
    shear = _signed(MAX_SHEAR * level / RANDAUG_MAX_LEVEL, rng)
    return _warp(img, np.float32([[1, 0, 0], [shear, 1, 0]]))


def _translate_x(img, level, rng):
    offset = _signed(MAX_TRANSLATE_PIXELS * level / RANDAUG_MAX_LEVEL, rng)
    return _warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]))


def _translate_y(img, level, rng):
    offset = _signed(MAX_TRANSLATE_PIXELS * level / RANDAUG_MAX_LEVEL, rng)
    return _warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]))


def _rotate(img, level, rng):
    # The reference draws this sign with `< 0.5` (`> 0.5` elsewhere): the same law.
    degrees = _signed(MAX_ROTATE_DEGREES * level / RANDAUG_MAX_LEVEL, rng)
    height, width = img.shape[:2]
    return _warp(img, cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1))


_OPS: dict[str, Callable[[np.ndarray, float, random.Random], np.ndarray]] = {
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
# `randaug_fix_overflow: true`: PIL's intended autocontrast and a clipped sharpness blend
_FIXED_OPS = {**_OPS, "autocontrast": _autocontrast_fixed, "sharpness": _sharpness_fixed}


def rand_augment(img: np.ndarray, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    """ALBEF's RandomAugment on uint8 [H, W, 3]: N ops drawn with replacement, each applied with p."""
    table = _FIXED_OPS if cfg.randaug_fix_overflow else _OPS
    ops = [rng.choice(cfg.randaug_ops) for _ in range(cfg.randaug_n)]
    for name in ops:
        if rng.random() > cfg.randaug_p:
            continue
        img = table[name](img, cfg.randaug_m, rng)
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

    `pixels` returns the augmented uint8 [res, res, 3] array; the loader
    stacks those and normalises the whole batch at once (`normalize_batch`),
    bit for bit what per-sample ToTensor + Normalize give. `__call__` is the
    per-sample form (float [3, res, res]).
    """

    def __init__(self, image_res: int, train: bool, augment: AugmentConfig | None = None):
        if image_res <= 0:
            raise ValueError(f"image_res={image_res} must be positive")
        self.image_res = image_res
        self.train = train
        self.augment = augment or AugmentConfig()

    def pixels(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        if not self.train:
            return resize_bicubic(img, self.image_res, self.augment.resize_backend)
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.augment.crop_scale, rng)
        # crop, then resize: torchvision's border handling (resize(box=) would filter across the crop edge)
        flip = rng.random() < self.augment.flip_p
        pixels = resize_bicubic(img.crop((left, top, left + w, top + h)), self.image_res,
                                self.augment.resize_backend, flip=flip)
        return rand_augment(pixels, self.augment, rng)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        # the test transform draws nothing, so `transform(img)` works as a torchvision transform would
        if rng is None and self.train:
            raise ValueError("the training transform draws its augmentation from rng: pass a random.Random")
        return normalize_batch([self.pixels(img, rng)], self.augment.mean, self.augment.std)[0]


def resize_bicubic(img: Image.Image, res: int, backend: str = "torch", flip: bool = False) -> np.ndarray:
    """RGB image -> uint8 [res, res, 3], antialiased bicubic (PIL's filter), then an optional
    horizontal flip; the array is C-contiguous and writable, as the OpenCV ops need."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if backend == "pil":
        img = img.resize((res, res), Image.Resampling.BICUBIC)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(img)
    if img.size == (res, res):
        out = np.array(img)
        return np.ascontiguousarray(out[:, ::-1]) if flip else out
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    nchw = hwc.permute(2, 0, 1).unsqueeze(0)   # a channels-last view: the fast uint8 kernel's layout
    out = torch.nn.functional.interpolate(nchw, size=(res, res), mode="bicubic", antialias=True)
    if flip:
        out = out.flip(3)
    return out[0].permute(1, 2, 0).contiguous().numpy()   # CHW -> HWC: torch transposes faster than numpy


def normalize_batch(images: Sequence[np.ndarray], mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W]: ToTensor's /255, then (x - mean) / std.

    Each channel goes through a 256-entry lookup table holding those float32
    operations' results for every possible byte, so the output is bit for bit
    per-sample ToTensor + Normalize in a single pass per channel.
    """
    tables = _normalize_tables(tuple(mean), tuple(std))
    height, width, channels = images[0].shape
    out = np.empty((len(images), channels, height, width), dtype=np.float32)
    for i, image in enumerate(images):
        for c, plane in enumerate(cv2.split(np.ascontiguousarray(image))):
            cv2.LUT(plane, tables[c], dst=out[i, c])
    return torch.from_numpy(out)


def stack_pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> uint8 [B, 3, H, W] (channels-last in memory): what the shard loader
    hands over. `normalize_images` returns the usual contiguous layout. Normalising
    on the device (`normalize_images`) moves a quarter of the bytes and takes the float work off
    the loader's core."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)   # channels-last strides: no transposing copy


def normalize_images(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] (any device) -> float32: ToTensor's /255, then (x - mean) / std, the same
    float32 operations in the same order as torchvision, so bit for bit `normalize_batch`."""
    mean, std = _channel_constants(tuple(mean), tuple(std), images.device)
    return images.float().div_(255.0).sub_(mean).div_(std).contiguous()


@functools.lru_cache(maxsize=8)
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a host-to-device copy every step would wait for the device
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))


@functools.lru_cache(maxsize=4)
def _normalize_tables(mean: tuple[float, ...], std: tuple[float, ...]) -> list[np.ndarray]:
    values = torch.arange(256, dtype=torch.float32).div_(255.0)
    return [values.sub(m).div_(s).numpy().reshape(256, 1) for m, s in zip(mean, std)]
