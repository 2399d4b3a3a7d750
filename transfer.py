"""Moving the bytes of one file into its partial: the backend interface every transport
implements, the failures it reports, the HTTP rules they share, and the python backend.

The external tools (aria2c, wget) implement the same interface in tools.py; the downloader
picks a backend per file and decides what each failure means for the run.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import http.client
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, Mapping, Protocol
from urllib.parse import urljoin, urlsplit

from dataset_manager import RemoteFile
from http_pool import ConnectTimeout, Pool, Response
from hub_http import retry_after_header as retry_after_seconds  # files read it as the API does
from ranges import Growth, LinkProbe, Pieces
from stream_hash import PrefixHasher
from partial import Partial
from utils import HFDError, hash_file, new_hasher, read_json, strip_query, write_json_atomic

if TYPE_CHECKING:
    import hashlib

# what a connection can raise while we wait for a response or its body (a failed write is
# caught before: write_error)
NETWORK_ERRORS = (OSError, http.client.HTTPException)

Report = Callable[[int], None]      # bytes of the file now in its partial


# ================================================================ the interface

class FailureKind(enum.Enum):
    """Why an attempt failed; the downloader maps each kind to what it does next."""

    TRANSIENT = "transient"          # network, server error, expired link: try again
    RATE_LIMITED = "rate_limited"    # 429: the whole task waits `retry_after` seconds
    DENIED = "denied"                # gated or unauthorised: more tries will not help
    NOT_FOUND = "not_found"          # 404: the file is not at this commit
    BAD_PARTIAL = "bad_partial"      # the partial bytes cannot be continued: start over
    DISK_FULL = "disk_full"          # no space to write: stop the run
    STOPPED = "stopped"              # the run's stop event was set


class FetchError(Exception):
    """One failed attempt at fetching a file, of one kind."""

    def __init__(self, message: str, kind: FailureKind = FailureKind.TRANSIENT,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


@dataclass
class Job:
    """One file to fetch into its partial."""

    file: RemoteFile
    final: Path
    partial: Partial
    url: str                       # the resolve URL on the endpoint
    token: str | None
    endpoint: str
    connections: int
    max_single_get: int
    link: str | None = None        # a tokenless download link resolved ahead (see tools.tool_url)
    most_connections: int = 0      # auto: connections may grow to this while throughput grows
    probe: LinkProbe | None = None  # auto: try one connection first (ranges.Growth)

    @property
    def needs_ranges(self) -> bool:
        """The CDN refuses one GET above max_single_get, so such files, and partials already
        fetched in ranged parts, can only be continued in ranged requests."""
        return self.file.size > self.max_single_get or self.partial.part_map.exists()


class Backend(Protocol):
    """One way of moving a file's bytes into its partial."""

    name: str
    resumable: frozenset[str]        # the Partial.kind() values it can continue

    def open(self) -> None:
        """Start what the backend keeps running for the run (called from the main thread)."""

    def close(self) -> None:
        """End what open() started and remove what it left behind; safe after a stop."""

    def fetch(self, job: Job, report: Report, stop: threading.Event) -> str | None:
        """Fill job.partial, calling report(bytes in the partial) as they arrive.

        Returns the hex digest when the bytes were hashed while streaming, else None (the
        caller hashes the file). Raises FetchError; a set `stop` ends it with STOPPED."""


# ================================================================ shared HTTP pieces

def _origin(url: str) -> tuple[str, str, int | None]:
    # urlsplit: the parser of the HTTP client that will connect (http_pool)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b)


def auth_headers(url: str, job: Job) -> dict[str, str]:
    """The token goes only to the endpoint's own origin."""
    if job.token and same_origin(url, job.endpoint):
        return {"Authorization": f"Bearer {job.token}"}
    return {}


class Chain:
    """The URLs of one request and its redirects, and whether the token may still go along:
    never again once the chain has left the endpoint's origin, even if it comes back. A chain
    may start at a link found by an earlier one that left (`elsewhere`): no token there."""

    def __init__(self, job: Job, elsewhere: str | None = None) -> None:
        self.job, self.url, self.left = job, elsewhere or job.url, elsewhere is not None

    def headers(self) -> dict[str, str]:
        return {} if self.left else auth_headers(self.url, self.job)

    def follow(self, location: str) -> str:
        """The next URL; refuses targets with user info or a backslash (parsers disagree on
        where their host is)."""
        target = urljoin(self.url, location)
        if "\\" in target or "@" in urlsplit(target).netloc:
            raise FetchError(f"refused a redirect to a suspicious URL ({strip_query(target)})",
                             FailureKind.DENIED)
        self.url = target
        if not same_origin(target, self.job.endpoint):
            self.left = True
        return target


