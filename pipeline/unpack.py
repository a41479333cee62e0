"""Retrieval annotations from WebDataset shards: `python -m pipeline.unpack SPEC OUT`.

Retrieval reads the Karpathy annotation format with an image folder
(`pipeline/annotations.py`). Shards that the download stage made from such a
list hold one sample per image-caption row; this turns them back into that
format. Each distinct image (by the `url` its sample came from, which is the
source path or URL; else the sample key) is written once under `OUT/images/`,
its captions gathered in shard order. Written: `OUT/train.json`
(`{image, caption, image_id}`, for `data.train_file`), `OUT/eval.json`
(`{image, caption: [...]}`, for `data.test_file` / `data.val_file`), with
`data.image_root=OUT`. Samples without an image or a caption are skipped and
counted, as are slots of shards that could not be read. Image files are
named after sample keys, and a key comes from a tar member's name, which
anyone can set: a key that could land outside `OUT/images/` (absolute, `..`,
`.`, empty parts, backslashes; see `pipeline.shards.is_safe_key`) is skipped
and counted as `unsafe_key`, and one whose file another image already took
as `duplicate_key`.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from pipeline.shards import is_safe_key, read_segment, redact, resolve_sources

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _caption(files: dict[str, bytes]) -> str:
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace").strip()
    if "json" in files:
        caption = json.loads(files["json"]).get("caption")
        return caption.strip() if isinstance(caption, str) else ""
    return ""


def _identity(key: str, files: dict[str, bytes]) -> str:
    if "json" in files:
        url = json.loads(files["json"]).get("url")
        if isinstance(url, str) and url:
            return url
    return key


def unpack(spec: str, out: str | Path) -> dict:
    """Write images and the two annotation files; returns the counts."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    inside = (out / "images").resolve()
    images: dict[str, dict] = {}  # identity -> {"image": relative path, "captions": [...]}
    written: set[str] = set()
    counts: Counter = Counter()
    for source in resolve_sources(spec):
        for shard in source.shards:
            for sample in read_segment(shard.url, 0, shard.samples):
                if sample.reason:
                    counts[sample.reason] += 1
                    continue
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample.files), None)
                caption = _caption(sample.files)
                if ext is None or not sample.files[ext]:
                    counts["no_image"] += 1
                    continue
                if not caption:
                    counts["empty_caption"] += 1
                    continue
                identity = _identity(sample.key, sample.files)
                if identity not in images:
                    rel = f"images/{sample.key}.{ext}"
                    path = out / rel
                    if not is_safe_key(sample.key) or not path.resolve().is_relative_to(inside):
                        log.warning("%s: sample key %r is not a safe file name; skipped", redact(shard.url),
                                    sample.key)
                        counts["unsafe_key"] += 1
                        continue
                    if rel in written:
                        log.warning("%s: sample key %r names a file already written; skipped",
                                    redact(shard.url), sample.key)
                        counts["duplicate_key"] += 1
                        continue
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(sample.files[ext])
                    written.add(rel)
                    images[identity] = {"image": rel, "captions": []}
                images[identity]["captions"].append(caption)
                counts["pairs"] += 1
    entries = list(images.values())
    train = [{"image": e["image"], "caption": c, "image_id": i} for i, e in enumerate(entries) for c in e["captions"]]
    evaluation = [{"image": e["image"], "caption": e["captions"]} for e in entries]
    (out / "train.json").write_text(json.dumps(train))
    (out / "eval.json").write_text(json.dumps(evaluation))
    return {"images": len(entries), **dict(counts)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="shard spec (pipeline/shards.py syntax)")
    ap.add_argument("out", type=Path, help="folder for images/, train.json and eval.json")
    args = ap.parse_args(argv)
    print(json.dumps(unpack(args.spec, args.out)))


if __name__ == "__main__":
    main()
