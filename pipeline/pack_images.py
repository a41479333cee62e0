"""Pack an image folder into tar shards that the downstream tasks read in place.

    python -m pipeline.pack_images IMAGE_ROOT OUT [--per-shard 5000] [--prefix images]

Each image file below IMAGE_ROOT becomes the tar member named by its path
relative to IMAGE_ROOT, bytes unchanged (no re-encoding: the fine-tuning
transforms see the same pixels as from the folder). The annotation files keep
naming images as before; a task config swaps `data.image_root: IMAGE_ROOT` for
`data.image_shards: OUT` (VQA: `vqa_shards` / `vg_shards`). Members are in
sorted path order with fixed owner, mode and time, so the same folder always
packs into the same bytes; every shard is written under a temporary name and
renamed when complete, and only `OUT/<prefix>-NNNNNN.tar` is ever written.

Symbolic links, files that are not images by their extension, and names a
tar index would refuse (pipeline/image_store.py) are skipped and counted; a
folder with no image exits non-zero.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

from pipeline.image_store import normalise_name
from pipeline.manifest import temporary_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(root: Path, skipped: Counter) -> list[str]:
    """Relative POSIX paths of the image files below `root`, sorted; links and others counted in `skipped`."""
    found = []
    for folder, dirs, files in os.walk(root):   # os.walk does not descend into linked folders
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                skipped["symbolic link"] += 1
            elif not name.lower().endswith(IMAGE_EXTENSIONS):
                skipped["not an image extension"] += 1
            elif normalise_name(rel) != rel:
                skipped["unusable name"] += 1
            else:
                found.append(rel)
    return found


def pack_images(root: str | Path, out: str | Path, per_shard: int = 5000, prefix: str = "images") -> dict:
    """Write the shards; returns {"shards": [...], "images": n, "skipped": {reason: n}}."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    if per_shard < 1:
        raise ValueError(f"--per-shard {per_shard} must be a positive integer")
    if not prefix or prefix.startswith(".") or any(ch in prefix for ch in "/\\\0"):
        raise ValueError(f"--prefix {prefix!r} must be a plain file name part (no '/', no leading '.')")
    skipped: Counter = Counter()
    names = image_files(root, skipped)
    if not names:
        raise ValueError(f"no image files below {root} (skipped: {dict(skipped) or 'nothing'})")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(names), per_shard)):
        shard = out / f"{prefix}-{number:06d}.tar"
        partial = temporary_name(shard)
        with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in names[start:start + per_shard]:
                data = (root / name).read_bytes()
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(partial, shard)
        shards.append(str(shard))
    return {"shards": shards, "images": len(names), "skipped": dict(skipped)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image_root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-shard", type=int, default=5000, help="images per tar shard")
    ap.add_argument("--prefix", default="images", help="shard file names: PREFIX-NNNNNN.tar")
    args = ap.parse_args(argv)
    try:
        result = pack_images(args.image_root, args.out, args.per_shard, args.prefix)
    except (OSError, ValueError) as exn:
        print(f"pack_images: {exn}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(result["skipped"].items())) or "none"
    print(f"packed {result['images']} images into {len(result['shards'])} shard(s) in {args.out} "
          f"(skipped: {skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
