"""The loopback image server that tests, the demo and the download benchmark fetch from."""
import threading
import urllib.error
import urllib.request

import pytest

from pipeline.serve_images import NOT_AN_IMAGE, serve_folder

JPEG = b"\xff\xd8 jpeg bytes"


@pytest.fixture()
def served(tmp_path):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    with serve_folder(tmp_path) as base:
        yield base


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_routes_answer_with_status_headers_and_body(served):
    status, headers, body = _get(f"{served}/a.jpg?row=3")
    assert (status, headers["Content-Type"], headers["Content-Length"], body) == \
        (200, "image/jpeg", str(len(JPEG)), JPEG)
    assert _get(f"{served}/noai/a.jpg")[1]["X-Robots-Tag"] == "noai"
    assert _get(f"{served}/notimage/x")[2] == NOT_AN_IMAGE
    for missing in ("404/a.jpg", "nothere.jpg", "../etc/passwd", "noai/%2e%2e/secret"):
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{served}/{missing}")
        assert err.value.code == 404 and err.value.read() == b""


def test_connections_reuse_threads(served):
    """One thread per connection was a fifth of the server's CPU under a downloader's load."""
    for i in range(40):
        assert _get(f"{served}/a.jpg?row={i}")[0] == 200
    workers = [t for t in threading.enumerate() if t.name.startswith("image-server_")]
    assert 1 <= len(workers) <= 4
