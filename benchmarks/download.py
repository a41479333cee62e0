"""Download-stage throughput: rows/s of `python -m pipeline.download` against a local server,
and of packing the same images from disk, printed as JSON.

    python benchmarks/download.py [--rows 2000] [--processes 2] [--threads 64]

The served images are photo-like JPEGs (noise over gradients, 640x480, about
the size of a CC3M original) so decoding, resizing to 384 and re-encoding cost
what they cost on real data; the network is loopback, so this is the CPU
ceiling of the stage, not a prediction of a web download (bounded by remote
servers' latency, which threads hide). Rows repeat a pool of distinct images
under distinct query strings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.serve_images import serve_folder  # noqa: E402


def make_images(folder: Path, count: int, width: int, height: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        name = f"photo{i:03d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


def run_stage(args: list[str]) -> dict:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.download", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pipeline.download failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["wall_seconds_with_startup"] = round(wall, 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--distinct-images", type=int, default=64)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        names = make_images(images, args.distinct_images, args.width, args.height, args.seed)
        mean_kb = np.mean([(images / n).stat().st_size for n in names]) / 1024
        common = ["--processes", str(args.processes), "--threads", str(args.threads),
                  "--samples-per-shard", str(args.samples_per_shard)]
        with serve_folder(images) as base:
            tsv = tmp / "cc3m.tsv"
            tsv.write_text("".join(f"caption {i}\t{base}/{names[i % len(names)]}?row={i}\n"
                                   for i in range(args.rows)))
            web = run_stage(["--source", "cc3m", "--input", str(tsv), "--output", str(tmp / "web"),
                             *common])
        ann = tmp / "local.json"
        ann.write_text(json.dumps([{"image": str(images / names[i % len(names)]), "caption": f"c {i}"}
                                   for i in range(args.rows)]))
        local = run_stage(["--source", "coco", "--input", str(ann), "--output", str(tmp / "local"),
                           *common])

    print(json.dumps({
        "rows": args.rows, "image": f"{args.width}x{args.height} JPEG, {mean_kb:.0f} KiB",
        "processes": args.processes, "threads": args.threads, "cpus": os.cpu_count(),
        "download_rows_per_s": web["rows_per_second"],
        "download_seconds": web["seconds"],
        "download_wall_seconds_with_startup": web["wall_seconds_with_startup"],
        "pack_rows_per_s": local["rows_per_second"],
        "pack_seconds": local["seconds"],
        "samples": {"download": web["manifest"]["total_samples"], "pack": local["manifest"]["total_samples"]},
    }, indent=2))


if __name__ == "__main__":
    main()
