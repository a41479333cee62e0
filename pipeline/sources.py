"""Input adapters: each pretraining source's native list format -> (url_or_path, caption, source) rows.

Formats read (the ones the ALBEF 4M/14M sources are distributed in):

| source | file | one row per |
|---|---|---|
| `cc3m` | Google's TSV, `caption<TAB>url`, no header | line |
| `cc12m` | Google's TSV, `url<TAB>caption`, no header | line |
| `sbu` | JSON. Either the official release `sbu-captions-all.json`, a dict of parallel lists `{"image_urls": [...], "captions": [...], "user_ids": [...]}`, or a list of records `{"url" or "image_url" or "image_urls" or "image": url, "caption" or "captions": text}` (the BLIP/LAVIS and ALBEF re-releases) | (url, caption) pair |
| `coco`, `vg`, `flickr30k` | ALBEF's annotation JSON: a list of `{"image": path or url, "caption": str or [str, ...]}` | caption (several captions give one row each) |
| `generic` | any web list with a header: parquet, csv, tsv or jsonl (`input_format`), columns named by `url_col` and `caption_col` as in img2dataset; `extra_columns` are kept and land in each sample's json | row |

Web sources (cc3m, cc12m, sbu, generic) must give http(s) URLs. Annotation sources may
give URLs or image paths; a relative path is joined to `image_root` (or the
current directory) and made absolute, so shards can be packed on any node that
sees the same filesystem.

Nothing is dropped silently: every row that is not yielded is counted in
`rejects` under one reason, so `rows_read == yielded + sum(rejects)`.
Captions are kept as written (whitespace-trimmed); cleaning (`pre_caption`)
happens in the loader, as in the reference.

`likely_cause` turns a reject reason into the probable mistake in the list's
layout, so a wrongly formatted list is refused with a hint, not downloaded as nothing.
"""
from __future__ import annotations

import csv
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
# reasons that, when they hit most rows, mean the list's layout was misread
INPUT_FORMAT_REASONS = (MISSING_URL, INVALID_URL, EMPTY_CAPTION, MALFORMED_ROW, NOT_UTF8)

GENERIC = "generic"
INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl")
SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# keys img2dataset writes into each sample's json: an extra column may not shadow them
SAMPLE_KEYS = frozenset({"url", "caption", "source", "key", "status", "error_message", "width", "height",
                         "original_width", "original_height", "exif", "sha256", "md5", "sha512"})
TABLE_ROWS = 65536

WEB_SCHEMES = ("http", "https")
SBU_URL_KEYS = ("url", "image_url", "image_urls", "image")
SBU_CAPTION_KEYS = ("caption", "captions")

Row = tuple  # (url_or_path, caption, source, *extra column values)


def is_web_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in WEB_SCHEMES and bool(parts.netloc)


