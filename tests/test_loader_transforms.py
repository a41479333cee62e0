"""Caption cleaning and image transforms against the reference's definitions."""
import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T

from pipeline.captions import pre_caption
from pipeline.transforms import (CLIP_MEAN, CLIP_STD, CROP_RATIO, FILL_RGB, AugmentConfig,
                                 ImageTransform, normalize_batch, normalize_images, rand_augment,
                                 random_resized_crop_box, stack_pixels)


@pytest.mark.parametrize("text, expected", [
    ("A Man, riding a horse!", "a man riding a horse"),
    ("<person> is on the left-side / right", "person is on the left side right"),
    ("It's \"great\" (really)*#:;~", "its great really"),
    ("  two   spaces\n", "two spaces"),
    ("?!...", ""),
])
def test_pre_caption_matches_reference(text, expected):
    assert pre_caption(text) == expected


def test_pre_caption_keeps_at_most_max_words():
    text = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(text).split(" ") == [f"w{i}" for i in range(30)]
    assert pre_caption(text, max_words=5) == "w0 w1 w2 w3 w4"


def _photo(width=97, height=61, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return Image.fromarray((base * 0.7 + rng.integers(0, 70, base.shape)).astype(np.uint8))


LEVEL = 1 / 255 / min(CLIP_STD)   # one grey level, after normalisation


def test_test_transform_equals_torchvision_resize_totensor_normalize():
    img = _photo()
    reference = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    exact = ImageTransform(32, train=False, augment=AugmentConfig(resize_backend="pil"))(img, random.Random(0))
    assert exact.shape == (3, 32, 32) and torch.equal(exact, reference)
    fast = ImageTransform(32, train=False)(img, random.Random(0))   # torch's kernel: within one level
    assert (fast - reference).abs().max() <= LEVEL * 1.0001


def test_normalize_batch_equals_per_sample_totensor_normalize():
    imgs = [_photo(16, 16, seed=s) for s in range(3)]
    batch = normalize_batch([np.asarray(i) for i in imgs])
    reference = torch.stack([T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(i)) for i in imgs])
    assert batch.shape == (3, 3, 16, 16) and torch.equal(batch, reference)


def test_uint8_batches_normalised_on_the_device_equal_normalize_batch():
    imgs = [np.asarray(_photo(16, 16, seed=s)) for s in range(3)]
    stacked = stack_pixels(imgs)
    assert stacked.dtype == torch.uint8 and stacked.shape == (3, 3, 16, 16)
    assert torch.equal(normalize_images(stacked), normalize_batch(imgs)) and normalize_images(stacked).is_contiguous()
    assert torch.equal(normalize_images(stacked, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)),
                       normalize_batch(imgs, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)))


def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = random.Random(0)
    fractions = []
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(200, 150, (0.2, 1.0), rng)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        fractions.append(w * h / (200 * 150))
        assert CROP_RATIO[0] * 0.95 <= w / h <= CROP_RATIO[1] * 1.05
    assert 0.18 <= min(fractions) < 0.3 and max(fractions) > 0.9
    # a 1000x10 strip admits no crop of the allowed ratios: centre crop at the widest ratio
    assert random_resized_crop_box(1000, 10, (0.2, 1.0), random.Random(0)) == (493, 0, 13, 10)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_train_crop_is_torchvision_resized_crop_of_the_drawn_box(flip_p):
    img = _photo(120, 90)
    exact = AugmentConfig(flip_p=flip_p, randaug_n=0, resize_backend="pil")
    left, top, w, h = random_resized_crop_box(120, 90, exact.crop_scale, random.Random(3))
    crop = T.functional.resized_crop(img, top, left, h, w, [32, 32], T.InterpolationMode.BICUBIC)
    crop = T.functional.hflip(crop) if flip_p else crop
    reference = T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(crop))
    assert torch.equal(ImageTransform(32, train=True, augment=exact)(img, random.Random(3)), reference)
    fast = ImageTransform(32, train=True, augment=AugmentConfig(flip_p=flip_p, randaug_n=0))(img, random.Random(3))
    assert (fast - reference).abs().max() <= LEVEL * 1.0001


