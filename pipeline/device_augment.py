"""The pretraining augmentation's pixel work on the training device: the loader draws, the device computes.

With `augment.on_device: true` the shard loader's core only reads, decodes and
crops: it draws each sample's `ImagePlan` (crop box, flip, RandAugment ops:
the same draws in the same order as the host path, so resume stays exact) and
ships the cropped uint8 pixels with the plan. `augment_on_device` then does
the rest for the whole batch where the model runs (docs/METHOD.md §5,
docs/SPEED.md):

- resize each crop to res x res with torch's antialiased bicubic filter
  (PIL's filter, as the host path); on a CPU device the same uint8 kernel as
  the host path, so bit for bit; elsewhere (CUDA has no uint8 kernel) in
  float32, two passes rounded to uint8 levels as the uint8 kernel's: at most
  one grey level from it per pass (about 0.25% of values differ, nearly all
  by one level);
- flip;
- RandAugment, one op slot at a time, each op batched over the samples that
  drew it. Lookup-table ops (autocontrast, equalize, brightness) and
  sharpness are computed with the host path's arithmetic and give the same
  bytes (integer and elementwise float arithmetic only: no convolution or
  matmul, which a GPU may run in TF32); the geometric ops (shear, translate, rotate) sample bilinearly with
  `grid_sample` around the same grey fill, where OpenCV uses fixed-point
  coordinates: a few grey levels apart at edges (tests state the tolerance).

Batch keys the loader hands over instead of `image`:
`image_crops` uint8 [sum of h*w*3] (the crops, HWC, concatenated),
`image_shapes` long [B, 2] (h, w), `image_plan` float64 [B, 1 + 2 * N]
(flip, then N (op index in ALBEF_RANDAUG_OPS or -1, argument) pairs). The
shapes and the plan stay on the host, so the device never waits for them.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.transforms import (ALBEF_RANDAUG_OPS, FILL_RGB, GEOMETRIC_OPS, AugmentConfig, ImagePlan,
                                 crop_box, warp_matrix)

OP_INDEX = {name: i for i, name in enumerate(ALBEF_RANDAUG_OPS)}
NO_OP = -1.0


def crop_pixels(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of an RGB image as read-only uint8 [h, w, 3] (`np.asarray(img)` would take twice as long)."""
    _, _, w, h = box
    return np.frombuffer(crop_box(img, box).tobytes(), dtype=np.uint8).reshape(h, w, 3)


def pack_crops(crops: Sequence[np.ndarray], plans: Sequence[ImagePlan], slots: int) -> dict[str, torch.Tensor]:
    """Crops and their plans -> the batch keys of the module docstring; `slots` = augment.randaug_n."""
    shapes = torch.tensor([crop.shape[:2] for crop in crops], dtype=torch.long)
    flat = torch.from_numpy(np.concatenate([crop.reshape(-1) for crop in crops]))
    rows = []
    for plan in plans:
        ops = [value for name, arg in plan.ops for value in (OP_INDEX[name], arg)]
        rows.append([float(plan.flip), *ops, *[NO_OP] * (2 * slots - len(ops))])
    return {"image_crops": flat, "image_shapes": shapes, "image_plan": torch.tensor(rows, dtype=torch.float64)}


def augment_on_device(batch: dict, res: int, augment: AugmentConfig, device: torch.device,
                      float_resize: bool | None = None) -> torch.Tensor:
    """The packed crops of `batch` -> uint8 [B, 3, res, res] on `device`, resized, flipped and
    augmented by their plans. `float_resize` (default: on any device but the CPU) resizes in float32
    and rounds, for devices without the uint8 kernel."""
    shapes = batch["image_shapes"].tolist()           # host tensors: reading them waits for nothing
    plans = batch["image_plan"].tolist()
    flat = batch["image_crops"].to(device, non_blocking=True)
    if float_resize is None:
        float_resize = device.type != "cpu"
    out = torch.empty((len(shapes), 3, res, res), dtype=torch.uint8, device=device)
    offset = 0
    for i, (h, w) in enumerate(shapes):
        crop = flat[offset:offset + h * w * 3].view(1, h, w, 3).permute(0, 3, 1, 2)   # channels-last view
        offset += h * w * 3
        image = _resize(crop, res, float_resize)[0]
        out[i] = image.flip(-1) if plans[i][0] else image
    for slot in range(1, len(plans[0]), 2):   # each sample's ops in order: slot by slot, batched per op
        groups: dict[int, tuple[list[int], list[float]]] = {}
        for i, plan in enumerate(plans):
            if plan[slot] != NO_OP:
                rows, args = groups.setdefault(int(plan[slot]), ([], []))
                rows.append(i)
                args.append(plan[slot + 1])
        for index, (rows, args) in sorted(groups.items()):
            name = ALBEF_RANDAUG_OPS[index]
            if name != "identity":
                where = _to_device(rows, torch.long, device)
                out[where] = _DEVICE_OPS[name](out[where], args, augment.randaug_fix_overflow)
    return out


def _to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values -> a tensor on `device` without waiting for it: a plain `torch.tensor(..., device=)`
    copies synchronously, which on a GPU waits for every kernel already queued."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@functools.lru_cache(maxsize=8)
def _fill_colour(device: torch.device) -> torch.Tensor:
    """The warps' fill colour [1, 3, 1, 1] on `device`, made once."""
    return torch.tensor(FILL_RGB, dtype=torch.float32).view(1, 3, 1, 1).to(device)


