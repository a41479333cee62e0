"""Remote shard files: every open and read under a deadline, retried with backoff; URLs redacted in messages.

A server that accepts a connection and never answers would otherwise hold a
reader forever, and fsspec's backends each have their own (or no) timeout.
So each remote call (open, read, listing) runs in a daemon thread that is
abandoned after `timeout_s`: a blocked socket read cannot be interrupted,
but the reader moves on. HTTP(S) also gets aiohttp timeouts of the same
length, so abandoned requests end too. A transient failure (timeout,
connection refused or dropped, DNS, HTTP 429/5xx) is tried again up to
`retries` times, waiting 1 s, 2 s, 4 s... (never longer than `timeout_s`),
each retry logged; then `RemoteError` says why: `remote_timeout` or
`unreachable`. A missing file (FileNotFoundError) is not retried.

`redact` hides credentials in anything printed: the password (or a lone
user name, often a token) of a URL's userinfo, and the values of query
parameters named like secrets (token, key, secret, signature, sig,
password, credential, x-amz-*).
"""
from __future__ import annotations

import asyncio
import errno
import io
import logging
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass

import fsspec

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 1.0
READ_BUFFER = 1 << 20  # bytes per deadline-guarded read; tar parsing reads far smaller pieces
REMOTE_TIMEOUT = "remote_timeout"
UNREACHABLE = "unreachable"
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
                       errno.ENETUNREACH, errno.EPIPE}

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"^(?P<scheme>[^:/]+://)(?P<userinfo>[^/?#]*)@")
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;#]+)=(?P<value>[^&;#]*)")
_SECRET_KEY = re.compile(r"token|key|secret|signature|sig|passw|credential|^x-amz-", re.IGNORECASE)
HIDDEN = "***"


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***."""
    return _URL.sub(lambda m: _redact_url(m.group(0)), str(text))


def _redact_url(url: str) -> str:
    def userinfo(m: re.Match) -> str:
        user, colon, _ = m.group("userinfo").partition(":")
        return f"{m.group('scheme')}{user if colon else HIDDEN}{colon}{HIDDEN if colon else ''}@"

    def pair(m: re.Match) -> str:
        if _SECRET_KEY.search(m.group("key")):
            return f"{m.group('sep')}{m.group('key')}={HIDDEN}"
        return m.group(0)

    return _QUERY_PAIR.sub(pair, _USERINFO.sub(userinfo, url, count=1))


@dataclass(frozen=True)
class Remote:
    """How long one remote call may take and how often a transient failure is tried again."""

    timeout_s: float = 60.0
    retries: int = 3

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"remote timeout_s={self.timeout_s!r} must be > 0")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"remote retries={self.retries!r} must be an integer >= 0")


class RemoteError(OSError):
    """A remote call that failed every attempt; `reason` is remote_timeout or unreachable."""

    def __init__(self, reason: str, url: str, attempts: int, cause: BaseException):
        self.reason = reason
        self.detail = f"{reason} after {attempts} attempt(s): {describe(cause)}"
        super().__init__(f"{redact(url)}: {self.detail}")


def describe(exn: BaseException) -> str:
    """One line naming an exception, credentials redacted (a RemoteError without its URL)."""
    if isinstance(exn, RemoteError):
        return exn.detail
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {redact(text[0])}" if text else type(exn).__name__


def transient_cause(exn: BaseException) -> tuple[str, BaseException] | None:
    """(remote_timeout or unreachable, the error in `exn`'s chain that says so) for a failure
    worth retrying; None for any other (fsspec wraps a refused connection in FileNotFoundError)."""
    while exn is not None:
        if isinstance(exn, RemoteError):
            return None
        if isinstance(exn, (TimeoutError, asyncio.TimeoutError)):  # ours, fsspec's, aiohttp's
            return REMOTE_TIMEOUT, exn
        aiohttp = sys.modules.get("aiohttp")
        if (isinstance(exn, (ConnectionError, socket.gaierror))
                or (isinstance(exn, OSError) and exn.errno in _UNREACHABLE_ERRNOS)
                or (aiohttp is not None and isinstance(exn, (aiohttp.ClientConnectionError,
                                                             aiohttp.ClientPayloadError)))):
            return UNREACHABLE, exn
        status = getattr(exn, "status", None)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return UNREACHABLE, exn
        exn = exn.__cause__
    return None


def within(seconds: float, fn, *args):
    """fn(*args), or TimeoutError once `seconds` pass (the call is left running in a daemon thread)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exn:  # handed to the caller
            box["error"] = exn

    thread = threading.Thread(target=run, daemon=True, name="remote-call")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def retrying(action, url: str, remote: Remote):
    """action() until it succeeds, fails for good, or has failed transiently 1 + retries times."""
    for attempt in range(remote.retries + 1):
        try:
            return action()
        except Exception as exn:
            transient = transient_cause(exn)
            if transient is None:
                raise
            reason, cause = transient
            if attempt == remote.retries:
                raise RemoteError(reason, url, attempt + 1, cause) from None  # the chain may hold secrets
            wait = min(FIRST_BACKOFF_S * 2 ** attempt, remote.timeout_s)
            log.warning("%s: %s (%s); attempt %d of %d, retrying in %.1f s", redact(url), reason,
                        describe(cause), attempt + 1, remote.retries + 1, wait)
            time.sleep(wait)


def filesystem(url: str, remote: Remote):
    """(fsspec filesystem, path) for a URL, with the backend's own timeouts where we know them."""
    protocol = url.split("://", 1)[0].lower()
    options = {}
    if protocol in ("http", "https"):
        import aiohttp  # fsspec's HTTP backend needs it anyway

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
            total=None, connect=remote.timeout_s, sock_read=remote.timeout_s)}
    return fsspec.core.url_to_fs(url, **options)


def glob(url: str, remote: Remote) -> list[str]:
    """Sorted full URLs matching a remote glob pattern."""
    fs, path = filesystem(url, remote)
    found = retrying(lambda: within(remote.timeout_s, fs.glob, path), url, remote)
    return sorted(fs.unstrip_protocol(p) for p in found)


def open_remote(url: str, remote: Remote) -> io.BufferedReader:
    """A binary stream over a remote file; every open and read bounded as the module docstring says."""
    return io.BufferedReader(_RemoteRaw(url, remote), READ_BUFFER)


class _RemoteRaw(io.RawIOBase):
    """Reads under a deadline; a failed read reopens the file at the same offset before it is retried."""

    def __init__(self, url: str, remote: Remote):
        super().__init__()
        self._file = None
        self._url, self._remote = url, remote
        self._fs, self._path = filesystem(url, remote)
        self._pos = 0
        self._file = retrying(self._open, url, remote)

    def _open(self):
        file = within(self._remote.timeout_s, self._fs.open, self._path, "rb")
        if self._pos:
            file.seek(self._pos)
        return file

    def _read_once(self, size: int) -> bytes:
        if self._file is None:
            self._file = self._open()
        try:
            return within(self._remote.timeout_s, self._file.read, size)
        except BaseException:
            self._file = None  # abandoned: a late answer must not move a file still in use
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = retrying(lambda: self._read_once(len(buffer)), self._url, self._remote)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()
