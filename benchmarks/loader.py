"""Loader throughput per CPU core: the full pretraining sample path from shards, beside
(a) JPEG decoding alone (the ceiling) and (b) a plain map-style Dataset reading the same
images from files with the same transforms, in one run, printed as JSON.

    python benchmarks/loader.py [--images 512] [--side 384] [--res 256] [--batch 64] [--workers 0]
                                [--device cuda]

Both loader paths are measured: the whole augmentation on the loader's core
(`shard_loader_full_path`) and `augment.on_device` (`shard_loader_augment_on_device`:
the core reads, decodes, draws and crops; resize, flip and RandAugment run on the
training device). The device's half is timed on this core too
(`device_half_on_one_cpu_core_ms_per_sample`, what a CPU-only run would pay) and,
with `--device`, on that device (wall clock).

Everything runs in this one process with one torch and one OpenCV thread,
timed in process CPU time, so each figure is samples/s on one core. `breakdown_ms_per_sample` times the stages of the
sample path separately on the same images (tar reading, decode, crop+resize,
flip+RandAugment, batch normalisation, tokenisation), which is what the gap
between the loader and the decode-only ceiling is made of. The stages run
over all images at once (hundreds of MB of decoded pixels, out of cache),
so their sum can exceed the loader's own per-sample time, where each image
goes through every stage while it is still in cache. `--workers N`
adds the loader (both paths) with N DataLoader worker processes (wall-clock samples/s of
the whole machine; on a shared machine it measures the machine as much as
the loader).

Images are photo-like JPEGs (gradients under noise, quality 90), 384 pixels
on the short side as the download stage stores them, wider ones up to 4:3.
Each measurement is the best of `--repeats` passes (other processes on a
shared machine only ever slow a pass down).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.captions import pre_caption  # noqa: E402
from pipeline.loader import ShardLoader  # noqa: E402
from pipeline.manifest import MANIFEST_NAME, manifest_for_shards  # noqa: E402
from pipeline.shards import read_segment  # noqa: E402
from pipeline.tokenize import load_tokenizer, text_batch  # noqa: E402
from pipeline.images import decode_rgb  # noqa: E402
from pipeline.transforms import (ImageTransform, normalize_images, rand_augment, random_resized_crop_box,  # noqa: E402
                                crop_box, resize_bicubic, stack_pixels)

VOCAB = "configs/tiny_vocab.txt"
WORDS = ("a", "dog", "cat", "man", "woman", "on", "the", "grass", "street", "with", "red", "blue", "car")
SHARDS = 4
JPEG_QUALITY = 90
NOISE_SIGMA = 12
MAX_ASPECT = 4 / 3


def make_data(folder: Path, count: int, side: int, seed: int) -> tuple[str, list[Path], list[str]]:
    """Image files, the same images in shards (+ manifest); returns (spec, files, captions)."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    files, captions = [], []
    (folder / "files").mkdir()
    per_shard = -(-count // SHARDS)
    writers = [wds.TarWriter(str(folder / f"{k:05d}.tar"), encoder=False) for k in range(SHARDS)]
    for i in range(count):
        width = int(rng.integers(side, int(side * MAX_ASPECT) + 1))
        ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(ramp + rng.normal(0, NOISE_SIGMA, (side, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        caption = "A " + " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + "."
        path = folder / "files" / f"{i:06d}.jpg"
        path.write_bytes(buffer.getvalue())
        files.append(path)
        captions.append(caption)
        writers[i // per_shard].write({"__key__": f"{i:06d}", "jpg": buffer.getvalue(),
                                       "txt": caption.encode()})
    counts = {}
    for k, writer in enumerate(writers):
        writer.close()
        counts[f"{k:05d}.tar"] = min(per_shard, max(0, count - k * per_shard))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest_for_shards(counts)))
    return f"{folder}/{{00000..{SHARDS - 1:05d}}}.tar", files, captions


class FileDataset(Dataset):
    """The plain map-style baseline: one file per image, the same decode, transform and caption cleaning."""

    def __init__(self, files: list[Path], captions: list[str], transform: ImageTransform):
        self.files, self.captions, self.transform = files, captions, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        # uint8 pixels, normalised once per batch in the collate: the loader's own copies, no more
        image = decode_rgb(str(self.files[i]))
        return self.transform.pixels(image, random.Random(i)), pre_caption(self.captions[i])


def fastest_seconds(cases: dict[str, callable], repeats: int, clock=time.process_time) -> dict[str, float]:
    """Fastest of `repeats` timings per case, the cases interleaved round by round so that
    other load on a shared machine spreads over all of them alike. The default clock is
    this process's CPU time: samples per CPU-second is samples/s per core, and time spent
    waiting for a core that another process holds does not count."""
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = clock()
            run()
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=384, help="short side of the stored JPEGs")
    parser.add_argument("--res", type=int, default=256, help="training resolution")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="also run the loader with this many workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None,
                        help="also time the device half of augment.on_device there (e.g. cuda), wall clock")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec, files, captions = make_data(folder, args.images, args.side, args.seed)
        jpegs = [f.read_bytes() for f in files]
        tokenizer = load_tokenizer(str(REPO / VOCAB))
        transform = ImageTransform(args.res, train=True)
        n = args.images
        rng = random.Random(args.seed)
        per_shard = -(-n // SHARDS)

        def decode_all():  # what SampleDecoder does to an RGB JPEG: open, load
            images = [Image.open(io.BytesIO(b)) for b in jpegs]
            for image in images:
                image.load()
            return images

        def map_style():
            loader = DataLoader(FileDataset(files, captions, transform), batch_size=args.batch, shuffle=True,
                                num_workers=0, collate_fn=lambda items: (
                                    stack_pixels([x for x, _ in items]),
                                    text_batch(tokenizer, [c for _, c in items], args.max_tokens)))
            for _ in loader:
                pass

        def shard_loader(workers: int, on_device: bool = False):
            loader = ShardLoader(spec, tokenizer, batch_size=args.batch, num_workers=workers,
                                 seed=args.seed, image_res=args.res, max_tokens=args.max_tokens,
                                 augment={"on_device": on_device})
            return loader, lambda: [None for _ in loader]

        loader, run_loader = shard_loader(0)
        # augment.on_device: the loader's core reads, decodes, crops; the device does the rest
        crops_loader, run_crops_loader = shard_loader(0, on_device=True)
        crop_batches = list(crops_loader)

        def device_half_on_cpu():   # what the device does, here on this CPU core (a CPU-only run pays it)
            for batch in crop_batches:
                crops_loader.images(batch, torch.device("cpu"))

        # the stages of the loader's sample path, separately, on the same images
        def read_tars():
            for k in range(SHARDS):
                for _ in read_segment(f"{folder}/{k:05d}.tar", 0, min(per_shard, n - k * per_shard)):
                    pass

        decoded = decode_all()

        def crop_resize(backend: str = transform.augment.resize_backend):
            return [resize_bicubic(crop_box(img, random_resized_crop_box(img.width, img.height,
                                                                         transform.augment.crop_scale, rng)),
                                   args.res, backend)
                    for img in decoded]

        crops = crop_resize()

        def augment():
            for img in crops:
                rand_augment(np.ascontiguousarray(img[:, ::-1]) if rng.random() < transform.augment.flip_p else img,
                             transform.augment, rng)

        def stack():   # the loader hands over uint8; normalising happens on the training device
            for i in range(0, n, args.batch):
                stack_pixels(crops[i:i + args.batch])

        def normalize():   # what that costs where it is done on a CPU (a CPU-only run)
            for i in range(0, n, args.batch):
                normalize_images(stack_pixels(crops[i:i + args.batch]))

        def text():
            text_batch(tokenizer, [pre_caption(c) for c in captions], args.max_tokens)

        samples = {"decode_only": n, "map_style_files_same_transforms": n - n % args.batch,
                   "shard_loader_full_path": loader.samples_per_epoch,
                   "shard_loader_augment_on_device": crops_loader.samples_per_epoch}
        seconds = fastest_seconds({"decode_only": decode_all, "map_style_files_same_transforms": map_style,
                                   "shard_loader_full_path": run_loader,
                                   "shard_loader_augment_on_device": run_crops_loader,
                                   "device_half_on_cpu": device_half_on_cpu, "tar_read": read_tars,
                                   "crop_resize_bicubic": crop_resize, "flip_randaugment": augment,
                                   "crop_resize_bicubic_pil": lambda: crop_resize("pil"),
                                   "stack_uint8": stack, "caption_clean_tokenize": text,
                                   "normalize_on_cpu": normalize},
                                  args.repeats)
        rates = {name: samples[name] / seconds[name] for name in samples}
        breakdown = {name: 1000.0 * seconds[name] / n for name in
                     ("tar_read", "crop_resize_bicubic", "flip_randaugment", "stack_uint8",
                      "caption_clean_tokenize")}
        breakdown = {"tar_read": breakdown.pop("tar_read"), "decode": 1000.0 / rates["decode_only"], **breakdown}
        breakdown["sum_of_stages"] = sum(breakdown.values())
        loader_ms = 1000.0 / rates["shard_loader_full_path"]
        breakdown["loader_minus_sum_of_stages"] = loader_ms - breakdown["sum_of_stages"]
        pil_resize_ms = 1000.0 * seconds["crop_resize_bicubic_pil"] / n

        result = {
            "settings": {"images": n, "stored_short_side": args.side, "res": args.res, "batch": args.batch,
                         "mean_jpeg_kb": round(sum(map(len, jpegs)) / n / 1024, 1),
                         "torch_threads": torch.get_num_threads(), "repeats": args.repeats},
            "samples_per_s_per_core": {name: round(rate, 1) for name, rate in rates.items()},
            "loader_vs_decode_only": round(rates["shard_loader_full_path"] / rates["decode_only"], 3),
            # the loader's core with augment.on_device: decode, crop, tar, text (the rest runs on the device)
            "loader_augment_on_device_vs_decode_only": round(rates["shard_loader_augment_on_device"]
                                                             / rates["decode_only"], 3),
            # the device's half of augment.on_device timed on this core: what a CPU-only run would pay
            "device_half_on_one_cpu_core_ms_per_sample": round(1000.0 * seconds["device_half_on_cpu"]
                                                                / crops_loader.samples_per_epoch, 3),
            "loader_vs_map_style": round(rates["shard_loader_full_path"]
                                         / rates["map_style_files_same_transforms"], 3),
            "breakdown_ms_per_sample": {k: round(v, 3) for k, v in breakdown.items()},
            "loader_ms_per_sample": round(loader_ms, 3),
            # the same crops resized by PIL (augment.resize_backend: pil, bit for bit the reference)
            "normalize_on_cpu_ms_per_sample": round(1000.0 * seconds["normalize_on_cpu"] / n, 3),
            "crop_resize_ms_per_sample": {"pil": round(pil_resize_ms, 3),
                                          transform.augment.resize_backend: round(breakdown["crop_resize_bicubic"], 3)},
        }
        if args.workers:
            for on_device, suffix in ((False, ""), (True, "_augment_on_device")):
                multi, run_multi = shard_loader(args.workers, on_device)
                wall = fastest_seconds({"multi": run_multi}, args.repeats, clock=time.perf_counter)["multi"]
                result[f"shard_loader_{args.workers}_workers{suffix}_samples_per_s_wall"] = round(
                    multi.samples_per_epoch / wall, 1)
        if args.device:
            device = torch.device(args.device)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

            def device_half():
                for batch in crop_batches:
                    crops_loader.images(batch, device)
                sync()

            device_half()   # warm-up: kernels, caches
            wall = fastest_seconds({"device": device_half}, args.repeats, clock=time.perf_counter)["device"]
            result[f"device_half_ms_per_sample_on_{device.type}_wall"] = round(
                1000.0 * wall / crops_loader.samples_per_epoch, 4)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
