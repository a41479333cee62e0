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

Local paths and `file://` URLs are opened as files; every other URL
(`s3://`, `gs://`, `https://`, `memory://`, ...) through fsspec by
`pipeline.remote`: each open and read under a deadline, transient failures
retried with backoff (`Remote(timeout_s, retries)`), then the shard is
skipped and counted as `remote_timeout` or `unreachable`. `s3://` and `gs://`
need the `remote` extra (s3fs, gcsfs).

`pipe:COMMAND` sources run a shell command, so a data spec could run
anything: they are refused unless the caller passes `allow_pipe=True`
(config `data.allow_pipe: true`).

Samples per shard come from the `manifest.json` beside the shards
(`pipeline.manifest.read_manifest`); a shard the manifest does not list is
counted by reading its tar once (logged, since that reads the whole shard).
A shard left out or cut short there is logged by name and counted in its
source's `problems` (reason -> shards): `missing`, `shard_unreadable`,
`shard_damaged` (the samples before the damage are kept), `remote_timeout`,
`unreachable`. Every URL printed goes through `redact` (credentials hidden).
"""
from __future__ import annotations

import glob as globlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import braceexpand
from webdataset.gopen import gopen_pipe
from webdataset.tariterators import base_plus_ext

from pipeline import remote as remote_io
from pipeline.manifest import MANIFEST_NAME, read_manifest
from pipeline.remote import Remote, RemoteError, describe, redact  # redact: also for callers of this module
from pipeline.tar_members import tar_members

log = logging.getLogger(__name__)

SOURCE_SEPARATOR = "::"
_WEIGHT = re.compile(r"^(?P<pattern>.+):(?P<weight>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
_GLOB_CHARS = ("*", "?")
_LOCAL_SCHEMES = ("", "file", "local")
MISSING = "missing"
UNREADABLE = "shard_unreadable"
DAMAGED = "shard_damaged"


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


@dataclass
class Source:
    pattern: str
    weight: float | None
    shards: list[Shard] = field(default_factory=list)
    problems: Counter = field(default_factory=Counter)  # reason -> shards left out or cut short

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


def refuse_pipe(url: str, allow_pipe: bool) -> None:
    """ValueError for a `pipe:` source unless the caller opted in."""
    if not allow_pipe and _scheme(url) == "pipe":
        raise ValueError(f"shard source {redact(url)!r} is a 'pipe:' spec, which runs a shell command from a "
                         f"data spec; refused unless opted in with data.allow_pipe: true")


def is_safe_key(key: str) -> bool:
    """Whether a sample key can name a file below a folder: relative, no '..', '.', empty part, '\\' or NUL."""
    if not key or key.startswith("/") or "\\" in key or "\0" in key:
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


def split_spec(spec: str | Sequence[str], *, allow_pipe: bool = False) -> list[tuple[str, float | None]]:
    """Split a spec into (pattern, weight) pairs; see the module docstring for the syntax."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    sources: list[tuple[str, float | None]] = []
    for part in parts:
        for piece in _split_outside_brackets(str(part)):
            piece = piece.strip()
            if not piece:
                continue
            refuse_pipe(piece, allow_pipe)
            match = _WEIGHT.match(piece)
            if match:
                weight = float(match.group("weight"))
                if weight <= 0:
                    raise ValueError(f"shard spec {redact(spec)!r}: source {redact(piece)!r} has weight {weight}; "
                                     f"weights must be > 0")
                sources.append((match.group("pattern"), weight))
            else:
                sources.append((piece, None))
    if not sources:
        raise ValueError(f"shard spec {redact(spec)!r} names no source")
    weighted = [w is not None for _, w in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(f"shard spec {redact(spec)!r}: either every source carries a :weight or none does")
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


def expand_pattern(pattern: str, remote: Remote = Remote()) -> list[str]:
    """Brace-expand, then glob the parts that hold `*` or `?` (sorted, so every rank agrees)."""
    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if _scheme(item) == "pipe" or not any(ch in item for ch in _GLOB_CHARS):
            urls.append(item)
        elif _is_local(item):
            urls.extend(sorted(globlib.glob(_local_path(item))))
        else:
            urls.extend(remote_io.glob(item, remote))
    return urls


def _scheme(url: str) -> str:
    if url[:5].lower() == "pipe:":  # WebDataset's syntax; the command may hold URLs of its own
        return "pipe"
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _is_local(url: str) -> bool:
    return _scheme(url) in _LOCAL_SCHEMES


def _local_path(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def _split_url(url: str) -> tuple[str, str]:
    folder, _, name = url.rpartition("/")
    return folder or ".", name


def resolve_sources(spec: str | Sequence[str], *, allow_pipe: bool = False,
                    remote: Remote = Remote()) -> list[Source]:
    """Expand every source of a spec into shards with their sample counts.

    Fails with the spec in the message when no shard has samples at all; a
    shard that is missing, unreadable or unreachable is logged, left out and
    counted in its source's `problems` (a hole in a brace range is common
    after a partial download).
    """
    sources = [Source(p, w) for p, w in split_spec(spec, allow_pipe=allow_pipe)]
    manifests: dict[str, dict | RemoteError | None] = {}
    for source in sources:
        for url in expand_pattern(source.pattern, remote):
            refuse_pipe(url, allow_pipe)
            count, problem = _shard_count(url, manifests, allow_pipe, remote)
            if problem is not None:
                source.problems[problem] += 1
            if count > 0:
                source.shards.append(Shard(url, count))
    empty = [redact(s.pattern) for s in sources if not s.shards]
    problems = sum((s.problems for s in sources), Counter())
    note = f" (shards left out: {dict(problems)})" if problems else ""
    if len(empty) == len(sources):
        raise ValueError(f"shard spec {redact(spec)!r} matches no shard with samples{note}")
    if empty:
        raise ValueError(f"shard spec {redact(spec)!r}: source(s) {empty} match no shard with samples{note}")
    return sources


def _shard_count(url: str, manifests: dict, allow_pipe: bool, remote: Remote) -> tuple[int, str | None]:
    """(samples, problem): from the manifest beside the shard, else by reading it."""
    if _scheme(url) != "pipe":  # a command has no folder: it is read to be counted
        folder, name = _split_url(url)
        if folder not in manifests:
            manifests[folder] = _manifest_or_failure(folder, remote)
        manifest = manifests[folder]
        if isinstance(manifest, RemoteError):
            return 0, manifest.reason  # logged once, for the folder
        if manifest is not None and name in manifest["shards"]:
            return int(manifest["shards"][name]), None
    return _count_by_reading(url, allow_pipe, remote)


def _manifest_or_failure(folder: str, remote: Remote) -> dict | RemoteError | None:
    """The folder's manifest; None when it has none; the RemoteError when it cannot be reached."""
    try:
        return read_manifest(folder, remote)
    except FileNotFoundError:
        return None
    except RemoteError as exn:
        log.warning("shard manifest %s/%s: %s; the shards beside it are skipped", redact(folder), MANIFEST_NAME,
                    exn.detail)
        return exn
    except ValueError:  # not a manifest: the message names it
        raise
    except Exception as exn:  # a refusal (401/403), a missing fsspec backend: the spec must change
        raise ValueError(f"shard manifest {redact(folder)}/{MANIFEST_NAME} could not be read "
                         f"({describe(exn)})") from None


def _count_by_reading(url: str, allow_pipe: bool, remote: Remote) -> tuple[int, str | None]:
    try:
        stream = open_shard(url, allow_pipe=allow_pipe, remote=remote)
    except FileNotFoundError:
        log.warning("shard %s does not exist; skipped", redact(url))
        return 0, MISSING
    except Exception as exn:
        log.warning("shard %s could not be opened (%s); skipped", redact(url), describe(exn))
        return 0, _reason(exn, UNREADABLE)
    log.warning("%s is not listed in a %s beside it; counting its samples by reading it",
                redact(url), MANIFEST_NAME)
    count = 0
    try:
        with stream:
            for _ in _key_groups(stream, url):
                count += 1
    except Exception as exn:
        log.warning("shard %s is damaged after %d samples (%s); those are used, the rest is skipped",
                    redact(url), count, describe(exn))
        return count, _reason(exn, DAMAGED)
    return count, None


def _reason(exn: BaseException, default: str) -> str:
    """The RemoteError's reason anywhere in the chain, else `default`."""
    seen = set()
    while exn is not None and id(exn) not in seen:
        if isinstance(exn, RemoteError):
            return exn.reason
        seen.add(id(exn))
        exn = exn.__cause__ or exn.__context__
    return default


def open_shard(url: str, *, allow_pipe: bool = False, remote: Remote = Remote()):
    """A binary stream for a shard: a local file, a remote file (`pipeline.remote`) or an allowed pipe."""
    refuse_pipe(url, allow_pipe)
    scheme = _scheme(url)
    if scheme == "pipe":
        return gopen_pipe(url, "rb")
    if scheme in _LOCAL_SCHEMES:
        return open(_local_path(url), "rb")
    return remote_io.open_remote(url, remote)


def _key_groups(stream, url: str) -> Iterator[RawSample]:
    """Group consecutive tar members by key, as WebDataset does.

    When the tar breaks, the group being read is still delivered if it holds
    every extension the group before it had (the damage came after it), and
    the error is re-raised.
    """
    current: RawSample | None = None
    complete: set[str] | None = None
    try:
        for name, data in tar_members(stream):
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if current is None or prefix != current.key:
                if current is not None:
                    complete = set(current.files)
                    yield current
                current = RawSample(prefix, url, {})
            current.files[suffix.lower()] = data
    except Exception:
        if current is not None and complete is not None and complete <= set(current.files):
            yield current
        raise
    if current is not None:
        yield current


def read_segment(url: str, start: int, stop: int, *, allow_pipe: bool = False,
                 remote: Remote = Remote()) -> Iterator[RawSample]:
    """Exactly `stop - start` items: samples start..stop-1 of a shard, in tar order.

    Positions the shard cannot deliver (it will not open, or it ends, breaks
    or stops answering before `stop`) come back as placeholders with `reason`
    set, so a reader's position always matches the manifest's counts.
    Problems are logged with the (redacted) URL once per call.
    """
    refuse_pipe(url, allow_pipe)
    try:
        stream = open_shard(url, allow_pipe=allow_pipe, remote=remote)
    except Exception as exn:  # any opener failure: missing file, permissions, network
        reason = _reason(exn, UNREADABLE)
        log.warning("shard %s could not be opened (%s); its %d samples are skipped as %s",
                    redact(url), describe(exn), stop - start, reason)
        yield from _placeholders(url, start, stop, reason)
        return
    index, reason = 0, DAMAGED
    try:
        with stream:
            for group in _key_groups(stream, url):
                if index >= stop:
                    break
                if index >= start:
                    yield group
                index += 1
    except Exception as exn:  # tarfile.ReadError, EOFError, OSError mid-stream, RemoteError
        reason = _reason(exn, DAMAGED)
        log.warning("shard %s is damaged after %d samples (%s); the rest of it is skipped as %s",
                    redact(url), index, describe(exn), reason)
    else:
        if index < stop:
            log.warning("shard %s ended after %d samples; its manifest lists more", redact(url), index)
    yield from _placeholders(url, max(index, start), stop, reason)


def _placeholders(url: str, start: int, stop: int, reason: str) -> Iterator[RawSample]:
    name = _split_url(redact(url))[1]
    for i in range(start, stop):
        yield RawSample(f"{name}#{i}", url, {}, reason)