class SourceRows:
    """Iterate the accepted rows of one source list; counts what it reads and rejects.

    `rows_read` and `rejects` are complete once iteration has finished.
    """

    def __init__(self, source: str, path: str | Path, image_root: str | Path | None = None, *,
                 input_format: str | None = None, url_col: str | None = None,
                 caption_col: str | None = None, extra_columns=()):
        if source not in ADAPTERS:
            raise ValueError(f"unknown source {source!r}; choose one of {sorted(ADAPTERS)}")
        self.source = source
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"input list for source {source!r} not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else None
        self.rows_read = 0
        self.rejects: Counter = Counter()
        self.extra_columns: tuple[str, ...] = tuple(extra_columns or ())
        self.input_columns: list[str] | None = None  # the generic list's columns, once opened
        if source == GENERIC:
            self.input_format = input_format or SUFFIX_FORMATS.get(self.path.suffix.lower())
            if self.input_format not in INPUT_FORMATS:
                raise ValueError(f"cannot tell the format of {self.path}: give --input-format "
                                 f"{'|'.join(INPUT_FORMATS)}")
            self.url_col = url_col or "url"
            self.caption_col = caption_col or "caption"
            wanted = [self.url_col, self.caption_col, *self.extra_columns]
            if len(set(wanted)) < len(wanted):
                raise ValueError(f"--url-col, --caption-col and --save-additional-columns name a "
                                 f"column twice: {wanted}")
            shadowing = sorted(set(self.extra_columns) & SAMPLE_KEYS)
            if shadowing:
                raise ValueError(f"--save-additional-columns {shadowing}: these names are taken by the "
                                 f"sample json's own fields {sorted(SAMPLE_KEYS)}")
        elif input_format or url_col or caption_col or self.extra_columns:
            raise ValueError(f"--input-format, --url-col, --caption-col and --save-additional-columns "
                             f"need --source generic; {source} lists have a fixed layout")
        else:
            self.input_format = self.url_col = self.caption_col = None

    def read_options(self) -> dict | None:
        """What, besides source and file, decides the rows read (None for the fixed-layout sources)."""
        if self.source != GENERIC:
            return None
        return {"input_format": self.input_format, "url_col": self.url_col,
                "caption_col": self.caption_col, "extra_columns": list(self.extra_columns)}

    def __iter__(self) -> Iterator[Row]:
        self.rows_read = 0
        self.rejects = Counter()
        yield from ADAPTERS[self.source](self)

    def tables(self, rows_per_table: int = TABLE_ROWS):
        """The accepted rows as pyarrow Tables (url, caption, source, *extra columns).

        Generic lists stay columnar so that extra columns keep their types.
        """
        import pyarrow as pa

        if self.source == GENERIC:
            self.rows_read = 0
            self.rejects = Counter()
            yield from _generic_tables(self, rows_per_table)
            return
        batch: list[Row] = []
        for row in self:
            batch.append(row)
            if len(batch) == rows_per_table:
                yield _rows_table(pa, batch)
                batch = []
        if batch:
            yield _rows_table(pa, batch)

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


def _rows_table(pa, rows: list[Row]):
    url, caption, source = (pa.array(column, pa.string()) for column in zip(*rows))
    return pa.table({"url": url, "caption": caption, "source": source})


# --------------------------------------------------------------------------- generic lists
def _csv_header(path: Path, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as file:
        try:
            return next(csv.reader(file, delimiter=delimiter))
        except StopIteration:
            return []
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8: {err}") from err


def _jsonl_keys(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number} is not a JSON record: {err}") from err
                return list(record) if isinstance(record, dict) else []
    return []


def _json_ready(pa, column, name: str):
    """Dates, times and decimals as text: img2dataset's json.dumps of a sample would fail on them."""
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        raise ValueError(f"column {name!r} holds binary values, which a sample's json cannot carry")
    if pa.types.is_temporal(kind) or pa.types.is_decimal(kind):
        return column.cast(pa.string())
    if pa.types.is_dictionary(kind):
        return column.cast(kind.value_type)
    return column


def _generic_batches(src: SourceRows, rows_per_table: int):
    """Record batches of the url, caption and extra columns of a generic list."""
    import pyarrow as pa

    wanted = [src.url_col, src.caption_col, *src.extra_columns]
    text = {src.url_col: pa.string(), src.caption_col: pa.string()}

    def check(names: list[str]) -> None:
        src.input_columns = list(names)
        absent = [c for c in wanted if c not in names]
        if absent:
            raise ValueError(f"{src.path} has no column {', '.join(map(repr, absent))}; its columns are "
                             f"{list(names)[:20]}: set --url-col/--caption-col/--save-additional-columns "
                             f"(or --input-format if the list is not {src.input_format})")

    if src.input_format == "parquet":
        import pyarrow.parquet as pq
        parquet = pq.ParquetFile(src.path)
        check(parquet.schema_arrow.names)
        yield from parquet.iter_batches(batch_size=rows_per_table, columns=wanted)
    elif src.input_format in ("csv", "tsv"):
        import pyarrow.csv as pacsv
        delimiter = "," if src.input_format == "csv" else "\t"
        check(_csv_header(src.path, delimiter))

        def malformed(_row) -> str:  # a row with another number of fields than the header
            src.rows_read += 1
            src._reject(MALFORMED_ROW)
            return "skip"

        yield from pacsv.open_csv(
            src.path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                             invalid_row_handler=malformed),
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=text))
    else:
        import pyarrow.json as pajson
        check(_jsonl_keys(src.path))
        reader = pajson.open_json(src.path, read_options=pajson.ReadOptions(block_size=1 << 24),
                                  parse_options=pajson.ParseOptions(
                                      explicit_schema=pa.schema(list(text.items())),
                                      unexpected_field_behavior="infer"))
        for batch in reader:
            yield pa.RecordBatch.from_arrays([batch.column(c) for c in wanted], names=wanted)


