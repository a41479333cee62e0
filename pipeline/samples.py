"""From a raw tar sample to (pixels, caption): decode, choose, clean, transform, or reject with a reason.

Rejection is a return value, never an exception or a sleep: the loader
counts reasons and moves on (WebDataset's `warn_and_continue` sleeps 0.5 s
per bad sample; at web scale that is hours).

Caption source: a list under `json["caption"]` (several captions, e.g.
COCO) gives one chosen at random; otherwise `txt`; otherwise a string
`json["caption"]`. `json["image_id"]`, when an integer, becomes the
sample's `idx` (retrieval fine-tuning). Images become 8-bit RGB through
`pipeline.images.decode_rgb`, the decode every path shares.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.captions import DEFAULT_MAX_WORDS, pre_caption
from pipeline.images import ImageTooLarge, UnreadableImage, decode_rgb
from pipeline.shards import RawSample
from pipeline.device_augment import crop_pixels
from pipeline.transforms import ImagePlan, ImageTransform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# PIL's own decompression-bomb threshold: anything larger is not a web photo.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

BAD_REASONS = (
    "missing_image",      # no image file in the sample
    "empty_image",        # zero-byte image file
    "corrupt_image",      # not decodable: corrupt or truncated bytes
    "image_too_large",    # width * height above max_pixels
    "missing_caption",    # neither txt nor a caption in json
    "empty_caption",      # nothing left after pre_caption
    "bad_text_encoding",  # txt or json is not UTF-8
    "bad_metadata",       # json is not valid JSON
    "shard_unreadable",   # the sample's shard could not be opened
    "shard_damaged",      # the shard broke or ended before this sample
    "remote_timeout",     # the sample's remote shard did not answer in time, retries included
    "unreachable",        # the sample's remote shard's server refused or dropped the connection
)


@dataclass
class Decoded:
    key: str
    pixels: np.ndarray  # uint8 [res, res, 3], augmented; with augment.on_device the crop [h, w, 3]
    caption: str
    idx: int | None
    plan: ImagePlan | None = None  # augment.on_device: what the device does to the crop


class SampleDecoder:
    """Callable raw sample -> (Decoded, None) or (None, reason)."""

    def __init__(self, transform: ImageTransform, max_words: int = DEFAULT_MAX_WORDS,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if max_pixels <= 0:
            raise ValueError(f"max_pixels={max_pixels} must be positive")
        self.transform = transform
        self.max_words = max_words
        self.max_pixels = max_pixels

    def __call__(self, raw: RawSample, rng: random.Random) -> tuple[Decoded | None, str | None]:
        if raw.reason is not None:
            return None, raw.reason
        meta, reason = _metadata(raw.files.get("json"))
        if reason:
            return None, reason
        captions, reason = _captions(raw.files.get("txt"), meta)
        if reason:
            return None, reason
        caption = pre_caption(captions[0] if len(captions) == 1 else rng.choice(captions), self.max_words)
        if not caption.strip():
            return None, "empty_caption"
        image, reason = self._image(raw.files)
        if reason:
            return None, reason
        plan = self.transform.plan(image.width, image.height, rng)
        if self.transform.augment.on_device:   # the device resizes and augments (pipeline/device_augment.py)
            pixels = crop_pixels(image, plan.box)
        else:
            pixels, plan = self.transform.apply(image, plan), None
        idx = meta.get("image_id")
        idx = idx if isinstance(idx, int) and not isinstance(idx, bool) else None
        return Decoded(raw.key, pixels, caption, idx, plan), None

    def _image(self, files: dict[str, bytes]) -> tuple[Image.Image | None, str | None]:
        data = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
        if data is None:
            return None, "missing_image"
        if len(data) == 0:
            return None, "empty_image"
        try:
            return decode_rgb(data, self.max_pixels), None
        except ImageTooLarge:
            return None, "image_too_large"
        except UnreadableImage:  # corrupt or truncated bytes
            return None, "corrupt_image"


def _metadata(data: bytes | None) -> tuple[dict, str | None]:
    if data is None:
        return {}, None
    try:
        meta = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "bad_text_encoding"
    except ValueError:
        return {}, "bad_metadata"
    return (meta, None) if isinstance(meta, dict) else ({}, "bad_metadata")


def _captions(txt: bytes | None, meta: dict) -> tuple[list[str], str | None]:
    listed = meta.get("caption")
    if isinstance(listed, list):
        captions = [c for c in listed if isinstance(c, str)]
        return (captions, None) if captions else ([], "missing_caption")
    if txt is not None:
        try:
            return [txt.decode("utf-8")], None
        except UnicodeDecodeError:
            return [], "bad_text_encoding"
    if isinstance(listed, str):
        return [listed], None
    return [], "missing_caption"