def test_both_resize_backends_give_the_same_samples_within_one_level():
    """The full pretraining transform (crop, flip, RandAugment) from the same draws: the backends
    differ only in the resize, by at most one grey level before the ops, which the LUT ops keep
    small; the same draws are consumed (the next draw agrees)."""
    photos = [_photo(160 + 7 * i, 120 + 5 * i, seed=i) for i in range(12)]
    pil = ImageTransform(48, train=True, augment=AugmentConfig(resize_backend="pil"))
    fast = ImageTransform(48, train=True)
    diffs = []
    for i, img in enumerate(photos):
        rng_a, rng_b = random.Random(i), random.Random(i)
        a, b = pil.pixels(img, rng_a).astype(int), fast.pixels(img, rng_b).astype(int)
        assert rng_a.random() == rng_b.random()
        diffs.append(np.abs(a - b))
    assert np.mean([d.mean() for d in diffs]) < 0.05     # almost every pixel identical


def test_train_transform_is_a_function_of_the_rng():
    img = _photo()
    transform = ImageTransform(32, train=True)
    a, b = transform(img, random.Random(5)), transform(img, random.Random(5))
    c = transform(img, random.Random(6))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def _only(op: str, fix_overflow: bool = False) -> AugmentConfig:
    return AugmentConfig(randaug_n=1, randaug_p=1.0, randaug_ops=(op,), randaug_fix_overflow=fix_overflow)


def test_randaugment_ops_at_m7_match_the_reference_definitions():
    img = np.asarray(_photo(64, 48))
    factor = 0.1 + 1.8 * 0.7  # enhance level 7 of 10
    brightness = rand_augment(img, _only("brightness"), random.Random(0))
    assert np.array_equal(brightness, np.clip(img.astype(np.float32) * factor, 0, 255).astype(np.uint8))
    # equalize: PIL's, which the reference's tables reproduce
    ours = rand_augment(img, _only("equalize"), random.Random(0))
    assert np.abs(ours.astype(int) - np.asarray(ImageOps.equalize(Image.fromarray(img))).astype(int)).max() <= 1
    # with randaug_fix_overflow, autocontrast and sharpness are PIL's (sharpness: in the interior)
    ours = rand_augment(img, _only("autocontrast", fix_overflow=True), random.Random(0))
    pil = np.asarray(ImageOps.autocontrast(Image.fromarray(img)))
    assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1
    ours = rand_augment(img, _only("sharpness", fix_overflow=True), random.Random(0))
    pil = np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor))
    assert np.abs(ours[1:-1, 1:-1].astype(int) - pil[1:-1, 1:-1].astype(int)).max() <= 1
    out = rand_augment(img, _only("rotate"), random.Random(0))
    assert tuple(out[0, 0]) == FILL_RGB  # a corner uncovered by a 21 degree rotation
    out = rand_augment(img, _only("translate_x"), random.Random(0))
    assert np.all(out == FILL_RGB, axis=(0, 2)).sum() == 7  # 10 px * 7/10
    if np.all(out[:, :7] == FILL_RGB):
        assert np.array_equal(out[:, 7:], img[:, :-7])
    else:
        assert np.array_equal(out[:, :-7], img[:, 7:])
    out = rand_augment(img, _only("shear_x"), random.Random(0))
    assert np.array_equal(out[0], img[0])  # x' = x + 0.21 y leaves the top row in place
    assert np.all(out[-1, :9] == FILL_RGB) or np.all(out[-1, -9:] == FILL_RGB)  # 0.21 * 47 = 9.9 px