class Located:
    """Where a file's bytes are once a redirect led off the endpoint (a CDN link): its other
    ranges go straight there, a round trip less each."""

    def __init__(self) -> None:
        self.url: str | None = None


# ---- what went wrong, in plain words: the one wording of each case, whatever the tool

def cut_short(have: int, size: int) -> FetchError:
    """The server closed (or reset) the connection before the whole file arrived."""
    return FetchError(f"connection closed by the server after {have} of {size} bytes")


def stalled(seconds: float) -> FetchError:
    """No byte arrived for the stall timeout."""
    return FetchError(f"no data for {seconds:g} s")


def refused() -> FetchError:
    return FetchError("the server refused the connection")


def http_error(status: int, url: str, headers: Mapping[str, str]) -> FetchError:
    """Map an HTTP status on a file request to a FetchError."""
    if status == 429:
        return FetchError("rate limited (429)", FailureKind.RATE_LIMITED,
                          retry_after=retry_after_seconds(headers) or 5.0)
    code = headers.get("X-Error-Code", "")
    if code == "GatedRepo" or (status == 401 and code in ("", "RepoNotFound")):
        # A bare 401 (no Hub error code) may come from a proxy in the way: worth a retry.
        return FetchError(f"HTTP {status} {code or 'unauthorized'}: access refused",
                          FailureKind.DENIED if code else FailureKind.TRANSIENT)
    if status == 403:
        # A signed CDN link that expired: ask /resolve/ again on the next attempt.
        return FetchError("the CDN link expired (403); asking for a new one")
    if status == 404:
        return FetchError(f"HTTP 404 {code or 'not found'}", FailureKind.NOT_FOUND)
    if status == 416:
        return FetchError("HTTP 416 (range not satisfiable)", FailureKind.BAD_PARTIAL)
    if status >= 500:
        return FetchError(f"server error {status}")
    return FetchError(f"HTTP {status}")


def network_error(exc: BaseException, have: int, size: int, stall_timeout: float) -> FetchError:
    """A failure of the connection in plain words, not the socket's exception text."""
    import socket
    if isinstance(exc, http.client.InvalidURL):       # e.g. a proxy we cannot speak to
        return FetchError(str(exc)[:200], FailureKind.DENIED)
    if isinstance(exc, ConnectTimeout):
        return FetchError(f"no answer from the server in {min(30, stall_timeout):g} s")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return stalled(stall_timeout)
    if isinstance(exc, ConnectionRefusedError):
        return refused()
    if isinstance(exc, socket.gaierror):
        return FetchError("cannot resolve the server's name")
    return cut_short(have, size)


def resolve_location(pool: Pool, job: Job) -> str:
    """Follow the endpoint's redirects with HEAD, stopping at another origin (a CDN).

    Used when a token is set: a link on another origin needs no token and can go to aria2c
    or wget; a link on the endpoint's origin needs it, so the python backend fetches it.
    """
    chain = Chain(job)
    for _ in range(10):
        with pool.request("HEAD", chain.url, chain.headers()) as resp:
            if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                chain.follow(resp.headers["Location"])
                if chain.left:
                    return chain.url
                continue
            if resp.status_code >= 400:
                raise http_error(resp.status_code, chain.url, resp.headers)
            return chain.url
    raise FetchError("too many redirects")


