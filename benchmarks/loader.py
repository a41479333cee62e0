"""Loader throughput per CPU core: the full pretraining sample path from shards, beside
(a) JPEG decoding alone (the ceiling) and (b) a plain map-style Dataset reading the same
images from files with the same transforms, in one run, printed as JSON.

    python benchmarks/loader.py [--images 512] [--side 384] [--res 256] [--batch 64] [--workers 0]

Everything runs in this one process with one torch thread, so each figure is
samples/s on one core. `breakdown_ms_per_sample` times the stages of the
sample path separately on the same images (tar reading, decode, crop+resize,
flip+RandAugment, batch normalisation, tokenisation), which is what the gap
between the loader and the decode-only ceiling is made of. `--workers N`
adds the loader with N DataLoader worker processes (whole-machine figure;
on a shared machine it measures the machine as much as the loader).

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
from pipeline.transforms import ImageTransform, normalize_batch, rand_augment, random_resized_crop_box  # noqa: E402

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
    """The plain map-style baseline: one file per image, the same transform and caption cleaning."""

    def __init__(self, files: list[Path], captions: list[str], transform: ImageTransform):
        self.files, self.captions, self.transform = files, captions, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = Image.open(self.files[i]).convert("RGB")
        return self.transform(image, random.Random(i)), pre_caption(self.captions[i])


def best_rate(samples: int, run, repeats: int) -> float:
    """Samples per second of the fastest of `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return samples / best


def best_ms_per_sample(samples: int, run, repeats: int) -> float:
    return 1000.0 / best_rate(samples, run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=384, help="short side of the stored JPEGs")
    parser.add_argument("--res", type=int, default=256, help="training resolution")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="also run the loader with this many workers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec, files, captions = make_data(folder, args.images, args.side, args.seed)
        jpegs = [f.read_bytes() for f in files]
        tokenizer = load_tokenizer(str(REPO / VOCAB))
        transform = ImageTransform(args.res, train=True)
        n = args.images

        def decode_all():
            return [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]

        decoded = decode_all()
        rate_decode = best_rate(n, decode_all, args.repeats)

        def map_style():
            loader = DataLoader(FileDataset(files, captions, transform), batch_size=args.batch, shuffle=True,
                                num_workers=0, collate_fn=lambda items: (
                                    torch.stack([x for x, _ in items]),
                                    text_batch(tokenizer, [c for _, c in items], args.max_tokens)))
            for _ in loader:
                pass

        rate_map = best_rate(n - n % args.batch, map_style, args.repeats)

        def shard_loader(workers: int):
            loader = ShardLoader(spec, tokenizer, batch_size=args.batch, num_workers=workers,
                                 seed=args.seed, image_res=args.res, max_tokens=args.max_tokens)
            return lambda: [None for _ in loader]

        rate_loader = best_rate(ShardLoader(spec, tokenizer, batch_size=args.batch, image_res=args.res)
                                .samples_per_epoch, shard_loader(0), args.repeats)

        # the stages of the loader's sample path, on the same images
        rng = random.Random(args.seed)
        size = (args.res, args.res)

        def read_tars():
            for k in range(SHARDS):
                for _ in read_segment(f"{folder}/{k:05d}.tar", 0, -(-n // SHARDS) if k < SHARDS - 1
                                      else n - (SHARDS - 1) * -(-n // SHARDS)):
                    pass

        def crop_resize():
            return [img.resize(size, Image.Resampling.BICUBIC,
                               box=_box(random_resized_crop_box(img.width, img.height,
                                                                transform.augment.crop_scale, rng)))
                    for img in decoded]

        crops = crop_resize()

        def augment():
            for img in crops:
                if rng.random() < transform.augment.flip_p:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                rand_augment(img, transform.augment, rng)

        breakdown = {
            "tar_read": best_ms_per_sample(n, read_tars, args.repeats),
            "decode": 1000.0 / rate_decode,
            "crop_resize_bicubic": best_ms_per_sample(n, crop_resize, args.repeats),
            "flip_randaugment": best_ms_per_sample(n, augment, args.repeats),
            "to_array_stack_normalize": best_ms_per_sample(
                n, lambda: [normalize_batch(torch.from_numpy(np.stack([np.asarray(c) for c in crops[i:i + args.batch]])))
                            for i in range(0, n, args.batch)], args.repeats),
            "caption_clean_tokenize": best_ms_per_sample(
                n, lambda: text_batch(tokenizer, [pre_caption(c) for c in captions], args.max_tokens),
                args.repeats),
        }
        breakdown["sum_of_stages"] = sum(breakdown.values())

        result = {
            "settings": {"images": n, "stored_short_side": args.side, "res": args.res, "batch": args.batch,
                         "mean_jpeg_kb": round(sum(map(len, jpegs)) / n / 1024, 1),
                         "torch_threads": torch.get_num_threads()},
            "samples_per_s_per_core": {
                "decode_only": round(rate_decode, 1),
                "map_style_files_same_transforms": round(rate_map, 1),
                "shard_loader_full_path": round(rate_loader, 1),
            },
            "loader_vs_decode_only": round(rate_loader / rate_decode, 3),
            "loader_vs_map_style": round(rate_loader / rate_map, 3),
            "breakdown_ms_per_sample": {k: round(v, 3) for k, v in breakdown.items()},
            "loader_ms_per_sample": round(1000.0 / rate_loader, 3),
        }
        if args.workers:
            loader = ShardLoader(spec, tokenizer, batch_size=args.batch, num_workers=args.workers,
                                 image_res=args.res)
            result[f"shard_loader_{args.workers}_workers_samples_per_s"] = round(
                best_rate(loader.samples_per_epoch, shard_loader(args.workers), args.repeats), 1)
        print(json.dumps(result, indent=2))


def _box(crop: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    left, top, w, h = crop
    return left, top, left + w, top + h


if __name__ == "__main__":
    main()
