"""Where the downstream tasks' images come from: a folder, or WebDataset shards read in place.

The annotation files of every task (retrieval, SNLI-VE, NLVR2, VQA, grounding)
name images by a path relative to an image root ("train2014/COCO_..._581857.jpg",
"dev/dev-850-0-img0.png"; SNLI-VE names an id and the file is "<id>.jpg"). Two
stores resolve those names:

- `FolderImages(root)`: the file `root/name` (absolute names stay as they are).
- `ShardImages(spec)`: the member `name` of uncompressed tar shards, i.e. the
  WebDataset sample whose key is the name without its extension and whose
  component is that extension. `tar cf images-000.tar -C ROOT train2014/...`
  or `python -m pipeline.pack_images` makes such shards from a folder. The
  shards are indexed once (member name -> shard, byte offset, size) and read
  with one seek per image, so map-style datasets keep random access, exact
  resume and per-sample augmentation seeds whichever store they use.

Shards are untrusted input: nothing is ever extracted; only regular members
with a safe relative name are indexed (links, devices, absolute names and
names with '..' are counted as skipped and never served); a name found twice
is refused, naming both places. Shards must be local files (a network
filesystem mount counts); compressed tars cannot be read in place and are
refused with the reason.
"""
from __future__ import annotations

import glob
import os
import posixpath
import tarfile
from collections import Counter
from pathlib import Path
from typing import Sequence, Union

import braceexpand
from PIL import Image

from pipeline.images import decode_rgb

SKIPPED_NOT_FILE = "not a regular file"
SKIPPED_UNSAFE_NAME = "unsafe member name"


def normalise_name(name: str) -> str | None:
    """The canonical form of a member or annotation name ("./a//b.jpg" -> "a/b.jpg"); None if unsafe."""
    if not name or "\\" in name or "\0" in name or name.startswith("/"):
        return None
    clean = posixpath.normpath(name)
    if clean in (".", "") or clean.startswith("../") or clean == "..":
        return None
    return clean


class FolderImages:
    """Images as files below `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)

    def __repr__(self) -> str:
        return f"folder {self.root}"

    def locate(self, name: str) -> str:
        return os.path.join(self.root, name)

    def exists(self, ref: str) -> bool:
        return os.path.isfile(ref)

    def load(self, ref: str) -> Image.Image:
        return decode_rgb(ref)


class ShardImages:
    """Images as members of local tar shards, indexed once; `locate` gives the member name."""

    def __init__(self, spec: str | Sequence[str]):
        self.shards = expand_shards(spec)
        self.index: dict[str, tuple[int, int, int]] = {}    # name -> (shard number, data offset, size)
        self.skipped: Counter = Counter()
        for number, path in enumerate(self.shards):
            self._index_shard(number, path)
        if not self.index:
            raise ValueError(f"image shards {spec!r} hold no image files"
                             + (f" (skipped: {dict(self.skipped)})" if self.skipped else ""))

    def __repr__(self) -> str:
        return f"{len(self.shards)} shard(s) from {self.shards[0]}"

    def _index_shard(self, number: int, path: str) -> None:
        try:
            with tarfile.open(path, mode="r:") as tar:   # "r:": uncompressed only, the one kind that seeks
                for member in tar:
                    if not member.isfile():
                        self.skipped[SKIPPED_NOT_FILE] += 1
                        continue
                    name = normalise_name(member.name)
                    if name is None:
                        self.skipped[SKIPPED_UNSAFE_NAME] += 1
                        continue
                    if name in self.index:
                        first = self.shards[self.index[name][0]]
                        raise ValueError(f"image shards: {name!r} is in {first} and again in {path}; "
                                         f"a name must be unique across the shards")
                    self.index[name] = (number, member.offset_data, member.size)
        except tarfile.ReadError as exn:
            raise ValueError(f"image shard {path} is not an uncompressed tar file ({exn}); images are read "
                             f"in place, which needs plain .tar shards") from exn
        except OSError as exn:
            raise ValueError(f"image shard {path} cannot be read: {exn}") from exn

    def locate(self, name: str) -> str:
        return normalise_name(name) or name

    def exists(self, ref: str) -> bool:
        return ref in self.index

    def read(self, ref: str) -> bytes:
        if ref not in self.index:
            raise FileNotFoundError(f"image {ref!r} is not in the image shards ({self!r})")
        number, offset, size = self.index[ref]
        with open(self.shards[number], "rb") as file:   # opened per read: safe in forked loader workers
            file.seek(offset)
            data = file.read(size)
        if len(data) != size:
            raise OSError(f"image {ref!r}: shard {self.shards[number]} is truncated")
        return data

    def load(self, ref: str) -> Image.Image:
        return decode_rgb(self.read(ref))


ImageStore = Union[FolderImages, ShardImages]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Local tar paths of a spec: brace patterns, globs, folders (their *.tar, sorted) or a list of those."""
    parts = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for part in parts:
        part = str(part)
        if "://" in part and not part.startswith("file://"):
            raise ValueError(f"image shards must be local files (or a mounted filesystem), got {part!r}: "
                             f"random access to each image needs a seekable file")
        for item in braceexpand.braceexpand(part.removeprefix("file://")):
            if os.path.isdir(item):
                paths.extend(sorted(glob.glob(os.path.join(item, "*.tar"))))
            elif any(ch in item for ch in "*?["):
                paths.extend(sorted(glob.glob(item)))
            elif os.path.isfile(item):
                paths.append(item)
            else:
                raise FileNotFoundError(f"image shard {item} not found (data image shards {spec!r})")
    if not paths:
        raise FileNotFoundError(f"image shards {spec!r} match no .tar file")
    return paths


_SHARD_STORES: dict[tuple, ShardImages] = {}


def image_store(root: str | os.PathLike | None = None, shards: str | Sequence[str] | None = None,
                *, setting: str = "data.image_root") -> ImageStore:
    """The store for a task's data section: exactly one of `root` (a folder) and `shards`.

    Shard indexes are kept per process (train and every evaluation split share one)."""
    if (root is None) == (shards is None or shards == []):
        both = "both" if root is not None else "neither"
        shard_key = setting.replace("_root", "_shards")
        raise ValueError(f"{setting} and {shard_key}: give exactly one (the image folder or the image shards), "
                         f"got {both}")
    if root is not None:
        return FolderImages(root)
    paths = expand_shards(shards)
    key = tuple((p, stat.st_mtime_ns, stat.st_size) for p, stat in ((p, os.stat(p)) for p in paths))
    if key not in _SHARD_STORES:
        _SHARD_STORES[key] = ShardImages(paths)
    return _SHARD_STORES[key]


def as_store(images: ImageStore | str | Path) -> ImageStore:
    """Accept a plain folder path where a store is expected (the datasets' old signature)."""
    return FolderImages(images) if isinstance(images, (str, os.PathLike)) else images
