"""Shard specs as users write them, the fsspec opener, and reading raw samples from tars.

Spec syntax
-----------
A spec is one string (or a list of strings) of sources joined by `::`::

    /data/cc3m/{00000..00331}.tar:0.5::s3://bucket/sbu/{00000..00099}.tar:0.5

Each source is a path or URL with brace patterns (`{00000..00331}`,
`{a,b}`) or shell globs (`*`, `?`), optionally followed by `:WEIGHT`, a plain
positive number after the source's last colon. A URL's own colons never look
like that: `s3://` is followed by `//`, a port (`host:8080/...`) by a path.
`::` inside `[...]` (an IPv6 host such as `http://[::1]:8000/a.tar`) does not
split. Weights are the share of the stream's samples a source contributes in
resampled mode; a source without a weight contributes in proportion to its
sample count (sources either all carry weights or none does).

Local paths and `file://` URLs are opened by WebDataset's `gopen`; every
other fsspec protocol (`s3://`, `gs://`, `memory://`, ...) goes through an
fsspec-backed handler registered in `webdataset.gopen.gopen_schemes`, which
falls back to WebDataset's own handler (curl for https) when the fsspec
implementation for that protocol is not installed.

Samples per shard come from the `manifest.json` beside the shards
(`pipeline.manifest.read_manifest`); a shard the manifest does not list is
counted by reading its tar once (logged, since that reads the whole shard).
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import braceexpand
import fsspec
from webdataset.gopen import gopen, gopen_schemes
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from pipeline.manifest import MANIFEST_NAME, read_manifest

log = logging.getLogger(__name__)

SOURCE_SEPARATOR = "::"
_WEIGHT = re.compile(r"^(?P<pattern>.+):(?P<weight>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
_GLOB_CHARS = ("*", "?")
# Schemes WebDataset's gopen opens itself before consulting its table.
_GOPEN_NATIVE = ("file", "local")


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


@dataclass
class Source:
    pattern: str
    weight: float | None
    shards: list[Shard] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class RawSample:
    """One key group of a tar, undecoded; `reason` is set for a slot the shard could not deliver."""

    key: str
    url: str
    files: dict[str, bytes]
    reason: str | None = None


def split_spec(spec: str | Sequence[str]) -> list[tuple[str, float | None]]:
    """Split a spec into (pattern, weight) pairs; see the module docstring for the syntax."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    sources: list[tuple[str, float | None]] = []
    for part in parts:
        for piece in _split_outside_brackets(str(part)):
            piece = piece.strip()
            if not piece:
                continue
            match = _WEIGHT.match(piece)
            if match:
                weight = float(match.group("weight"))
                if weight <= 0:
                    raise ValueError(f"shard spec {spec!r}: source {piece!r} has weight {weight}; weights must be > 0")
                sources.append((match.group("pattern"), weight))
            else:
                sources.append((piece, None))
    if not sources:
        raise ValueError(f"shard spec {spec!r} names no source")
    weighted = [w is not None for _, w in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(f"shard spec {spec!r}: either every source carries a :weight or none does")
    return sources


def _split_outside_brackets(text: str) -> list[str]:
    pieces, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif depth == 0 and text.startswith(SOURCE_SEPARATOR, i):
            pieces.append(text[start:i])
            i += len(SOURCE_SEPARATOR)
            start = i
            continue
        i += 1
    pieces.append(text[start:])
    return pieces


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand, then glob the parts that hold `*` or `?` (sorted, so every rank agrees)."""
    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if not any(ch in item for ch in _GLOB_CHARS):
            urls.append(item)
        elif _is_local(item):
            urls.extend(sorted(globlib.glob(_local_path(item))))
        else:
            fs, path = fsspec.core.url_to_fs(item)
            urls.extend(sorted(fs.unstrip_protocol(p) for p in fs.glob(path)))
    return urls


def _is_local(url: str) -> bool:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return scheme in ("",) + _GOPEN_NATIVE


def _local_path(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def _split_url(url: str) -> tuple[str, str]:
    folder, _, name = url.rpartition("/")
    return folder or ".", name


def resolve_sources(spec: str | Sequence[str]) -> list[Source]:
    """Expand every source of a spec into shards with their sample counts.

    Fails with the spec in the message when no shard exists at all; a
    pattern entry that neither the manifest lists nor exists is logged and
    left out (a hole in a brace range is common after a partial download).
    """
    register_fsspec_opener()
    sources = [Source(p, w) for p, w in split_spec(spec)]
    manifests: dict[str, dict | None] = {}
    for source in sources:
        for url in expand_pattern(source.pattern):
            count = _shard_count(url, manifests)
            if count is None:
                log.warning("shard spec %r: %s does not exist; skipped", spec, url)
                continue
            if count == 0:
                continue
            source.shards.append(Shard(url, count))
    empty = [s.pattern for s in sources if not s.shards]
    if len(empty) == len(sources):
        raise ValueError(f"shard spec {spec!r} matches no shard with samples")
    if empty:
        raise ValueError(f"shard spec {spec!r}: source(s) {empty} match no shard with samples")
    return sources


def _shard_count(url: str, manifests: dict[str, dict | None]) -> int | None:
    folder, name = _split_url(url)
    if folder not in manifests:
        manifests[folder] = _read_manifest_or_none(folder)
    manifest = manifests[folder]
    if manifest is not None and name in manifest.get("shards", {}):
        return int(manifest["shards"][name])
    if not _exists(url):
        return None
    log.warning("%s is not listed in a %s beside it; counting its samples by reading it", url, MANIFEST_NAME)
    return count_samples(url)


def _read_manifest_or_none(folder: str) -> dict | None:
    try:
        return read_manifest(folder)
    except FileNotFoundError:
        return None


def _exists(url: str) -> bool:
    if _is_local(url):
        return os.path.exists(_local_path(url))
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def count_samples(url: str) -> int:
    """Number of key groups in one tar (reads the whole shard)."""
    keys, last = 0, None
    with open_shard(url) as stream:
        for member in tarfile.open(fileobj=stream, mode="r|*"):
            prefix, _ = base_plus_ext(member.name)
            if member.isreg() and prefix is not None and prefix != last:
                keys, last = keys + 1, prefix
    return keys


def _fsspec_handler(fallback: Callable | None) -> Callable:
    def gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
        try:
            fs, path = fsspec.core.url_to_fs(url)
        except ImportError:
            if fallback is None:
                raise
            return fallback(url, mode, bufsize, **kw)
        return fs.open(path, mode)

    gopen_fsspec.fsspec_backed = True
    return gopen_fsspec


def register_fsspec_opener() -> None:
    """Route every fsspec protocol through fsspec in WebDataset's gopen (idempotent)."""
    table = gopen_schemes
    for scheme in fsspec.available_protocols():
        if scheme in _GOPEN_NATIVE or getattr(table.get(scheme), "fsspec_backed", False):
            continue
        table[scheme] = _fsspec_handler(table.get(scheme))


def open_shard(url: str):
    """A binary stream for a shard, through WebDataset's gopen."""
    register_fsspec_opener()
    return gopen(url, "rb")


def _key_groups(stream, url: str) -> Iterator[RawSample]:
    """Group consecutive tar members by key, as WebDataset does.

    When the tar breaks, the group being read is still delivered if it holds
    every extension the group before it had (the damage came after it), and
    the error is re-raised.
    """
    current: RawSample | None = None
    complete: set[str] | None = None
    try:
        for member in tar_file_iterator(stream, handler=reraise_exception):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if current is None or prefix != current.key:
                if current is not None:
                    complete = set(current.files)
                    yield current
                current = RawSample(prefix, url, {})
            current.files[suffix.lower()] = member["data"]
    except Exception:
        if current is not None and complete is not None and complete <= set(current.files):
            yield current
        raise
    if current is not None:
        yield current


def read_segment(url: str, start: int, stop: int) -> Iterator[RawSample]:
    """Exactly `stop - start` items: samples start..stop-1 of a shard, in tar order.

    Positions the shard cannot deliver (it will not open, or it ends or
    breaks before `stop`) come back as placeholders with `reason` set, so a
    reader's position always matches the manifest's counts. Problems are
    logged with the URL once per call.
    """
    index = start
    try:
        stream = open_shard(url)
    except Exception as exn:  # any opener failure: missing file, permissions, network
        log.warning("shard %s could not be opened (%s: %s); its %d samples are skipped",
                    url, type(exn).__name__, exn, stop - start)
        yield from _placeholders(url, start, stop, "shard_unreadable")
        return
    index = 0
    try:
        with stream:
            for group in _key_groups(stream, url):
                if index >= stop:
                    break
                if index >= start:
                    yield group
                index += 1
    except Exception as exn:  # tarfile.ReadError, EOFError, OSError mid-stream
        log.warning("shard %s is damaged after %d samples (%s: %s); the rest of it is skipped",
                    url, index, type(exn).__name__, exn)
    else:
        if index < stop:
            log.warning("shard %s ended after %d samples; its manifest lists more", url, index)
    yield from _placeholders(url, max(index, start), stop, "shard_damaged")


def _placeholders(url: str, start: int, stop: int, reason: str) -> Iterator[RawSample]:
    name = _split_url(url)[1]
    for i in range(start, stop):
        yield RawSample(f"{name}#{i}", url, {}, reason)