def _resize(crop: torch.Tensor, res: int, float_resize: bool) -> torch.Tensor:
    if crop.shape[-2:] == (res, res):
        return crop
    if not float_resize:
        return F.interpolate(crop, size=(res, res), mode="bicubic", antialias=True)
    # two passes, horizontal then vertical, rounded to uint8 levels in between as PIL and the uint8
    # kernel do (one float pass keeps the overshoot of upscaling between passes: up to 9 levels apart)
    wide = F.interpolate(crop.float(), size=(crop.shape[-2], res), mode="bicubic", antialias=True)
    wide = wide.round_().clamp_(0, 255)
    return F.interpolate(wide, size=(res, res), mode="bicubic", antialias=True).round_().clamp_(0, 255).to(torch.uint8)


# ---- RandAugment ops on uint8 [b, 3, H, W]; `args`: the b samples' arguments (host floats) ---------

def _apply_tables(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel lookup: tables uint8 [b, 3, 256]."""
    b, c, h, w = x.shape
    return tables.gather(2, x.reshape(b, c, h * w).long()).view(b, c, h, w)


def _autocontrast(x, args, fix_overflow):
    low = x.amin(dim=(2, 3)).double()                                  # [b, 3]
    high = x.amax(dim=(2, 3)).double()
    scale = torch.full_like(low, 255.0) / (high - low).clamp_(min=1)   # `255.0 / t` would multiply by 1/t
    # the reference's uint8 negation (-low) % 256 unless fixed (pipeline/transforms.py)
    offset = -low * scale if fix_overflow else torch.remainder(-low, 256) * scale
    levels = torch.arange(256, dtype=torch.float64, device=x.device)
    tables = (levels * scale[..., None] + offset[..., None]).clamp_(0, 255).to(torch.uint8)
    flat = (high <= low)[..., None]
    tables = torch.where(flat, levels.to(torch.uint8), tables)
    return _apply_tables(x, tables)


def _equalize(x, args, fix_overflow):
    b, c, h, w = x.shape
    bins = (torch.arange(b * c, device=x.device)[:, None] * 256 + x.reshape(b * c, h * w).long()).flatten()
    hist = torch.zeros(b * c * 256, dtype=torch.long, device=x.device)
    hist = hist.scatter_add_(0, bins, torch.ones_like(bins)).view(b, c, 256)   # fixed size: bincount would sync
    levels = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, levels, -1).amax(-1, keepdim=True)        # the last level that occurs
    step = (h * w - hist.gather(-1, last)) // 255                          # [b, c, 1]
    shifted = torch.cat([step // 2, hist[..., :-1]], dim=-1)
    tables = (shifted.cumsum(-1) // step.clamp(min=1)).clamp_(0, 255).to(torch.uint8)
    tables = torch.where(step == 0, levels.to(torch.uint8), tables)
    return _apply_tables(x, tables)


def _brightness(x, args, fix_overflow):
    factors = _to_device(args, torch.float32, x.device)
    levels = torch.arange(256, dtype=torch.float32, device=x.device)
    tables = (levels * factors[:, None]).clamp_(0, 255).to(torch.uint8)   # [b, 256]
    return _apply_tables(x, tables[:, None, :].expand(-1, x.shape[1], -1))


def _sharpness(x, args, fix_overflow):
    factors = _to_device(args, torch.float32, x.device)[:, None, None, None]
    # OpenCV's filter2D with PIL's smoothing kernel, saturated to uint8: round(S / 13) with S the
    # integer neighbourhood sum (centre x5). A sum of integers / 13 never sits at .5, so OpenCV's
    # float rounding gives this exactly; integers keep it exact on any device (a GPU convolution
    # may run in TF32).
    wide = x.to(torch.int32)
    h, w = x.shape[-2:]
    total = 4 * wide[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + wide[..., dy:h - 2 + dy, dx:w - 2 + dx]
    degenerate = ((2 * total + 13) // 26).float()
    blend = (wide[..., 1:-1, 1:-1].float() - degenerate) * factors + degenerate
    if fix_overflow:
        inner = blend.clamp_(0, 255).to(torch.uint8)
    else:   # the reference's cast: truncate toward zero, wrap modulo 256
        inner = torch.remainder(blend.to(torch.int32), 256).to(torch.uint8)
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _geometric(name: str):
    def op(x, args, fix_overflow):
        b, c, h, w = x.shape
        inverse = np.stack([_inverse(warp_matrix(name, a, w, h)) for a in args])
        m = _to_device(inverse, torch.float32, x.device)[:, :, :, None, None]          # [b, 2, 3, 1, 1]
        ys = torch.arange(h, device=x.device, dtype=torch.float32)[:, None]
        xs = torch.arange(w, device=x.device, dtype=torch.float32)[None, :]
        # source pixel of every output pixel, elementwise (a matmul may run in TF32 on a GPU)
        source_x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]                       # [b, h, w]
        source_y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
        grid = torch.stack([source_x * (2.0 / max(w - 1, 1)) - 1.0, source_y * (2.0 / max(h - 1, 1)) - 1.0], dim=-1)
        fill = _fill_colour(x.device)
        # zero padding around (x - fill) is bilinear sampling with the fill colour outside
        warped = F.grid_sample(x.float() - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return (warped + fill).round_().clamp_(0, 255).to(torch.uint8)
    return op


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """OpenCV's invertAffineTransform, in float64."""
    m = matrix.astype(np.float64)
    a = np.array([[m[0, 0], m[0, 1]], [m[1, 0], m[1, 1]]])
    inv = np.linalg.inv(a)
    return np.concatenate([inv, -inv @ m[:, 2:]], axis=1)


_DEVICE_OPS = {
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "sharpness": _sharpness,
    **{name: _geometric(name) for name in GEOMETRIC_OPS},
}
