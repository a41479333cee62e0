"""pipeline.tar_members against WebDataset's tarfile-based reader: the same members, and a failure
exactly where that one fails, on every header format and on archives cut at every byte."""
import gzip
import io
import tarfile

import pytest
import webdataset as wds
from webdataset.handlers import reraise_exception
from webdataset.tariterators import tar_file_iterator

from pipeline.tar_members import tar_members


def _reference(data: bytes):
    members, raised = [], False
    try:
        for m in tar_file_iterator(io.BytesIO(data), handler=reraise_exception):
            members.append((m["fname"], m["data"]))
    except Exception:
        raised = True
    return members, raised


def _ours(data: bytes, chunk: int | None = None):
    members, raised = [], False
    stream = _Trickle(data, chunk) if chunk else io.BytesIO(data)
    try:
        for name, payload in tar_members(stream):
            members.append((name, payload))
    except tarfile.ReadError:
        raised = True
    return members, raised


class _Trickle(io.RawIOBase):
    """A pipe-like stream: every read returns at most `chunk` bytes."""

    def __init__(self, data: bytes, chunk: int):
        self.data, self.pos, self.chunk = data, 0, chunk

    def read(self, size=-1):
        size = len(self.data) if size is None or size < 0 else size
        out = self.data[self.pos:self.pos + min(size, self.chunk)]
        self.pos += len(out)
        return out


def _add(tar, name, data=b"", kind=tarfile.REGTYPE, **extra):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    for key, value in extra.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def _archive(fmt, pax_headers=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers or {}) as tar:
        _add(tar, "a0.jpg", b"\xff\xd8jpeg" * 40)
        _add(tar, "a0.txt", "a caption".encode())
        _add(tar, "__meta__", b"skip me")
        _add(tar, "dir", kind=tarfile.DIRTYPE)
        _add(tar, "link.jpg", kind=tarfile.SYMTYPE, linkname="a0.jpg")
        _add(tar, "hard.jpg", kind=tarfile.LNKTYPE, linkname="a0.jpg")
        _add(tar, "fifo", kind=tarfile.FIFOTYPE)
        _add(tar, "empty.txt", b"")
        _add(tar, "deep/" * 30 + "b1.jpg", b"long name" * 3)          # GNU L / ustar prefix / PAX path
        _add(tar, "caf\u00e9/b2.txt", "\u00e9t\u00e9".encode())        # non-ASCII name
        _add(tar, "c3.jpg", bytes(range(256)) * 3)
    return buf.getvalue()


def _webdataset_archive() -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as writer:   # PAX headers for the float mtime
        for i in range(3):
            writer.write({"__key__": f"k{i}", "jpg": bytes([i]) * (300 + 700 * i), "txt": b"words"})
    return buf.getvalue()


ARCHIVES = {
    "gnu": lambda: _archive(tarfile.GNU_FORMAT),
    "pax": lambda: _archive(tarfile.PAX_FORMAT),
    "pax_global": lambda: _archive(tarfile.PAX_FORMAT, {"comment": "global header"}),
    "webdataset": _webdataset_archive,
}


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_same_members_as_tarfile(kind):
    data = ARCHIVES[kind]()
    expected = _reference(data)
    assert expected[0] and not expected[1]
    assert _ours(data) == expected
    assert _ours(data, chunk=37) == expected   # short reads, as from a pipe or a socket


def test_ustar_prefix_joins_the_name():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "deep/" * 25 + "x.jpg", b"payload")
    data = buf.getvalue()
    assert _ours(data) == _reference(data) == ([("deep/" * 25 + "x.jpg", b"payload")], False)


def _cuts(data: bytes) -> list[int]:
    """Every 7th byte, and every byte next to a block boundary or a member's data end."""
    end = min(len(data), len(data.rstrip(b"\0")) + 1024)
    ends = [m.offset_data + m.size for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()]
    near = {at + d for at in [*range(0, end, 512), *ends] for d in (-1, 0, 1)}
    return sorted(c for c in set(range(0, end + 1, 7)) | near if 0 <= c <= end)


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_cut_anywhere_fails_where_tarfile_fails(kind):
    data = ARCHIVES[kind]()
    for cut in _cuts(data):
        assert _ours(data[:cut]) == _reference(data[:cut]), f"cut at byte {cut}"


def test_damaged_header_mid_archive_ends_it_as_tarfile_does():
    data = bytearray(_webdataset_archive())
    members = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()
    data[members[3].offset + 10] ^= 0xFF   # breaks that header's checksum
    assert _ours(bytes(data)) == _reference(bytes(data))
    assert len(_ours(bytes(data))[0]) < 6


def test_compressed_and_foreign_streams_go_to_tarfile():
    data = _webdataset_archive()
    assert _ours(gzip.compress(data)) == _reference(data)
    assert _ours(b"not a tar at all" * 64)[1] is True
    assert _ours(b"") == _reference(b"")
    assert _ours(bytes(1024)) == _reference(bytes(1024)) == ([], False)
