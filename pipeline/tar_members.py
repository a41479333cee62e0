"""The regular-file members of a tar stream as (name, bytes), one header parse per member.

What WebDataset's `tar_file_iterator` yields (that is the contract, tested
member for member and failure for failure against it on regular, PAX, GNU and
ustar archives cut at every byte), without `tarfile`'s per-member Python
objects: reading a shard's members through `tarfile` cost about 0.1 ms each,
a tenth of a JPEG decode (docs/SPEED.md). Rules, as `tarfile` in stream mode
applies them:

- only regular files are yielded (directories, links, devices are skipped
  with their data); names starting and ending in `__` (WebDataset's
  metadata) are skipped;
- PAX headers (`x` local, `g` global) give `path` and `size`; GNU `L`
  headers give the next name; the ustar prefix field is joined to the name;
- the archive ends at the first block of zeros, at a clean end of the
  stream, or at an invalid header after the first; an invalid first header
  or a member whose data ends early raises `tarfile.ReadError`;
- a stream that does not start with a valid header (compressed, or not a
  tar at all) is handed to `tar_file_iterator` itself, which decompresses
  or raises.

GNU sparse members do not occur in web shards and raise `tarfile.ReadError`.
"""
from __future__ import annotations

import re
import tarfile
from typing import Iterator

from webdataset.handlers import reraise_exception
from webdataset.tariterators import tar_file_iterator

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_META = re.compile(r"__[^/]*__($|/)")
_USTAR = b"ustar\x0000"
_SPARSE = b"S"


class _Invalid(Exception):
    """A header that is not one (bad checksum or number)."""


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular member of a binary tar stream; see the module docstring."""
    first = _read(stream, BLOCK)
    try:
        start = _checked(first)
    except _Invalid:
        start = None
    if start is None:   # not an uncompressed tar (or empty): tarfile decompresses, ends or raises
        yield from ((m["fname"], m["data"]) for m in
                    tar_file_iterator(_Replay(first, stream), handler=reraise_exception))
        return
    global_pax: dict[str, bytes] = {}
    block = first
    while True:
        try:
            header = _checked(block)
        except _Invalid:
            return   # tarfile ends a stream at an invalid header after the first
        if header is None:
            return   # a zero block or the end of the stream
        name, size, kind = header
        extra: dict[str, bytes] = {}
        while kind in (b"x", b"g", b"X", b"L", b"K"):   # headers that describe the next member
            data, _ = _data(stream, size)   # cut short: the header after it is missing, which raises
            if kind == b"g":
                global_pax.update(_pax_records(data))
            elif kind in (b"x", b"X"):
                extra.update(_pax_records(data))
            elif kind == b"L":
                extra["path"] = data.split(b"\0", 1)[0]
            try:
                header = _checked(_read(stream, BLOCK))
            except _Invalid:
                raise tarfile.ReadError("invalid header after an extended header") from None
            if header is None:
                raise tarfile.ReadError("the archive ends after an extended header")
            name, size, kind = header
        pax = {**global_pax, **extra}
        if "path" in pax:
            name = pax["path"].decode("utf-8", "surrogateescape")
        if "size" in pax:
            size = _pax_size(pax["size"])
        if kind == _SPARSE or any(key.startswith("GNU.sparse") for key in pax):
            raise tarfile.ReadError(f"sparse tar member {name!r} is not supported")
        if kind == b"0" and name.endswith("/"):
            kind = b"5"   # tarfile's rule: an old-style regular header whose name ends in / is a directory
        wanted = kind in _REGULAR and not _META.match(name)
        if wanted or kind not in b"123456":   # tarfile skips the data of regular and unknown types only
            data, whole = _data(stream, size)
            if wanted:
                if len(data) < size:
                    raise tarfile.ReadError("unexpected end of data")
                yield name, data
            if not whole:   # the stream ends inside the padding: tarfile fails on the next header
                raise tarfile.ReadError("unexpected end of data")
        block = _read(stream, BLOCK)


def _read(stream, size: int) -> bytes:
    """Up to `size` bytes: fewer only at the end of the stream (pipes and sockets return short reads)."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _data(stream, size: int) -> tuple[bytes, bool]:
    """A member's data (`size` bytes, fewer if the stream ends) and whether its padding to the
    block boundary was there too."""
    padded = -(-size // BLOCK) * BLOCK
    data = _read(stream, padded)
    return data[:size], len(data) == padded


def _checked(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type) of a header block; None at the end; _Invalid when it is no header."""
    if len(block) < BLOCK or block.count(0) == BLOCK:
        return None
    stored = _number(block[148:156])
    unsigned = sum(block[:148]) + 256 + sum(block[156:])   # the checksum field counts as 8 spaces
    if stored != unsigned:
        high = sum(1 for b in block[:148] + block[156:] if b > 127)
        if stored != unsigned - 256 * high:   # the signed-char sum some old tars wrote
            raise _Invalid
    name = block[:100].split(b"\0", 1)[0]
    kind = block[156:157]
    if block[257:265] == _USTAR and kind not in b"LKS":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    size = _number(block[124:136])
    if size < 0:
        raise _Invalid
    return name.decode("utf-8", "surrogateescape"), size, kind


def _number(field: bytes) -> int:
    """tarfile's nti: octal text, or GNU base-256 when the first byte is 0x80 or 0xff."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xff else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise _Invalid from None


def _pax_records(data: bytes) -> dict[str, bytes]:
    """`LENGTH KEY=VALUE\\n` records."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            raise tarfile.ReadError("invalid PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise tarfile.ReadError("invalid PAX header") from None
        if length < 1 or pos + length > len(data):
            raise tarfile.ReadError("invalid PAX header")
        key, sep, value = data[space + 1:pos + length - 1].partition(b"=")
        if not sep:
            raise tarfile.ReadError("invalid PAX header")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def _pax_size(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise tarfile.ReadError(f"invalid PAX size {value!r}") from None


class _Replay:
    """A stream that first returns bytes already read from it."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.stream.read(size - len(data))
