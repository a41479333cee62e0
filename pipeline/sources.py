"""Input adapters: each pretraining source's native list format -> (url_or_path, caption, source) rows.

Formats read (the ones the ALBEF 4M/14M sources are distributed in):

| source | file | one row per |
|---|---|---|
| `cc3m` | Google's TSV, `caption<TAB>url`, no header | line |
| `cc12m` | Google's TSV, `url<TAB>caption`, no header | line |
| `sbu` | JSON. Either the official release `sbu-captions-all.json`, a dict of parallel lists `{"image_urls": [...], "captions": [...], "user_ids": [...]}`, or a list of records `{"url" or "image_url" or "image_urls" or "image": url, "caption" or "captions": text}` (the BLIP/LAVIS and ALBEF re-releases) | (url, caption) pair |
| `coco`, `vg`, `flickr30k` | ALBEF's annotation JSON: a list of `{"image": path or url, "caption": str or [str, ...]}` | caption (several captions give one row each) |

Web sources (cc3m, cc12m, sbu) must give http(s) URLs. Annotation sources may
give URLs or image paths; a relative path is joined to `image_root` (or the
current directory) and made absolute, so shards can be packed on any node that
sees the same filesystem.

Nothing is dropped silently: every row that is not yielded is counted in
`rejects` under one reason, so `rows_read == yielded + sum(rejects)`.
Captions are kept as written (whitespace-trimmed); cleaning (`pre_caption`)
happens in the loader, as in the reference.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

MISSING_URL = "missing_url"
INVALID_URL = "invalid_url"
EMPTY_CAPTION = "empty_caption"
MALFORMED_ROW = "malformed_row"
NOT_UTF8 = "not_utf8"

WEB_SCHEMES = ("http", "https")
SBU_URL_KEYS = ("url", "image_url", "image_urls", "image")
SBU_CAPTION_KEYS = ("caption", "captions")

Row = tuple[str, str, str]


def is_web_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in WEB_SCHEMES and bool(parts.netloc)


class SourceRows:
    """Iterate the accepted rows of one source list; counts what it reads and rejects.

    `rows_read` and `rejects` are complete once iteration has finished.
    """

    def __init__(self, source: str, path: str | Path, image_root: str | Path | None = None):
        if source not in ADAPTERS:
            raise ValueError(f"unknown source {source!r}; choose one of {sorted(ADAPTERS)}")
        self.source = source
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"input list for source {source!r} not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else None
        self.rows_read = 0
        self.rejects: Counter = Counter()

    def __iter__(self) -> Iterator[Row]:
        self.rows_read = 0
        self.rejects = Counter()
        yield from ADAPTERS[self.source](self)

    # Shared checks ---------------------------------------------------------
    def _reject(self, reason: str) -> None:
        self.rejects[reason] += 1

    def _web_row(self, url, caption) -> Row | None:
        """Validate one (url, caption) pair of a web source; None when it is rejected."""
        self.rows_read += 1
        url = url.strip() if isinstance(url, str) else ""
        caption = caption.strip() if isinstance(caption, str) else ""
        if not url:
            self._reject(MISSING_URL)
        elif not is_web_url(url):
            self._reject(INVALID_URL)
        elif not caption:
            self._reject(EMPTY_CAPTION)
        else:
            return url, caption, self.source
        return None

    def _image_row(self, image, caption) -> Row | None:
        """Validate one (image url or path, caption) pair of an annotation source."""
        self.rows_read += 1
        image = image.strip() if isinstance(image, str) else ""
        caption = caption.strip() if isinstance(caption, str) else ""
        if not image:
            self._reject(MISSING_URL)
        elif not caption:
            self._reject(EMPTY_CAPTION)
        elif is_web_url(image):
            return image, caption, self.source
        elif "://" in image and urlsplit(image).scheme != "file":
            self._reject(INVALID_URL)
        else:
            return self._local_path(image), caption, self.source
        return None

    def _local_path(self, image: str) -> str:
        path = Path(urlsplit(image).path) if image.startswith("file://") else Path(image)
        if not path.is_absolute() and self.image_root is not None:
            path = self.image_root / path
        return os.path.abspath(path)

    def _read_json(self):
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.source} list {self.path} is not UTF-8: {err}") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.source} list {self.path} is not valid JSON: {err}") from err


def _tsv(caption_field: int) -> Callable[[SourceRows], Iterator[Row]]:
    """Adapter for a two-column TSV without header; `caption_field` is 0 or 1."""

    def read(src: SourceRows) -> Iterator[Row]:
        with open(src.path, "rb") as file:
            for raw in file:
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    src.rows_read += 1
                    src._reject(NOT_UTF8)
                    continue
                fields = line.split("\t")
                if len(fields) != 2:
                    src.rows_read += 1
                    src._reject(MALFORMED_ROW)
                    continue
                row = src._web_row(fields[1 - caption_field], fields[caption_field])
                if row is not None:
                    yield row

    return read


def _captions(value) -> list | None:
    """A caption field as a list of candidates; None when it is neither str nor list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    return None


def _first_key(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in record:
            return record[key]
    return None


def _records(src: SourceRows, records: list, url_keys: tuple[str, ...],
             caption_keys: tuple[str, ...], make_row) -> Iterator[Row]:
    for record in records:
        if not isinstance(record, dict):
            src.rows_read += 1
            src._reject(MALFORMED_ROW)
            continue
        url = _first_key(record, url_keys)
        if isinstance(url, list):  # some SBU re-releases keep a one-element list
            url = url[0] if len(url) == 1 else None
        captions = _captions(_first_key(record, caption_keys))
        if not captions:  # missing, empty list, or not text: one rejected row
            captions = [""]
        for caption in captions:
            row = make_row(url, caption)
            if row is not None:
                yield row


def _sbu(src: SourceRows) -> Iterator[Row]:
    data = src._read_json()
    if isinstance(data, dict) and "image_urls" in data and "captions" in data:
        urls, captions = data["image_urls"], data["captions"]
        if not isinstance(urls, list) or not isinstance(captions, list):
            raise ValueError(f"sbu list {src.path}: 'image_urls' and 'captions' must be lists")
        for i in range(max(len(urls), len(captions))):
            row = src._web_row(urls[i] if i < len(urls) else None,
                               captions[i] if i < len(captions) else None)
            if row is not None:
                yield row
    elif isinstance(data, list):
        yield from _records(src, data, SBU_URL_KEYS, SBU_CAPTION_KEYS, src._web_row)
    else:
        raise ValueError(f"sbu list {src.path}: expected a dict with 'image_urls' and 'captions' "
                         f"lists or a list of records, found {type(data).__name__}")


def _albef_annotations(src: SourceRows) -> Iterator[Row]:
    data = src._read_json()
    if not isinstance(data, list):
        raise ValueError(f"{src.source} annotation file {src.path} must hold a JSON list of "
                         f"{{image, caption}} entries, found {type(data).__name__}")
    yield from _records(src, data, ("image",), ("caption",), src._image_row)


ADAPTERS: dict[str, Callable[[SourceRows], Iterator[Row]]] = {
    "cc3m": _tsv(caption_field=0),
    "cc12m": _tsv(caption_field=1),
    "sbu": _sbu,
    "coco": _albef_annotations,
    "vg": _albef_annotations,
    "flickr30k": _albef_annotations,
}