def test_reference_autocontrast_whitens_every_channel_whose_minimum_is_above_zero():
    """The reference negates the channel minimum as a uint8 (-low == 256 - low), which pushes the
    whole table above 255 unless low == 0; the default reproduces what the published models saw."""
    rng = np.random.default_rng(0)
    img = rng.integers(40, 200, (24, 32, 3)).astype(np.uint8)
    img[0, 0, 0] = 0    # channel 0 reaches 0: a genuine stretch to 0..255
    img[0, 1, 1] = 1    # channel 1 bottoms out at 1: saturated like channel 2 (minimum 40)
    ours = rand_augment(img, _only("autocontrast"), random.Random(0))
    ch0 = img[..., 0].astype(np.float64)
    stretched = (ch0 * (255.0 / ch0.max())).clip(0, 255).astype(np.uint8)
    assert np.array_equal(ours[..., 0], stretched)
    assert (ours[..., 1] == 255).all() and (ours[..., 2] == 255).all()
    fixed = rand_augment(img, _only("autocontrast", fix_overflow=True), random.Random(0))
    assert fixed[..., 1].min() == 0 and fixed[..., 2].min() == 0 and fixed[..., 2].max() == 255


def test_reference_sharpness_wraps_the_overshoot_modulo_256():
    """degenerate + 1.36 * (img - degenerate) leaves 0..255 at edges; the reference's uint8 cast
    truncates toward zero and wraps, the fixed variant clips."""
    rng = np.random.default_rng(1)
    img = np.where(rng.random((20, 24, 3)) < 0.5, 10, 245).astype(np.uint8)
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    degenerate = cv2.filter2D(img, -1, kernel).astype(np.float32)
    blend = degenerate + np.float32(0.1 + 1.8 * 0.7) * (img.astype(np.float32) - degenerate)
    inner = blend[1:-1, 1:-1]
    assert (inner > 256).any() and (inner < -1).any()  # the image really overshoots both ways
    ours = rand_augment(img, _only("sharpness"), random.Random(0))
    assert np.array_equal(ours[1:-1, 1:-1], (np.trunc(inner).astype(np.int64) % 256).astype(np.uint8))
    assert np.array_equal(ours[0], img[0]) and np.array_equal(ours[:, -1], img[:, -1])
    fixed = rand_augment(img, _only("sharpness", fix_overflow=True), random.Random(0))
    assert np.array_equal(fixed[1:-1, 1:-1], np.clip(inner, 0, 255).astype(np.uint8))


def test_rotate_warps_with_the_float64_rotation_matrix():
    img = np.random.default_rng(2).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    ours = rand_augment(img, _only("rotate"), random.Random(0))
    candidates = []
    for degrees in (21.0, -21.0):
        matrix = cv2.getRotationMatrix2D((64.0, 64.0), degrees, 1)
        exact = cv2.warpAffine(img, matrix, (128, 128), borderValue=FILL_RGB)
        rounded = cv2.warpAffine(img, matrix.astype(np.float32), (128, 128), borderValue=FILL_RGB)
        assert not np.array_equal(exact, rounded)  # float32 coefficients would move some pixels
        candidates.append(exact)
    assert any(np.array_equal(ours, c) for c in candidates)


def test_randaugment_applies_each_drawn_op_with_probability_half():
    img = np.asarray(_photo(32, 32))
    cfg = AugmentConfig(randaug_n=1, randaug_ops=("brightness",))
    rng = random.Random(0)
    changed = sum(not np.array_equal(rand_augment(img, cfg, rng), img) for _ in range(400))
    assert 160 < changed < 240


def test_augment_config_refuses_unknown_settings():
    with pytest.raises(ValueError, match="solarize"):
        AugmentConfig.from_dict({"randaug_ops": ["solarize"]})
    with pytest.raises(ValueError, match="crop_scal"):
        AugmentConfig.from_dict({"crop_scal": [0.5, 1.0]})
    assert AugmentConfig.from_dict({"crop_scale": [0.5, 1.0]}).crop_scale == (0.5, 1.0)
    assert AugmentConfig.from_dict({}).randaug_fix_overflow is False  # the reference's behaviour
    with pytest.raises(ValueError, match="randaug_fix_overflow='yes'"):
        AugmentConfig.from_dict({"randaug_fix_overflow": "yes"})
