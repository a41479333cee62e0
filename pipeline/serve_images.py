"""Serve a folder of images over HTTP on loopback, with routes that fail on purpose.

The download stage is tested (and demonstrated) against real HTTP, not mocks:
this server hands out the folder's files and, under fixed prefixes, the kinds of
failure a web-scale URL list is full of. One implementation serves the tests,
the demo and the download benchmark.

Routes (`NAME` is a file path relative to the folder):
- `/NAME`            the file, with a content type from its extension
- `/404/ANY`         HTTP 404
- `/slow/NAME`       the file, after `slow_seconds` (longer than the client's timeout)
- `/notimage/ANY`    HTTP 200 with `Content-Type: image/jpeg` and bytes that are not an image
- `/noai/NAME`       the file with the header `X-Robots-Tag: noai`

Every request is counted per path in `ImageServer.hits`, so a test can prove
that a resumed download did not fetch finished shards again.

Command line: `python -m pipeline.serve_images DIR [--host 127.0.0.1] [--port 0]
[--slow-seconds S]` serves until interrupted and prints the base URL.
"""
from __future__ import annotations

import argparse
import contextlib
import mimetypes
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

NOT_AN_IMAGE = b"this body is text, not an image\n"
DEFAULT_SLOW_SECONDS = 5.0
# listen backlog: a downloader opens dozens of connections at once, and the
# standard library's 5 makes the kernel drop SYNs (seen as connect timeouts)
LISTEN_BACKLOG = 1024
# connections served at once (more wait in a queue), above a downloader's thread count;
# a connection idle this long is dropped, so a stalled client cannot hold a thread
MAX_CONNECTIONS = 256
IDLE_TIMEOUT_SECONDS = 60.0


class _Server(ThreadingHTTPServer):
    """Requests run on reused threads and each answer is one write: with a thread started per
    connection and the headers written apart, this server took 0.7-1.0 ms of CPU per image
    under the download benchmark's load, now 0.5-0.6 (docs/SPEED.md)."""
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._workers = ThreadPoolExecutor(MAX_CONNECTIONS, thread_name_prefix="image-server")

    def process_request(self, request, client_address):
        self._workers.submit(self.process_request_thread, request, client_address)

    def server_close(self):
        super().server_close()
        self._workers.shutdown(wait=False)


class ImageServer:
    """A threaded HTTP server for one folder; use as a context manager or start()/stop()."""

    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = 0,
                 slow_seconds: float = DEFAULT_SLOW_SECONDS):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise NotADirectoryError(f"image folder to serve does not exist: {self.folder}")
        self.slow_seconds = slow_seconds
        self.hits: Counter = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _Server((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ImageServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="image-server")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the command-line use)."""
        try:
            self._httpd.serve_forever()
        finally:
            self._stopping.set()
            self._httpd.server_close()

    def stop(self) -> None:
        self._stopping.set()  # wakes requests waiting on the /slow/ route
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _count(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def _file(self, name: str) -> Path | None:
        """The served file for a URL path, or None if it is missing or outside the folder."""
        candidate = (self.folder / name).resolve()
        if self.folder not in candidate.parents or not candidate.is_file():
            return None
        return candidate

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = IDLE_TIMEOUT_SECONDS

            def log_message(self, *args):  # keep test and demo output readable
                pass

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                server._count(path)
                route, _, rest = path.lstrip("/").partition("/")
                if route == "404":
                    self._send_status(404)
                elif route == "notimage":
                    self._send(NOT_AN_IMAGE, "image/jpeg")
                elif route == "slow":
                    if not server._stopping.wait(server.slow_seconds):
                        self._send_file(rest)
                elif route == "noai":
                    self._send_file(rest, {"X-Robots-Tag": "noai"})
                else:
                    self._send_file(path.lstrip("/"))

            def _send_status(self, code: int) -> None:
                self._send(b"", None, code=code)

            def _send(self, body: bytes, content_type: str | None, headers: dict | None = None,
                      code: int = 200) -> None:
                """Status line, headers and body in one write (one wake-up for the client)."""
                lines = [f"{self.protocol_version} {code} {self.responses[code][0]}"]
                if content_type is not None:
                    lines.append(f"Content-Type: {content_type}")
                lines.append(f"Content-Length: {len(body)}")
                lines.extend(f"{key}: {value}" for key, value in (headers or {}).items())
                try:
                    self.wfile.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (e.g. its timeout fired): nothing to report

            def _send_file(self, name: str, headers: dict | None = None) -> None:
                file = server._file(name)
                if file is None:
                    self._send_status(404)
                    return
                content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                self._send(file.read_bytes(), content_type, headers)

        return Handler


@contextlib.contextmanager
def serve_folder(folder: str | Path, host: str = "127.0.0.1", port: int = 0,
                 slow_seconds: float = DEFAULT_SLOW_SECONDS) -> Iterator[str]:
    """Serve `folder` for the duration of the block; yields the base URL (no trailing slash)."""
    with ImageServer(folder, host, port, slow_seconds) as server:
        yield server.base_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="folder whose files are served")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--slow-seconds", type=float, default=DEFAULT_SLOW_SECONDS,
                        help="delay of the /slow/ route")
    args = parser.parse_args(argv)
    server = ImageServer(args.folder, args.host, args.port, args.slow_seconds)
    print(server.base_url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