def short_error(exc: BaseException) -> str:
    """The first line of an exception, without urllib3's object reprs."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = re.sub(r"(url: [^\s?]*)\?\S*", r"\1", line)   # urllib3 names the path and query
    return strip_query(re.sub(r"<urllib3\.[^>]*>", "", line))[:200]


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)     # no space, or the user's quota is used up


def write_error(exc: OSError) -> FetchError:
    return FetchError(f"write failed: {exc.strerror}",
                      FailureKind.DISK_FULL if exc.errno in FULL_DISK_ERRNOS
                      else FailureKind.TRANSIENT)


# ================================================================ the python backend

class PythonBackend:
    """Connections in threads; hashes while writing (one stream) or the finished prefix as it
    grows (ranged parts for huge files or -x N)."""

    name = "python"
    resumable = frozenset({"seq", "parts"})
    CHUNK = 1 << 20        # read1: up to this much, but whatever has arrived (slow links too)
    MIN_PART = 64 << 20    # -x N: files from 2 x this up go in ranges (fixed count)
    MIN_SPLIT = 1 << 20    # an idle connection takes half a range only if both halves have this

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.pool = Pool(min(30, stall_timeout), stall_timeout)

    def open(self) -> None:
        """Nothing runs between files (the pool keeps their connections)."""

    def close(self) -> None:
        self.pool.close()

    def fetch(self, job: Job, report: Report, stop: threading.Event) -> str | None:
        # -x N splits files from 2 x MIN_PART up; auto (most_connections set) chose the count
        # from the size already
        least = 2 * self.MIN_SPLIT if job.most_connections else 2 * self.MIN_PART
        if job.needs_ranges or (job.connections > 1 and job.file.size >= least):
            return self._fetch_parts(job, report, stop)
        return self._fetch_stream(job, report, stop)

    # ---- one stream, resumed from the partial's length, hashed as it is written
    def _fetch_stream(self, job: Job, report: Report, stop: threading.Event) -> str:
        f, path = job.file, job.partial.path
        offset = os.path.getsize(path) if path.exists() else 0
        if offset > f.size:
            offset = 0
        hasher = new_hasher(f.hash_kind, f.size)
        if offset:
            hash_file(path, f.hash_kind, f.size, start_hasher=hasher)  # primes hasher
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._get(job, headers, offset)
        with resp:
            if offset and resp.status_code == 200:      # the server ignored Range: start over
                offset, hasher = 0, new_hasher(f.hash_kind, f.size)
            elif offset and not _range_starts_at(resp, offset):
                raise FetchError("the server answered a different range", FailureKind.BAD_PARTIAL)
            mode = "r+b" if offset else "wb"
            with job.partial.open(mode) as out:
                out.seek(offset)
                out.truncate()
                done = self._copy(resp, out, hasher, offset, report, stop, f.size)
                out.flush()
        if done != f.size:
            raise cut_short(done, f.size)
        return hasher.hexdigest()

    def _get(self, job: Job, headers: dict[str, str], have: int,
             located: Located | None = None) -> Response:
        """GET the resolve URL, following redirects ourselves so the token stays home. With
        `located`: straight to the CDN link an earlier range of the file was sent to (no token:
        it is another origin), else it remembers where this one was sent."""
        if located is not None and located.url:
            try:
                return self._follow(job, Chain(job, located.url), headers, have)
            except FetchError as exc:
                if exc.kind is FailureKind.STOPPED:
                    raise
                located.url = None        # expired or refused there: ask the endpoint again
        return self._follow(job, Chain(job), headers, have, located)

    def _follow(self, job: Job, chain: Chain, headers: dict[str, str], have: int,
                located: Located | None = None) -> Response:
        try:
            for _ in range(10):
                asked = time.monotonic()
                resp = self.pool.request("GET", chain.url, {**headers, **chain.headers()})
                if job.probe is not None:
                    job.probe.answered(time.monotonic() - asked)
                if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                    resp.close()
                    chain.follow(resp.headers["Location"])
                    if located is not None and chain.left:
                        located.url = chain.url     # the file's other ranges: straight there
                    continue
                if resp.status_code >= 400:
                    resp.close()
                    raise http_error(resp.status_code, chain.url, resp.headers)
                return resp
        except NETWORK_ERRORS as exc:
            raise network_error(exc, have, job.file.size, self.stall_timeout) from None
        raise FetchError("too many redirects")

    def _copy(self, resp: Response, out: IO[bytes], hasher: "hashlib._Hash",
              offset: int, report: Report, stop: threading.Event, size: int) -> int:
        done = offset
        try:
            for chunk in _chunks(resp, self.CHUNK):
                if stop.is_set():
                    raise FetchError("stopped", FailureKind.STOPPED)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise write_error(exc) from None
                hasher.update(chunk)
                done += len(chunk)
                report(done)
        except NETWORK_ERRORS as exc:
            raise network_error(exc, done, size, self.stall_timeout) from None
        return done

    # ---- ranged parts into one file; progress of each part kept in the partial's part map
    def _fetch_parts(self, job: Job, report: Report, stop: threading.Event) -> str | None:
        """The parts in threads; the finished prefix hashed from the disk as it grows."""
        hasher = PrefixHasher(job.partial.path, job.file)
        try:
            self._fetch_parts_into(job, report, stop, hasher)
            return hasher.finish()
        finally:
            hasher.close()

    def _fetch_parts_into(self, job: Job, report: Report, stop: threading.Event,
                          hasher: PrefixHasher) -> None:
        f, path = job.file, job.partial.path
        growth = Growth(job.connections, job.most_connections or job.connections,
                        probe=job.probe if job.most_connections else None)
        pieces = Pieces(self._load_parts(job, growth.wanted), self.MIN_SPLIT)
        with job.partial.open("r+b" if path.exists() else "w+b") as out:
            out.truncate(f.size)
        errors: list[FetchError] = []
        located = Located()

        ended = threading.Event()

        def progress() -> None:
            report(pieces.done())
            hasher.advance(pieces.prefix())

        def connection() -> None:
            try:
                while not errors and not stop.is_set():
                    part = pieces.take()
                    if part is None:
                        return
                    try:
                        self._fetch_range(job, pieces, part, progress, hasher.feed, located,
                                          stop)
                    except FetchError as exc:
                        errors.append(exc)
                    except OSError as exc:     # opening the partial: a full disk stops the run
                        errors.append(write_error(exc))
                    except Exception as exc:   # else its range would be taken again and again
                        errors.append(FetchError(f"{type(exc).__name__}: {exc}"))
                    finally:
                        pieces.release(part)
            finally:
                ended.set()

        saver_stop = threading.Event()
        saver = threading.Thread(target=self._save_parts_loop, args=(job, pieces, saver_stop),
                                 daemon=True)
        saver.start()
        running: list[threading.Thread] = []
        while True:
            while (len(running) < growth.wanted and not errors and not stop.is_set()
                   and pieces.worth_more()):
                running.append(threading.Thread(target=connection, daemon=True))
                running[-1].start()
            running = [t for t in running if t.is_alive()]
            if not running:
                break
            ended.wait(0.02 if growth.probing else 0.1)
            ended.clear()
            growth.tick(pieces.done())
        saver_stop.set()
        saver.join()
        if errors or pieces.done() < f.size:
            self._save_parts(job, pieces)      # else the check and promote_to come next
        logging.getLogger("hfdl.transfer").debug(
            "%s: %d connections at most, %d ranges", job.file.path, growth.wanted,
            len(pieces.parts))
        if errors:
            raise errors[0]
        progress()

    def _load_parts(self, job: Job, connections: int) -> list[list[int]]:
        """[start, end(inclusive), next offset] per part, from the part map if it matches, else
        one per connection (connections added later split the ranges left)."""
        f, path = job.file, job.partial.part_map
        try:
            saved = read_json(path)
            if saved.get("size") == f.size and saved.get("hash") == f.expected_hash:
                return [list(map(int, p)) for p in saved["parts"]]
        except (HFDError, KeyError, TypeError, ValueError):
            pass
        count = max(connections, -(-f.size // job.max_single_get))
        step = max(1, -(-f.size // max(1, count)))
        parts = [[s, min(f.size, s + step) - 1, s] for s in range(0, f.size, step)]
        if job.partial.path.exists() and not path.exists():   # a sequential partial: keep its head
            have = os.path.getsize(job.partial.path)
            for p in parts:                                    # in every range it covers
                p[2] = max(p[0], min(have, p[1] + 1))
        return parts

    def _fetch_range(self, job: Job, pieces: Pieces, part: list[int], report: Callable[[], None],
                     feed: Callable[[int, bytes], None], located: Located,
                     stop: threading.Event) -> None:
        """One range, until its end; another connection may take its back half meanwhile
        (its end moves closer: the bytes past it are left to that connection)."""
        offset, end = part[2], pieces.end_of(part)
        resp = self._get(job, {"Range": f"bytes={offset}-{end}"}, pieces.done(), located)
        with resp, job.partial.open("r+b") as out:
            if not _range_starts_at(resp, offset):
                raise FetchError("the server ignored a range request")
            out.seek(offset)
            try:
                for chunk in _chunks(resp, self.CHUNK):
                    if stop.is_set():
                        raise FetchError("stopped", FailureKind.STOPPED)
                    chunk = chunk[:end + 1 - offset]
                    try:
                        out.write(chunk)
                        out.flush()       # on disk before the part map or the hasher counts it
                    except OSError as exc:
                        raise write_error(exc) from None
                    feed(offset, chunk)   # hashed from memory if it extends the hashed prefix
                    offset += len(chunk)
                    end = pieces.advance(part, offset)
                    report()
                    if offset > end:
                        break
            except NETWORK_ERRORS as exc:
                raise network_error(exc, pieces.done(), job.file.size, self.stall_timeout) from None
        if offset <= end:
            raise cut_short(pieces.done(), job.file.size)

    def _save_parts_loop(self, job: Job, pieces: Pieces, stop: threading.Event) -> None:
        while not stop.wait(2.0):
            self._save_parts(job, pieces)

    def _save_parts(self, job: Job, pieces: Pieces) -> None:
        # Data first, then the record of it: the part map never claims unwritten bytes.
        snapshot = pieces.snapshot()
        with contextlib.suppress(OSError):
            fd = os.open(job.partial.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):
            write_json_atomic(job.partial.part_map, {"size": job.file.size,
                                                     "hash": job.file.expected_hash,
                                                     "parts": snapshot}, indent=None)


def _chunks(resp: Response, size: int) -> Iterator[bytes]:
    """The body as it arrives: read1 returns what is there (up to `size`) instead of waiting
    for a full chunk, so big chunks stay cheap on fast links and prompt on slow ones."""
    while True:
        chunk = resp.read1(size)
        if not chunk:
            return
        yield chunk


def _range_starts_at(resp: Response, offset: int) -> bool:
    if resp.status_code != 206:
        return offset == 0 and resp.status_code == 200
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return match is not None and int(match.group(1)) == offset
