"""ALBEF image transforms: the pretraining augmentation and the test resize.

Pretraining (reference `pretrain_transform`): RandomResizedCrop(res, scale
0.2-1.0, bicubic) -> horizontal flip -> ALBEF's RandomAugment(N=2, M=7) over
identity, autocontrast, equalize, brightness, sharpness, shearX/Y,
translateX/Y, rotate, each drawn op applied with p=0.5 -> ToTensor -> CLIP
normalisation. Test: Resize((res, res), bicubic) -> ToTensor -> normalise.

`ImageTransform.plan` makes every draw of a sample (an `ImagePlan`) and
`apply` does the pixel work; with `augment.on_device` the shard loader ships
the plan and the crop, and `pipeline.device_augment` applies it on the
training device. Every random draw comes from a `random.Random` passed by the caller, never
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
    on_device: bool = False  # shard loader only: crop on the loader, resize + flip + RandAugment on the training device
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
        for key in ("randaug_fix_overflow", "on_device"):
            if not isinstance(getattr(cfg, key), bool):
                raise ValueError(f"augment.{key}={getattr(cfg, key)!r} must be true or false")
        if cfg.on_device and cfg.resize_backend != "torch":
            raise ValueError("augment.on_device resizes with torch's kernel on the device; "
                             f"resize_backend={cfg.resize_backend!r} needs on_device: false")
        if not 0 <= cfg.randaug_m <= RANDAUG_MAX_LEVEL:
            raise ValueError(f"augment.randaug_m={cfg.randaug_m} must lie in [0, {RANDAUG_MAX_LEVEL}]")
        return cfg


def _warp(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    height, width = img.shape[:2]
    return cv2.warpAffine(img, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=FILL_RGB)


def warp_matrix(name: str, arg: float, width: int, height: int) -> np.ndarray:
    """The [2, 3] forward matrix of a geometric op (output(M @ p) = input(p)), as the reference builds
    it: float32 for shear/translate, float64 for rotate (OpenCV rounds float32 coefficients
    differently, which moves a few pixels of a rotation). The device executor inverts the same matrix."""
    if name == "shear_x":
        return np.float32([[1, arg, 0], [0, 1, 0]])
    if name == "shear_y":
        return np.float32([[1, 0, 0], [arg, 1, 0]])
    if name == "translate_x":
        return np.float32([[1, 0, -arg], [0, 1, 0]])
    if name == "translate_y":
        return np.float32([[1, 0, 0], [0, 1, -arg]])
    if name == "rotate":
        return cv2.getRotationMatrix2D((width / 2, height / 2), arg, 1)
    raise ValueError(f"{name!r} is not a geometric op")


def _per_channel_lut(img: np.ndarray, table_of) -> np.ndarray:
    """Apply a lookup table per channel; `table_of(channel_index)` gives that channel's 256 entries."""
    tables = np.stack([table_of(c) for c in range(img.shape[2])], axis=-1)
    return cv2.LUT(img, tables.reshape(256, 1, img.shape[2]))


def _identity(img, arg):
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


def _autocontrast(img, arg):
    return _per_channel_lut(img, _autocontrast_table(img, fix_overflow=False))


def _autocontrast_fixed(img, arg):
    return _per_channel_lut(img, _autocontrast_table(img, fix_overflow=True))


def _equalize(img, arg):
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


def _brightness(img, factor):
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return cv2.LUT(img, table)


def _sharpness_blend(img: np.ndarray, factor: float) -> np.ndarray:
    """float32 degenerate + factor * (img - degenerate) on the interior (border excluded)."""
    degenerate = cv2.filter2D(img, -1, SHARPNESS_KERNEL)[1:-1, 1:-1].astype(np.float32)
    blend = img[1:-1, 1:-1].astype(np.float32)
    np.subtract(blend, degenerate, out=blend)
    blend *= factor
    blend += degenerate
    return blend


def _sharpness(img, factor):
    # the reference's float -> uint8 cast: truncate toward zero, wrap modulo 256; the border keeps img
    out = img.copy()
    out[1:-1, 1:-1] = _sharpness_blend(img, factor).astype(np.int32).astype(np.uint8)
    return out


def _sharpness_fixed(img, factor):
    blend = _sharpness_blend(img, factor)
    out = img.copy()
    out[1:-1, 1:-1] = np.clip(blend, 0, 255, out=blend)
    return out


def _geometric(name: str):
    def op(img, arg):
        return _warp(img, warp_matrix(name, arg, img.shape[1], img.shape[0]))
    return op


GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
# A drawn op's argument from the level M (the reference's level-to-argument mapping); a kept
# geometric op then gets a random sign.
_OP_ARGUMENT: dict[str, Callable[[float], float]] = {
    "identity": lambda m: 0.0,
    "autocontrast": lambda m: 0.0,
    "equalize": lambda m: 0.0,
    "brightness": _enhance_factor,
    "sharpness": _enhance_factor,
    "shear_x": lambda m: MAX_SHEAR * m / RANDAUG_MAX_LEVEL,
    "shear_y": lambda m: MAX_SHEAR * m / RANDAUG_MAX_LEVEL,
    "translate_x": lambda m: MAX_TRANSLATE_PIXELS * m / RANDAUG_MAX_LEVEL,
    "translate_y": lambda m: MAX_TRANSLATE_PIXELS * m / RANDAUG_MAX_LEVEL,
    "rotate": lambda m: MAX_ROTATE_DEGREES * m / RANDAUG_MAX_LEVEL,
}
_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "sharpness": _sharpness,
    **{name: _geometric(name) for name in GEOMETRIC_OPS},
}
# `randaug_fix_overflow: true`: PIL's intended autocontrast and a clipped sharpness blend
_FIXED_OPS = {**_OPS, "autocontrast": _autocontrast_fixed, "sharpness": _sharpness_fixed}


def plan_rand_augment(cfg: AugmentConfig, rng: random.Random) -> tuple[tuple[str, float], ...]:
    """ALBEF's RandomAugment draws: N ops with replacement, each kept with p; returns the kept
    (op, argument) pairs in order. The draws are the reference's, in its order: the N choices
    first, then per op the keep draw and, for a kept geometric op, its sign."""
    chosen = [rng.choice(cfg.randaug_ops) for _ in range(cfg.randaug_n)]
    kept = []
    for name in chosen:
        if rng.random() > cfg.randaug_p:
            continue
        arg = _OP_ARGUMENT[name](cfg.randaug_m)
        if name in GEOMETRIC_OPS:
            # the reference flips the sign with probability 0.5 (rotate draws `< 0.5`: the same law)
            arg = -arg if rng.random() > 0.5 else arg
        kept.append((name, arg))
    return tuple(kept)


def apply_rand_augment(img: np.ndarray, ops: Sequence[tuple[str, float]], fix_overflow: bool) -> np.ndarray:
    """Apply planned (op, argument) pairs to uint8 [H, W, 3] with OpenCV, as the reference does."""
    table = _FIXED_OPS if fix_overflow else _OPS
    for name, arg in ops:
        img = table[name](img, arg)
    return img


def rand_augment(img: np.ndarray, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    """ALBEF's RandomAugment on uint8 [H, W, 3]: draw the ops, then apply them."""
    return apply_rand_augment(img, plan_rand_augment(cfg, rng), cfg.randaug_fix_overflow)


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


@dataclass(frozen=True)
class ImagePlan:
    """Every random choice of one sample's transform, drawn before any pixel is touched: the crop
    box (left, top, width, height) in the decoded image, the flip, and RandAugment's kept
    (op, argument) pairs. The loader applies a plan itself (`ImageTransform.apply`) or ships it
    with the cropped pixels to the training device (`pipeline.device_augment`)."""

    box: tuple[int, int, int, int]
    flip: bool = False
    ops: tuple[tuple[str, float], ...] = ()


def crop_box(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The (left, top, width, height) box of an image (the image itself when the box is all of it)."""
    left, top, w, h = box
    if (left, top, w, h) == (0, 0, img.width, img.height):
        return img
    return img.crop((left, top, left + w, top + h))


class ImageTransform:
    """Pretraining (`train=True`) or test transform for one decoded RGB image.

    `pixels` returns the augmented uint8 [res, res, 3] array; the loader
    stacks those and normalises the whole batch at once (`normalize_batch`),
    bit for bit what per-sample ToTensor + Normalize give. `__call__` is the
    per-sample form (float [3, res, res]). `plan` + `apply` are `pixels` in
    two halves: the draws, then the pixel work.
    """

    def __init__(self, image_res: int, train: bool, augment: AugmentConfig | None = None):
        if image_res <= 0:
            raise ValueError(f"image_res={image_res} must be positive")
        self.image_res = image_res
        self.train = train
        self.augment = augment or AugmentConfig()

    def plan(self, width: int, height: int, rng: random.Random) -> ImagePlan:
        """The draws, in the reference's order: crop box, flip, RandAugment. The test transform
        draws nothing: the whole image, resized."""
        if not self.train:
            return ImagePlan((0, 0, width, height))
        box = random_resized_crop_box(width, height, self.augment.crop_scale, rng)
        flip = rng.random() < self.augment.flip_p
        return ImagePlan(box, flip, plan_rand_augment(self.augment, rng))

    def apply(self, img: Image.Image, plan: ImagePlan) -> np.ndarray:
        """Crop, resize, flip, RandAugment on this core: uint8 [res, res, 3]."""
        # crop, then resize: torchvision's border handling (resize(box=) would filter across the crop edge)
        pixels = resize_bicubic(crop_box(img, plan.box), self.image_res, self.augment.resize_backend,
                                flip=plan.flip)
        return apply_rand_augment(pixels, plan.ops, self.augment.randaug_fix_overflow)

    def pixels(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        return self.apply(img, self.plan(img.width, img.height, rng))

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