def _generic_tables(src: SourceRows, rows_per_table: int):
    import pyarrow as pa

    try:
        for batch in _generic_batches(src, rows_per_table):
            urls = batch.column(src.url_col).to_pylist()
            captions = batch.column(src.caption_col).to_pylist()
            keep: list[bool] = []
            accepted: list[Row] = []
            for url, caption in zip(urls, captions):
                row = src._web_row(url, caption)
                keep.append(row is not None)
                if row is not None:
                    accepted.append(row)
            if not accepted:
                continue
            table = _rows_table(pa, accepted)
            mask = pa.array(keep)
            for name in src.extra_columns:
                table = table.append_column(name, _json_ready(pa, batch.column(name).filter(mask), name))
            yield table
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{src.path} cannot be read as {src.input_format}: {first_line}") from err


def _generic(src: SourceRows) -> Iterator[Row]:
    for table in _generic_tables(src, TABLE_ROWS):
        yield from zip(*(column.to_pylist() for column in table.columns))


# --------------------------------------------------------------------------- diagnosis
_OTHER_LAYOUT = ("other layouts: --source generic --input-format csv|tsv|parquet|jsonl "
                 "--url-col/--caption-col")


def likely_cause(source: str, reason: str, read_options: dict | None = None,
                 input_columns: list[str] | None = None) -> str:
    """The probable mistake behind most rows of a list being rejected for `reason`."""
    if reason == NOT_UTF8:
        return "the list is not UTF-8 text (re-encode it, e.g. with iconv -t UTF-8)"
    if source == GENERIC:
        options = read_options or {}
        found = f" (the list's columns: {input_columns[:20]})" if input_columns else ""
        if reason == MALFORMED_ROW:
            return ("rows with another number of fields than the header: wrong --input-format "
                    "(csv or tsv?) or unquoted delimiters inside captions")
        if reason == EMPTY_CAPTION:
            return (f"column {options.get('caption_col')!r} is mostly empty: "
                    f"see --caption-col{found}")
        return (f"columns in the wrong order or an unexpected header: column "
                f"{options.get('url_col')!r} holds no http(s) URLs: see --url-col/--caption-col{found}")
    if source in ("cc3m", "cc12m"):
        if reason == MALFORMED_ROW:
            return f"not a two-column TAB-separated list; {_OTHER_LAYOUT}"
        return ("columns in the wrong order or an unexpected header: --source cc3m reads "
                "caption<TAB>url, cc12m reads url<TAB>caption, both without header; " + _OTHER_LAYOUT)
    if source == "sbu":
        return (f"records without the expected keys ({'/'.join(SBU_URL_KEYS)} and "
                f"{'/'.join(SBU_CAPTION_KEYS)}); {_OTHER_LAYOUT}")
    return (f"entries without usable 'image' and 'caption' fields (ALBEF's annotation format); "
            f"{_OTHER_LAYOUT}")


ADAPTERS: dict[str, Callable[[SourceRows], Iterator[Row]]] = {
    "cc3m": _tsv(caption_field=0),
    "cc12m": _tsv(caption_field=1),
    "sbu": _sbu,
    "coco": _albef_annotations,
    "vg": _albef_annotations,
    "flickr30k": _albef_annotations,
    GENERIC: _generic,
}
