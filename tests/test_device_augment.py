"""augment.on_device: the device's half of the pretraining augmentation against the loader's own.

Stated tolerances (pipeline/device_augment.py): lookup-table ops and sharpness give the host's
bytes; on a CPU device the whole path is the host's, bit for bit, but for the geometric ops
(bilinear sampling vs OpenCV's fixed-point warp: mean |diff| <= 0.5 grey levels, max <= 6); the
float resize other devices use is at most 1 level per pass from the uint8 kernel.
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.engine.settings import ImageData
from model.tasks.pretrain import PretrainData
from pipeline.device_augment import _DEVICE_OPS, augment_on_device, crop_pixels, pack_crops
from pipeline.loader import ShardLoader
from pipeline.tokenize import load_tokenizer
from pipeline.transforms import (ALBEF_RANDAUG_OPS, GEOMETRIC_OPS, AugmentConfig, ImageTransform, _OP_ARGUMENT,
                                 apply_rand_augment, normalize_images)

CPU = torch.device("cpu")
NON_GEOMETRIC = tuple(op for op in ALBEF_RANDAUG_OPS if op not in GEOMETRIC_OPS)


def _noisy(rng: np.random.Generator, h: int, w: int, lift: int = 0) -> np.ndarray:
    ramp = np.linspace(0, 255, w)[None, :, None] * rng.random(3)
    return np.clip(ramp + rng.normal(0, 40, (h, w, 3)) + lift, 0, 255).astype(np.uint8)


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [_noisy(rng, int(rng.integers(40, 70)), int(rng.integers(40, 90)), lift=int(rng.integers(-40, 80)))
              for _ in range(count)]
    images[0][..., 1] = 77   # a flat channel: autocontrast and equalize leave it alone
    return images


def _device_op(name: str, images: list[np.ndarray], args: list[float], fix: bool) -> list[np.ndarray]:
    out = []
    for image, arg in zip(images, args):   # one at a time: the images differ in size
        x = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
        out.append(_DEVICE_OPS[name](x, [arg], fix)[0].permute(1, 2, 0).numpy())
    return out


@pytest.mark.parametrize("fix", [False, True])
@pytest.mark.parametrize("name", [op for op in NON_GEOMETRIC if op != "identity"])
def test_lookup_ops_and_sharpness_give_the_host_bytes(name, fix):
    images = _images(12)
    for level in (1, 7, 10):
        args = [_OP_ARGUMENT[name](level)] * len(images)
        host = [apply_rand_augment(image, [(name, arg)], fix) for image, arg in zip(images, args)]
        for ours, theirs in zip(_device_op(name, images, args, fix), host):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", GEOMETRIC_OPS)
def test_geometric_ops_within_the_stated_tolerance(name):
    images = _images(8, seed=1)
    magnitude = _OP_ARGUMENT[name](10)
    args = [magnitude if i % 2 else -magnitude for i in range(len(images))]
    host = np.concatenate([apply_rand_augment(im, [(name, a)], False).ravel() for im, a in zip(images, args)])
    ours = np.concatenate([x.ravel() for x in _device_op(name, images, args, False)])
    diff = np.abs(host.astype(int) - ours.astype(int))
    assert diff.mean() <= 0.5 and diff.max() <= 6, (diff.mean(), diff.max())
    assert (diff > 2).mean() <= 0.005


def _pil_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(_noisy(rng, int(rng.integers(90, 140)), int(rng.integers(90, 180))))
            for _ in range(count)]


def _both_paths(images, augment: AugmentConfig, res: int = 64, float_resize: bool = False):
    transform = ImageTransform(res, train=True, augment=augment)
    host = np.stack([transform.pixels(im, random.Random(i)) for i, im in enumerate(images)])
    plans = [transform.plan(im.width, im.height, random.Random(i)) for i, im in enumerate(images)]
    batch = pack_crops([crop_pixels(im, p.box) for im, p in zip(images, plans)], plans, augment.randaug_n)
    ours = augment_on_device(batch, res, augment, CPU, float_resize=float_resize)
    return host, ours.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("fix", [False, True])
def test_on_a_cpu_device_the_path_is_the_hosts_bit_for_bit_without_warps(fix):
    images = _pil_images(24)
    host, ours = _both_paths(images, AugmentConfig(randaug_ops=NON_GEOMETRIC, randaug_fix_overflow=fix,
                                                   randaug_p=0.9, on_device=True))
    np.testing.assert_array_equal(ours, host)


def test_the_whole_augmentation_stays_within_the_warp_tolerance():
    host, ours = _both_paths(_pil_images(24), AugmentConfig(on_device=True))
    diff = np.abs(host.astype(int) - ours.astype(int))
    assert diff.mean() <= 0.1
    assert (diff > 2).mean() <= 0.002


def test_the_float_resize_is_one_level_per_pass_from_the_uint8_kernel():
    augment = AugmentConfig(randaug_ops=("identity",), on_device=True)
    host, ours = _both_paths(_pil_images(24), augment, float_resize=True)
    diff = np.abs(host.astype(int) - ours.astype(int))
    assert diff.max() <= 2 and (diff > 1).mean() <= 1e-4 and diff.mean() <= 0.01


def test_a_crop_already_at_the_resolution_is_only_flipped():
    image = Image.fromarray(_noisy(np.random.default_rng(0), 64, 64))
    augment = AugmentConfig(randaug_ops=("identity",), on_device=True)
    plan_flip = ImageTransform(64, train=True, augment=augment).plan(64, 64, random.Random(0))
    plan = type(plan_flip)((0, 0, 64, 64), True, ())
    batch = pack_crops([crop_pixels(image, plan.box)], [plan], 2)
    ours = augment_on_device(batch, 64, augment, CPU)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, np.asarray(image)[:, ::-1])


@pytest.fixture(scope="module")
def tokenizer(tiny_shards_vocab):
    return load_tokenizer(tiny_shards_vocab)


def _loader(spec, tokenizer, **augment):
    return ShardLoader(spec, tokenizer, batch_size=4, seed=3, image_res=32, augment=augment)


def test_shard_loader_hands_crops_and_plans_and_its_images_match_the_host_path(tiny_shards, tokenizer):
    ops = {"randaug_ops": list(NON_GEOMETRIC), "randaug_p": 0.9}
    host, device = _loader(tiny_shards.spec, tokenizer, **ops), _loader(tiny_shards.spec, tokenizer,
                                                                        on_device=True, **ops)
    for a, b in zip(host, device, strict=True):
        assert "image" not in b and {"image_crops", "image_shapes", "image_plan"} <= set(b)
        assert a["__key__"] == b["__key__"] and torch.equal(a["input_ids"], b["input_ids"])
        assert b["image_crops"].dtype == torch.uint8 and b["image_shapes"].shape == (4, 2)
        assert torch.equal(device.images(b, CPU), host.images(a, CPU))
        assert torch.equal(host.images(a, CPU), normalize_images(a["image"]))


def test_shard_loader_on_device_resumes_exactly(tiny_shards, tokenizer):
    straight = [b for b in _loader(tiny_shards.spec, tokenizer, on_device=True)]
    first = _loader(tiny_shards.spec, tokenizer, on_device=True)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 2:
            break
    resumed = _loader(tiny_shards.spec, tokenizer, on_device=True)
    resumed.load_state_dict(first.state_dict())
    rest = [b for b in resumed]
    assert len(seen) + len(rest) == len(straight)
    for a, b in zip(seen + rest, straight):
        assert a["__key__"] == b["__key__"]
        for key in ("image_crops", "image_shapes", "image_plan"):
            assert torch.equal(a[key], b[key]), key


def test_settings_refuse_on_device_where_it_cannot_work():
    with pytest.raises(ValueError, match="resize_backend='pil' needs on_device: false"):
        AugmentConfig.from_dict({"on_device": True, "resize_backend": "pil"})
    with pytest.raises(ValueError, match="on_device=1 must be true or false"):
        AugmentConfig.from_dict({"on_device": 1})
    with pytest.raises(ValueError, match="only the pretraining shard loader"):
        ImageData(image_root="x", augment={"on_device": True}).check("data")
    PretrainData(shards="x.tar", augment={"on_device": True}).check("data")


def test_the_gpu_recipe_augments_on_the_device_and_the_cpu_configs_on_the_loader():
    from model.engine.config import load_config
    from tests.fixtures.model import BASE_CONFIG, TINY_CONFIG
    for config in (BASE_CONFIG, BASE_CONFIG.with_name("nlvr_pretrain.yaml")):
        assert AugmentConfig.from_dict(load_config(config)["data"]["augment"]).on_device is True
    for config in (TINY_CONFIG, TINY_CONFIG.with_name("demo.yaml"),
                   TINY_CONFIG.with_name("nlvr_pretrain_tiny.yaml")):
        assert AugmentConfig.from_dict(load_config(config)["data"]["augment"]).on_device is False
