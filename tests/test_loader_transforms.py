"""Caption cleaning and image transforms against the reference's definitions."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from torchvision import transforms as T

from pipeline.captions import pre_caption
from pipeline.transforms import (CLIP_MEAN, CLIP_STD, CROP_RATIO, FILL_RGB, AugmentConfig,
                                 ImageTransform, normalize_batch, rand_augment, random_resized_crop_box)


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


def test_test_transform_equals_torchvision_resize_totensor_normalize():
    img = _photo()
    reference = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    ours = ImageTransform(32, train=False)(img, random.Random(0))
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_normalize_batch_equals_per_sample_totensor_normalize():
    imgs = [_photo(16, 16, seed=s) for s in range(3)]
    batch = normalize_batch(torch.from_numpy(np.stack([np.asarray(i) for i in imgs])))
    reference = torch.stack([T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(i)) for i in imgs])
    torch.testing.assert_close(batch, reference, atol=1e-6, rtol=0)


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


def test_train_transform_is_a_function_of_the_rng():
    img = _photo()
    transform = ImageTransform(32, train=True)
    a, b = transform(img, random.Random(5)), transform(img, random.Random(5))
    c = transform(img, random.Random(6))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_randaugment_magnitudes_are_the_references_at_m7():
    img = _photo(64, 64)
    one = AugmentConfig(randaug_n=1, randaug_p=1.0, randaug_ops=("brightness",))
    expected = ImageEnhance.Brightness(img).enhance(0.1 + 1.8 * 0.7)
    assert np.array_equal(np.asarray(rand_augment(img, one, random.Random(0))), np.asarray(expected))
    rotate = AugmentConfig(randaug_n=1, randaug_p=1.0, randaug_ops=("rotate",))
    out = np.asarray(rand_augment(img, rotate, random.Random(0)))
    assert tuple(out[0, 0]) == FILL_RGB  # a corner uncovered by a 21 degree rotation
    translate = AugmentConfig(randaug_n=1, randaug_p=1.0, randaug_ops=("translate_x",))
    out = np.asarray(rand_augment(img, translate, random.Random(0)))
    filled_columns = np.all(out == FILL_RGB, axis=(0, 2)).sum()
    assert filled_columns == 7  # 10 px * 7/10


def test_randaugment_applies_each_drawn_op_with_probability_half():
    img = _photo(32, 32)
    cfg = AugmentConfig(randaug_n=1, randaug_ops=("brightness",))
    rng = random.Random(0)
    changed = sum(not np.array_equal(np.asarray(rand_augment(img, cfg, rng)), np.asarray(img))
                  for _ in range(400))
    assert 160 < changed < 240


def test_augment_config_refuses_unknown_settings():
    with pytest.raises(ValueError, match="solarize"):
        AugmentConfig.from_dict({"randaug_ops": ["solarize"]})
    with pytest.raises(ValueError, match="crop_scal"):
        AugmentConfig.from_dict({"crop_scal": [0.5, 1.0]})
    assert AugmentConfig.from_dict({"crop_scale": [0.5, 1.0]}).crop_scale == (0.5, 1.0)
