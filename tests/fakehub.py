"""A local test double of the Hugging Face Hub HTTP API (see /work/shared/HUB_API.md).

Two stdlib HTTP/1.1 servers on 127.0.0.1: the Hub origin (API, /resolve/, /api/resolve-cache/) and a
separate "CDN" origin that serves LFS blobs through signed, expiring links. Being a different origin
matters: real clients must drop Authorization when they follow the LFS 302 there.

    with FakeHub() as hub:
        sha = hub.add_repo("org/model", {"config.json": b"{}", "model.safetensors": Content(5 << 20, seed=1)})
        hub.add_fault("reset", "model.safetensors", after_bytes=1000)
        ...   # HfApi(endpoint=hub.url), aria2c, wget, ...
        assert hub.file_downloads("model.safetensors") == 2

Run `python tests/fakehub.py --demo` for a hub with a few repos to try by hand.
"""
from __future__ import annotations

import argparse
import base64
import fnmatch
import functools
import hashlib
import hmac
import json
import os
import random
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, quote, unquote, urlencode

# ---------------------------------------------------------------- content

BLOCK = 1 << 20
CHUNK = 64 * 1024
LFS_EXTENSIONS = {".bin", ".safetensors", ".h5", ".onnx", ".parquet", ".arrow", ".gguf", ".pt", ".msgpack"}
# A stride coprime with BLOCK: block k is the seed's base block rotated by k*stride, so every MiB of a
# big file differs (a resume that writes a block at the wrong offset is caught by the sha256).
_ROTATION_STRIDE = 1_000_003


@dataclass(frozen=True)
class Content:
    """Deterministic pseudo-random file content of any size, served by range without being held in memory."""

    size: int
    seed: int = 0


@dataclass(frozen=True)
class Virtual:
    """A file that is listed (tree, siblings, HEAD metadata) but whose bytes are never served (GET -> 500)."""

    size: int
    sha256: str | None = None  # None: derived from the path, so each virtual file has its own LFS object


FileData = bytes | Content | Virtual


@functools.lru_cache(maxsize=8)
def _base_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def content_read(content: Content | bytes, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of a file's content (clipped to its size)."""
    if isinstance(content, bytes):
        return content[offset:offset + length]
    end = min(content.size, offset + length)
    base, pieces, pos = _base_block(content.seed), [], offset
    while pos < end:
        k, o = divmod(pos, BLOCK)
        start = (o + k * _ROTATION_STRIDE) % BLOCK
        n = min(end - pos, BLOCK - o, BLOCK - start)
        pieces.append(base[start:start + n])
        pos += n
    return b"".join(pieces)


def iter_content(content: Content | bytes, start: int = 0, end: int | None = None,
                 chunk: int = BLOCK) -> Iterator[bytes]:
    """Stream bytes [start, end) in chunks."""
    size = len(content) if isinstance(content, bytes) else content.size
    end = size if end is None else min(end, size)
    for pos in range(start, end, chunk):
        yield content_read(content, pos, min(chunk, end - pos))


def content_bytes(content: Content | bytes) -> bytes:
    """The whole content in memory (for small files in tests)."""
    return b"".join(iter_content(content))


def content_sha256(content: Content | bytes) -> str:
    h = hashlib.sha256()
    for piece in iter_content(content):
        h.update(piece)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_oid(content: Content | bytes, size: int) -> str:
    h = hashlib.sha1(b"blob %d\0" % size)
    for piece in iter_content(content):
        h.update(piece)
    return h.hexdigest()


def default_is_lfs(path: str, size: int) -> bool:
    return size >= 1024 or os.path.splitext(path)[1].lower() in LFS_EXTENSIONS


# ---------------------------------------------------------------- repo model

@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    oid: str            # git blob sha1; for LFS files, of the pointer file (what the tree's "oid" shows)
    sha256: str
    lfs: bool
    data: bytes | Content | None  # None: virtual
    commit_seq: int     # the commit that last changed the file (for expand=true lastCommit)

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def tree_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs:
            d["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return d


def make_entry(path: str, data: FileData, is_lfs: Callable[[str, int], bool], seq: int) -> FileEntry:
    """Hash the content once (streaming) and compute the git/LFS identities the Hub would show."""
    if isinstance(data, Virtual):
        sha = data.sha256 or hashlib.sha256(b"virtual\0%d\0%s" % (data.size, path.encode())).hexdigest()
        lfs = is_lfs(path, data.size)
        oid = (hashlib.sha1(b"blob %d\0" % len(lfs_pointer(sha, data.size)) + lfs_pointer(sha, data.size))
               .hexdigest() if lfs else hashlib.sha1(b"virtual-blob\0" + sha.encode()).hexdigest())
        return FileEntry(path, data.size, oid, sha, lfs, None, seq)
    size = len(data) if isinstance(data, bytes) else data.size
    sha, lfs = content_sha256(data), is_lfs(path, size)
    if lfs:
        pointer = lfs_pointer(sha, size)
        oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    else:
        oid = git_blob_oid(data, size)
    return FileEntry(path, size, oid, sha, lfs, data, seq)


@dataclass
class Commit:
    sha: str
    seq: int
    title: str
    date: float
    parent: str | None
    files: dict[str, FileEntry]
    _listings: dict[tuple[str, bool, bool], list[str]] = field(default_factory=dict, repr=False)
    _dirs: dict[str, dict[str, Any]] | None = field(default=None, repr=False)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    gated: bool
    private: bool
    is_lfs: Callable[[str, int], bool]
    created: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix) and rev[len(prefix):] in {**self.branches, **self.tags}:
                rev = rev[len(prefix):]
        sha = self.branches.get(rev) or self.tags.get(rev) or rev
        if sha not in self.commits and 7 <= len(sha) < 40:
            # The real Hub resolves a unique short sha (huggingface/huggingface_hub#197, fixed
            # server-side by 2023); its shortest accepted length is unknown: 7 here.
            found = [c for c in self.commits if c.startswith(sha)]
            sha = found[0] if len(found) == 1 else sha
        return self.commits.get(sha)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


def _build_dirs(commit: Commit) -> dict[str, dict[str, Any]]:
    """Directory nodes keyed by path ('' = root): sorted child dirs and files, a git-tree-like oid."""
    nodes: dict[str, dict[str, Any]] = {"": {"dirs": set(), "files": []}}
    for path, entry in commit.files.items():
        # rsplit always shortens the path, so odd names ("/abs", "a//b", "../x") cannot make a cycle.
        child: FileEntry | str = entry
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        while True:
            node = nodes.setdefault(parent, {"dirs": set(), "files": []})
            if isinstance(child, FileEntry):
                node["files"].append(child)
            elif child in node["dirs"]:
                break
            else:
                node["dirs"].add(child)
            if parent == "":
                break
            child, parent = parent, parent.rsplit("/", 1)[0] if "/" in parent else ""
    # Bottom-up (longest paths first) so children are done before their parent.
    for d in sorted(nodes, key=len, reverse=True):
        node = nodes[d]
        node["dirs"] = sorted(node["dirs"])
        node["files"].sort(key=lambda e: e.path)
        h = hashlib.sha1(b"tree\0")
        seq = 0
        for sub in node["dirs"]:
            h.update(sub.encode() + nodes[sub]["oid"].encode())
            seq = max(seq, nodes[sub]["seq"])
        for e in node["files"]:
            h.update(e.path.encode() + e.oid.encode())
            seq = max(seq, e.commit_seq)
        node["oid"], node["seq"] = h.hexdigest(), seq
    return nodes


def _expand(d: dict[str, Any], seq: int, commits_by_seq: dict[int, Commit]) -> dict[str, Any]:
    c = commits_by_seq[seq]
    d = {**d, "lastCommit": {"id": c.sha, "title": c.title, "date": _iso(c.date)}}
    if d["type"] == "file":
        d["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                   "pickleImportScan": None}
    return d


# ---------------------------------------------------------------- observability & faults

@dataclass
class RequestRecord:
    server: str                  # "hub" | "cdn"
    method: str
    path: str                    # raw request target, query included
    headers: dict[str, str]      # lower-case keys
    status: int = 0
    bytes_sent: int = 0          # body bytes written
    range: str | None = None     # the Range request header
    file: str | None = None      # repo file path, for resolve / resolve-cache / cdn requests
    kind: str = ""               # api | resolve | raw | resolve-cache | cdn | other
    fault: str | None = None     # the fault kind applied to this request
    time: float = 0.0


BODY_FAULTS = {"reset", "truncate", "corrupt", "stall"}
FAULT_KINDS = BODY_FAULTS | {"status", "429", "expire", "redirect"}


@dataclass
class Fault:
    kind: str
    path_glob: str = "*"
    count: int | None = 1        # None: forever
    params: dict[str, Any] = field(default_factory=dict)
    fired: int = 0

    def matches(self, path: str, stage: str, method: str) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        if not fnmatch.fnmatchcase(path, self.path_glob):
            return False
        # A HEAD never carries a body, but it does get a CDN link (huggingface_hub GETs the link from its HEAD).
        methods = self.params.get("methods") or (("GET", "HEAD") if self.kind == "expire" else ("GET",))
        where = self.params.get("where", "any")  # "cdn": wherever the bytes come from (CDN or resolve-cache)
        if (where == "api") != (stage == "api"):  # API faults (status, 429) are opt-in: where="api"
            return False
        return method in methods and (where in ("any", "api") or {"resolve": "resolve", "cdn": "body"}[where] == stage)


@dataclass
class Token:
    token: str
    user: str
    access: frozenset[str] | str   # repo ids, or "*"

    def can_read(self, repo: Repo) -> bool:
        ns = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        return self.access == "*" or repo.repo_id in self.access or ns == self.user


# ---------------------------------------------------------------- the hub

class FakeHub:
    """Hub + CDN servers on 127.0.0.1, with repos, tokens, faults and a request log."""

    def __init__(self) -> None:
        self.tree_page_size = 1000
        self.tree_page_size_expand = 50
        self.cdn_url_ttl = 3600.0
        self.bandwidth_per_conn: float | None = None
        self.latency = 0.0
        self.max_single_get: int | None = None
        # True: the limit only refuses GETs without Range (the real CDN). False: ranges longer than the limit too.
        self.require_range_for_large = True
        self.requests: list[RequestRecord] = []
        self.url = self.cdn_url = ""
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._commits_by_seq: dict[int, Commit] = {}
        self._tokens: dict[str, Token] = {}
        self._faults: list[Fault] = []
        self._blobs: dict[str, FileEntry] = {}          # sha256 -> an entry with that content (CDN store)
        self._secret = os.urandom(16)
        self._seq = 0
        self._stop = threading.Event()
        self._servers: list[_Server] = []
        self._conns: set[socket.socket] = set()

    # ----- lifecycle
    def start(self) -> Self:
        self._stop.clear()
        for role in ("hub", "cdn"):
            srv = _Server(("127.0.0.1", 0), _Handler)
            srv.hub, srv.role = self, role  # type: ignore[attr-defined]
            # A short poll interval keeps stop() (and so each test's teardown) fast.
            threading.Thread(target=srv.serve_forever, args=(0.02,), name=f"fakehub-{role}", daemon=True).start()
            self._servers.append(srv)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        self._stop.set()  # releases stalls and bandwidth sleeps
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers.clear()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections would otherwise outlive the server
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- repos
    def add_repo(self, repo_id: str, files: dict[str, FileData], repo_type: str = "model", gated: bool = False,
                 private: bool = False, lfs: Callable[[str, int], bool] | None = None) -> str:
        """Create a repo whose `main` points at one commit holding `files`; returns the commit sha."""
        repo = Repo(repo_type, repo_id, gated, private, lfs or default_is_lfs, time.time())
        with self._lock:
            self._repos[(repo_type, repo_id)] = repo
        return self.add_commit(repo_id, files, repo_type=repo_type, message="initial commit")

    def add_commit(self, repo_id: str, files: dict[str, FileData] | None = None, delete: list[str] | None = None,
                   repo_type: str = "model", branch: str = "main", message: str = "Upload files") -> str:
        """A new commit on `branch` (changed/added files, deleted paths); older commits stay reachable by sha."""
        repo = self.repo(repo_id, repo_type)
        with self._lock:
            self._seq += 1
            seq = self._seq
        parent = repo.branches.get(branch)
        tree = dict(repo.commits[parent].files) if parent else {}
        for path in delete or []:
            tree.pop(path, None)
        for path, data in (files or {}).items():
            tree[path] = make_entry(path, data, repo.is_lfs, seq)
        sha = hashlib.sha1(b"fakehub-commit-%d" % seq).hexdigest()
        commit = Commit(sha, seq, message, time.time(), parent, tree)
        with self._lock:
            repo.commits[sha] = commit
            repo.branches[branch] = sha
            self._commits_by_seq[seq] = commit
            for e in tree.values():  # the CDN store; a virtual entry only if no real content has that sha
                if e.lfs and (e.data is not None or e.sha256 not in self._blobs):
                    self._blobs[e.sha256] = e
        return sha

    def add_tag(self, repo_id: str, tag: str, commit: str | None = None, repo_type: str = "model") -> None:
        repo = self.repo(repo_id, repo_type)
        repo.tags[tag] = commit or repo.branches["main"]

    def add_branch(self, repo_id: str, branch: str, commit: str | None = None, repo_type: str = "model") -> None:
        """A branch (or a `refs/pr/N` ref) pointing at `commit` (default: main's head)."""
        repo = self.repo(repo_id, repo_type)
        repo.branches[branch] = commit or repo.branches["main"]

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self._repos[(repo_type, repo_id)]

    def file_info(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> FileEntry:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        assert commit is not None, revision
        return commit.files[path]

    def add_token(self, token: str, user: str = "alice", access: set[str] | frozenset[str] | str = "*") -> None:
        self._tokens[token] = Token(token, user, access if access == "*" else frozenset(access))

    # ----- faults
    def add_fault(self, kind: str, path_glob: str = "*", count: int | None = 1, **params: Any) -> Fault:
        """Arm a fault for repo files matching `path_glob`; it fires `count` times (None: forever).

        params: after_bytes (reset/truncate/stall; default half the body), status and where
        ("resolve" | "cdn" | "any"; "api": the fault hits API requests whose path matches instead) for
        "status", "429" and "redirect", location for "redirect" (a 302 there, as a hostile or broken
        server would send), retry_after for "429", seconds for "stall",
        at (absolute offset) for "corrupt", methods (default ("GET",)).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(kind, path_glob, count, params)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str, stage: str, method: str, kinds: set[str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and fault.matches(path, stage, method):
                    fault.fired += 1
                    return fault
        return None

    # ----- observability
    def _log(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)

    def records(self, method: str | None = None, path_contains: str | None = None,
                server: str | None = None) -> list[RequestRecord]:
        with self._lock:
            recs = list(self.requests)
        return [r for r in recs if (method is None or r.method == method)
                and (path_contains is None or path_contains in r.path) and (server is None or r.server == server)]

    def count(self, method: str | None = None, path_contains: str | None = None, server: str | None = None) -> int:
        return len(self.records(method, path_contains, server))

    def file_downloads(self, path: str) -> int:
        """GET responses that started sending the bytes of repo file `path` (resolve-cache or CDN)."""
        return sum(1 for r in self.records("GET") if r.file == path and r.kind in ("resolve-cache", "cdn")
                   and r.status in (200, 206))

    def bytes_served(self, path: str | None = None) -> int:
        return sum(r.bytes_sent for r in self.records() if path is None or r.file == path)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ----- CDN links
    def _sign(self, sha256: str, expires: int, file: str, disposition: str) -> str:
        msg = f"{sha256}\n{expires}\n{file}\n{disposition}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:40]

    def cdn_link(self, entry: FileEntry, expired: bool = False) -> str:
        name = entry.path.rsplit("/", 1)[-1]
        disposition = f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
        expires = int(time.time() + (-60 if expired else self.cdn_url_ttl))
        query = urlencode({"response-content-disposition": disposition, "x-hub-file": entry.path,
                           "Expires": expires, "Key-Pair-Id": "FAKEHUBKEY",
                           "Signature": self._sign(entry.sha256, expires, entry.path, disposition)}, quote_via=quote)
        return f"{self.cdn_url}/lfs/{entry.sha256}?{query}"


# ---------------------------------------------------------------- HTTP

API_KEYWORDS = {"revision", "tree", "paths-info", "refs"}
FILE_KEYWORDS = {"resolve", "raw"}
EXPOSE = ("X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,X-Total-Count,ETag,Link,Accept-Ranges,"
          "Content-Range,X-Linked-Size,X-Linked-ETag,X-Xet-Hash")


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true", "yes")


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end_exclusive), 'unsatisfiable', or None (no/ignored Range: multi-range and junk get 200)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    a, sep, b = header[6:].strip().partition("-")
    try:
        if not sep or (not a and not b):
            return None
        if not a:
            start, end = max(0, size - int(b)), size
        else:
            start, end = int(a), (min(int(b) + 1, size) if b else size)
    except ValueError:
        return None
    if start >= size or start >= end:
        return "unsatisfiable"
    return start, end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a client opening 16+ connections at once (aria2c -x16,
    # -j 32) would see SYNs dropped and retried a second later, which is the double's fault, not the client's.
    request_queue_size = 1024

    def server_activate(self) -> None:
        super().server_activate()
        # select() can report a connection its client reset before accept(): a blocking accept()
        # would then wait for the next connection and hold shutdown() (a test's teardown) forever.
        self.socket.settimeout(1.0)


class _HandledError(Exception):
    """An error response was already sent."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, the body of a small response waits for the
    # client's delayed ACK (~40 ms) on every reused keep-alive connection, a delay no real server adds.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return "fakehub"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def role(self) -> str:
        return self.server.role  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read hub.requests instead
        pass

    # ----- plumbing
    def _dispatch(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(n) if n else b""
        self.rec = RequestRecord(self.role, self.command, self.path,
                                 {k.lower(): v for k, v in self.headers.items()},
                                 range=self.headers.get("Range"), time=time.time())
        self.sent_head = False
        try:
            (self._route_hub if self.role == "hub" else self._route_cdn)()
        except _HandledError:
            pass
        except OSError:  # the client went away (reset, broken pipe, timeout)
            self.close_connection = True
        except Exception:  # noqa: BLE001 -- a bug in the double: show it, and answer 500 if still possible
            traceback.print_exc()
            self.close_connection = True
            if not self.sent_head:
                self._send(500, [], json.dumps({"error": "fakehub internal error"}).encode())

    do_GET = do_HEAD = do_POST = _dispatch

    def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self.hub.latency:
            self.hub._stop.wait(self.hub.latency)
        self.send_response(status)
        names = {k.lower() for k, _ in headers}
        if self.role == "hub":
            headers = headers + [("X-Powered-By", "huggingface-moon"),
                                 ("X-Request-Id", f"Root=1-{os.urandom(4).hex()}-{os.urandom(12).hex()}"),
                                 ("Access-Control-Expose-Headers", EXPOSE)]
        if "content-length" not in names and status != 304:
            headers = headers + [("Content-Length", "0")]
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.sent_head = True
        self.rec.status = status
        self.hub._log(self.rec)
        self._bw_t0, self._bw_n = time.monotonic(), 0

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.rec.bytes_sent += len(data)
        bw = self.hub.bandwidth_per_conn
        if bw:
            self._bw_n += len(data)
            ahead = self._bw_n / bw - (time.monotonic() - self._bw_t0)
            if ahead > 0:
                self.hub._stop.wait(ahead)

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
              ctype: str = "application/json; charset=utf-8") -> None:
        self._send_head(status, headers + [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        if self.command != "HEAD" and body:
            self._write(body)

    def _json(self, obj: Any, headers: list[tuple[str, str]] | None = None) -> None:
        self._send(200, headers or [], json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str,
               headers: list[tuple[str, str]] | None = None) -> None:
        h = (headers or []) + [("X-Error-Message", message)] + ([("X-Error-Code", code)] if code else [])
        self._send(status, h, json.dumps({"error": message}).encode())
        raise _HandledError

    def _abort(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0): what a crashed proxy or a network cut looks like."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.rfile.close()  # the makefile reference keeps the fd open until it is closed too
        raise _HandledError

    # ----- hub routing
    def _route_hub(self) -> None:
        raw, _, query = self.path.partition("?")
        self.query = parse_qs(query)
        segs = raw.split("/")[1:]
        if segs[:2] == ["api", "resolve-cache"] and len(segs) > 3:
            self.rec.kind = "resolve-cache"
            return self._resolve_cache(segs[2].rstrip("s"), segs[3:])
        if segs[0] == "api" and len(segs) > 2 and segs[1] in ("models", "datasets", "spaces"):
            self.rec.kind = "api"
            return self._api(segs[1][:-1], segs[2:])
        rtype, segs = (segs[0][:-1], segs[1:]) if segs[0] in ("datasets", "spaces") else ("model", segs)
        split = self._split_repo(rtype, segs, FILE_KEYWORDS)
        if split and split[1] and split[1][0] in FILE_KEYWORDS and len(split[1]) > 2:
            self.rec.kind = split[1][0]
            return self._resolve(rtype, split[0], split[1])
        self.rec.kind = "other"
        self._error(404, None, "Sorry, we can't find the page you are looking for.")

    def _split_repo(self, rtype: str, segs: list[str], keywords: set[str]) -> tuple[str, list[str]] | None:
        """Split `name/...` or `org/name/...` into (repo_id, rest), preferring a repo that exists."""
        segs = [unquote(s) for s in segs[:2]] + segs[2:]
        one = len(segs) >= 2 and segs[1] in keywords
        two = len(segs) >= 3 and segs[2] in keywords
        if two and (not one or (rtype, "/".join(segs[:2])) in self.hub._repos):
            return "/".join(segs[:2]), segs[2:]
        if one or len(segs) == 1:
            return segs[0], segs[1:]
        return ("/".join(segs[:2]), []) if len(segs) == 2 else None

    def _token(self) -> Token | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        tok = self.hub._tokens.get(auth.removeprefix("Bearer ").strip())
        if tok is None:
            self._error(401, None, "Invalid credentials in Authorization header")
        return tok

    def _repo(self, rtype: str, repo_id: str, gated_check: bool = True) -> Repo:
        """The repo, or an error response exactly as the Hub words it (HUB_API.md §6)."""
        tok = self._token()
        repo = self.hub._repos.get((rtype, repo_id))
        if repo is None or (repo.private and (tok is None or not tok.can_read(repo))):
            self._error(401 if tok is None else 404, "RepoNotFound", "Repository not found")
        assert repo is not None
        if gated_check and repo.gated and (tok is None or not tok.can_read(repo)):
            if tok is None:
                msg = (f"Access to {rtype} {repo_id} is restricted. You must have access to it and be authenticated "
                       "to access it. Please log in.")
            else:
                msg = (f"Access to {rtype} {repo_id} is restricted and you are not in the authorized list. "
                       f"Visit https://huggingface.co/{repo_id} to ask for access.")
            self._error(401 if tok is None else 403, "GatedRepo", msg)
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        assert commit is not None
        return commit

    # ----- API
    def _api(self, rtype: str, segs: list[str]) -> None:
        # path_glob of a where="api" fault matches the request path, e.g. "/api/models/org/x/*"
        self._status_fault(self.path.partition("?")[0], "api")
        split = self._split_repo(rtype, segs, API_KEYWORDS)
        if split is None:
            self._error(404, None, "Sorry, we can't find the page you are looking for.")
        assert split is not None
        repo_id, rest = split
        if not rest and self.command in ("GET", "HEAD"):
            repo = self._repo(rtype, repo_id, gated_check=False)  # plain info is public for gated repos
            return self._info(repo, self._commit(repo, "main"))
        repo = self._repo(rtype, repo_id)
        action, args = rest[0], [unquote(s) for s in rest[1:]]
        if action == "revision" and args:
            return self._info(repo, self._commit(repo, "/".join(args)))
        if action == "refs":
            return self._refs(repo)
        if action == "tree" and args:
            return self._tree(repo, rest)
        if action == "paths-info" and args and self.command == "POST":
            return self._paths_info(repo, self._commit(repo, "/".join(args)))
        self._error(404, None, "Sorry, we can't find the page you are looking for.")

    def _info(self, repo: Repo, commit: Commit) -> None:
        blobs = _truthy(_first(self.query, "blobs"))
        siblings = []
        for e in sorted(commit.files.values(), key=lambda e: e.path):
            s: dict[str, Any] = {"rfilename": e.path}
            if blobs:
                s.update(size=e.size, blobId=e.oid)
                if e.lfs:
                    s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.pointer_size}
            siblings.append(s)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        common = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id}
        fields = {"private": repo.private, "tags": [], "downloads": 0, "likes": 0, "author": author,
                  "sha": commit.sha, "lastModified": _iso(commit.date), "gated": "manual" if repo.gated else False,
                  "disabled": False, "siblings": siblings, "createdAt": _iso(repo.created),
                  "usedStorage": sum(e.size for e in commit.files.values())}
        order = (["private", "tags", "downloads", "likes", "modelId", "author", "sha", "lastModified", "gated",
                  "disabled", "siblings", "createdAt", "usedStorage"] if repo.repo_type == "model" else
                 ["author", "sha", "lastModified", "private", "gated", "disabled", "tags", "downloads", "likes",
                  "siblings", "createdAt", "usedStorage"])
        fields["modelId"] = repo.repo_id
        wanted = self.query.get("expand") or self.query.get("expand[]")
        self._json({**common, **{k: fields[k] for k in order if not wanted or k in wanted}})

    def _refs(self, repo: Repo) -> None:
        def ref(name: str, kind: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/{kind}/{name}",
                    "targetCommit": sha}
        branches = [ref(n, "heads", s) for n, s in repo.branches.items() if not n.startswith("refs/pr/")]
        prs = [ref(n, "pr", s) for n, s in repo.branches.items() if n.startswith("refs/pr/")]
        out = {"branches": branches, "converts": [], "tags": [ref(n, "tags", s) for n, s in repo.tags.items()]}
        if _truthy(_first(self.query, "include_prs")):
            out["pullRequests"] = prs
        self._json(out)

    def _dirs(self, commit: Commit) -> dict[str, dict[str, Any]]:
        with self.hub._lock:
            if commit._dirs is None:
                commit._dirs = _build_dirs(commit)
            return commit._dirs

    def _entry_json(self, commit: Commit, path: str, expand: bool) -> dict[str, Any] | None:
        dirs = self._dirs(commit)
        if path in commit.files:
            e = commit.files[path]
            d, seq = e.tree_json(), e.commit_seq
        elif path in dirs and path:
            d, seq = {"type": "directory", "oid": dirs[path]["oid"], "size": 0, "path": path}, dirs[path]["seq"]
        else:
            return None
        return _expand(d, seq, self.hub._commits_by_seq) if expand else d

    def _listing(self, commit: Commit, path: str, recursive: bool, expand: bool) -> list[str] | None:
        """Serialized entries under `path`: dirs first then files at each level, depth-first if recursive."""
        key = (path, recursive, expand)
        with self.hub._lock:
            cached = commit._listings.get(key)
        if cached is not None:
            return cached
        dirs = self._dirs(commit)
        if path not in dirs:
            return None
        out: list[str] = []

        def walk(d: str) -> None:
            for sub in dirs[d]["dirs"]:
                out.append(json.dumps(self._entry_json(commit, sub, expand)))
                if recursive:
                    walk(sub)
            out.extend(json.dumps(self._entry_json(commit, e.path, expand)) for e in dirs[d]["files"])
        walk(path)
        with self.hub._lock:
            commit._listings[key] = out
        return out

    def _tree(self, repo: Repo, rest: list[str]) -> None:
        commit = self._commit(repo, unquote(rest[1]))
        path = unquote("/".join(rest[2:])).strip("/")
        recursive = _truthy(_first(self.query, "recursive"))
        expand = _truthy(_first(self.query, "expand"))
        entries = self._listing(commit, path, recursive, expand)
        if entries is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{rest[1]}\"",
                        [("X-Repo-Commit", commit.sha)])
        assert entries is not None
        cursor = _first(self.query, "cursor")
        start = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["i"] if cursor else 0
        size = self.hub.tree_page_size_expand if expand else self.hub.tree_page_size
        page = entries[start:start + size]
        headers = []
        if start + size < len(entries):
            last = json.loads(page[-1])["path"]
            token = base64.urlsafe_b64encode(json.dumps({"file_name": last, "i": start + size}).encode())
            params = [(k, v) for k, vs in self.query.items() if k != "cursor" for v in vs]
            params.append(("cursor", token.decode().rstrip("=")))
            host = self.headers.get("Host") or self.hub.url.removeprefix("http://")
            next_url = f"http://{host}{self.path.partition('?')[0]}?{urlencode(params)}"
            headers.append(("Link", f'<{next_url}>; rel="next"'))
        self._send(200, headers, ("[" + ",".join(page) + "]").encode())

    def _paths_info(self, repo: Repo, commit: Commit) -> None:
        if "json" in (self.headers.get("Content-Type") or ""):  # huggingface.js posts JSON
            form = {k: v if isinstance(v, list) else [str(v)] for k, v in json.loads(self.body or b"{}").items()}
        else:
            form = parse_qs(self.body.decode())
        expand = _truthy(_first(form, "expand"))
        out = [e for p in dict.fromkeys(form.get("paths", []))
               if (e := self._entry_json(commit, p.strip("/"), expand)) is not None]
        self._json(out)

    # ----- files
    def _resolve(self, rtype: str, repo_id: str, rest: list[str]) -> None:
        """/{repo}/resolve|raw/{rev}/{path}: 307 to resolve-cache (regular file) or 302 to the CDN (LFS)."""
        action, rev, path = rest[0], unquote(rest[1]), unquote("/".join(rest[2:]))
        repo = self._repo(rtype, repo_id)
        commit = self._commit(repo, rev)
        entry = commit.files.get(path)
        self.rec.file = path
        if entry is None:
            self._error(404, "EntryNotFound", "Entry not found", [("X-Repo-Commit", commit.sha)])
        assert entry is not None
        self._status_fault(path, "resolve")
        if action == "raw":  # git blob: the pointer file for LFS files
            if entry.lfs:
                pointer = lfs_pointer(entry.sha256, entry.size)
                return self._serve(FileEntry(path, len(pointer), entry.oid, "", False, pointer, 0),
                                   [("X-Repo-Commit", commit.sha)], faults=False)
            return self._serve(entry, [("X-Repo-Commit", commit.sha)])
        commit_h = [("X-Repo-Commit", commit.sha)]
        if entry.lfs:
            etags = {entry.sha256, entry.oid}
            hdrs = commit_h + [("ETag", f'"{entry.oid}"'), ("X-Linked-Etag", f'"{entry.sha256}"'),
                               ("X-Linked-Size", str(entry.size))]
            if self._not_modified(etags, hdrs):
                return
            expired = self.hub._take_fault(path, "link", self.command, {"expire"}) is not None
            self.rec.fault = "expire" if expired else None
            location = self.hub.cdn_link(entry, expired=expired)
            self._send(302, hdrs + [("Location", location)], f"Found. Redirecting to {location}".encode(),
                       "text/plain; charset=utf-8")
            return
        hdrs = commit_h + [("ETag", f'"{entry.oid}"')]
        if self._not_modified({entry.oid}, hdrs):
            return
        tail = quote(f"/{repo_id}/resolve/{rev}/{path}", safe="")
        location = (f"/api/resolve-cache/{rtype}s/{repo_id}/{commit.sha}/{quote(path)}"
                    f"?{tail}=&etag=%22{entry.oid}%22")
        self._send(307, hdrs + [("Location", location)], f"Temporary Redirect. Redirecting to {location}".encode(),
                   "text/plain; charset=utf-8")

    def _resolve_cache(self, rtype: str, segs: list[str]) -> None:
        is_sha = [len(s) == 40 and all(c in "0123456789abcdef" for c in s) for s in segs]
        n = 2 if len(segs) > 3 and is_sha[2] else 1
        repo = self._repo(rtype, "/".join(unquote(s) for s in segs[:n]))
        commit = self._commit(repo, segs[n])
        path = unquote("/".join(segs[n + 1:]))
        entry = commit.files.get(path)
        self.rec.file = path
        if entry is None:
            self._error(404, "EntryNotFound", "Entry not found", [("X-Repo-Commit", commit.sha)])
        assert entry is not None
        self._serve(entry, [("X-Repo-Commit", commit.sha)])

    def _not_modified(self, etags: set[str], headers: list[tuple[str, str]]) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm and any(t.strip().removeprefix("W/").strip('"') in etags for t in inm.split(",")):
            self._send_head(304, headers)
            return True
        return False

    def _status_fault(self, path: str, stage: str) -> None:
        fault = self.hub._take_fault(path, stage, self.command, {"status", "429", "redirect"})
        if fault is None:
            return
        self.rec.fault = fault.kind
        if fault.kind == "redirect":
            self._send(302, [("Location", fault.params["location"])], b"", "text/plain")
            raise _HandledError
        if fault.kind == "429":
            t = str(fault.params.get("retry_after", 1))
            self._error(429, None, "You have been rate-limited; you can retry this action in a few seconds.",
                        [("Retry-After", t), ("RateLimit", f'"resolvers";r=0;t={t}'),
                         ("RateLimit-Policy", '"fixed window";"resolvers";q=3000;w=300')])
        self._error(int(fault.params.get("status", 500)), None,
                    "Internal Error - We're working hard to fix this as soon as possible!")

    # ----- CDN
    def _route_cdn(self) -> None:
        raw, _, query = self.path.partition("?")
        q = {k: v[0] for k, v in parse_qs(query).items()}
        self.rec.kind = "cdn"
        segs = raw.split("/")[1:]
        entry = self.hub._blobs.get(segs[1]) if len(segs) == 2 and segs[0] == "lfs" else None
        if entry is None:
            return self._cdn_denied("NoSuchKey", "The specified key does not exist.", 404)
        self.rec.file = path = q.get("x-hub-file", entry.path)
        try:
            expires = int(q.get("Expires", "0"))
        except ValueError:
            expires = 0
        disposition = q.get("response-content-disposition", "")
        if not hmac.compare_digest(q.get("Signature", ""), self.hub._sign(entry.sha256, expires, path, disposition)):
            return self._cdn_denied("AccessDenied", "Invalid signature")
        if expires < time.time():
            return self._cdn_denied("AccessDenied", "Request has expired")
        entry = FileEntry(path, entry.size, entry.oid, entry.sha256, True, entry.data, entry.commit_seq)
        self._serve(entry, [("Content-Disposition", disposition), ("Last-Modified", time.strftime(
            "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(0)))], etag=entry.sha256)

    def _cdn_denied(self, code: str, message: str, status: int = 403) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                "</Error>").encode()
        self._send(status, [], body, "application/xml")

    # ----- bodies
    def _serve(self, entry: FileEntry, headers: list[tuple[str, str]], etag: str | None = None,
               faults: bool = True) -> None:
        """Serve a file's bytes (200/206/304/416), applying the armed faults and the global knobs."""
        etag = etag or entry.oid
        if faults:
            self._status_fault(entry.path, "body")
        if entry.data is None and self.command != "HEAD":  # virtual: metadata only
            self._error(500, None, "virtual file: content is not served by fakehub")
        headers = headers + [("ETag", f'"{etag}"'), ("Accept-Ranges", "bytes")]
        if self._not_modified({etag}, headers):
            return
        rng = _parse_range(self.headers.get("Range"), entry.size)
        if rng == "unsatisfiable":
            self._send(416, headers + [("Content-Range", f"bytes */{entry.size}")], b"", "text/plain")
            return
        start, end = rng if isinstance(rng, tuple) else (0, entry.size)
        limit = self.hub.max_single_get
        if (limit is not None and self.command == "GET" and entry.size > limit
                and (rng is None or (not self.hub.require_range_for_large and end - start > limit))):
            return self._cdn_denied("InvalidRequest", f"Refusing a single GET of {end - start} bytes (more than "
                                    f"{limit}): use Range requests", 400)
        if isinstance(rng, tuple):
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{entry.size}"))
        # Taken only now, so a body fault is not spent on a 304/416/400 that carries no body.
        fault = (self.hub._take_fault(entry.path, "body", self.command, BODY_FAULTS)
                 if faults and self.command == "GET" else None)
        self._send_head(206 if isinstance(rng, tuple) else 200, headers + [
            ("Content-Type", "application/octet-stream"), ("Content-Length", str(end - start))])
        if entry.data is not None and self.command != "HEAD":
            self._write_body(entry.data, start, end, fault)

    def _write_body(self, data: bytes | Content, start: int, end: int, fault: Fault | None) -> None:
        total = end - start
        if fault:
            self.rec.fault = fault.kind
        cut = end
        if fault and fault.kind in ("reset", "truncate", "stall"):
            cut = start + min(total, int(fault.params.get("after_bytes", total // 2)))
        corrupt_at = None
        if fault and fault.kind == "corrupt":
            at = fault.params.get("at")
            corrupt_at = at if at is not None and start <= at < end else start + total // 2
        self._write_span(data, start, cut, corrupt_at)
        if fault and fault.kind == "reset":
            self._abort()
        if fault and fault.kind == "truncate":
            self.close_connection = True  # socketserver then shuts the socket down cleanly (FIN)
            return
        if fault and fault.kind == "stall" and self.hub._stop.wait(float(fault.params.get("seconds", 30))):
            self._abort()  # the hub is stopping: do not keep the client (or the test) waiting
        self._write_span(data, cut, end, None)

    def _write_span(self, data: bytes | Content, start: int, end: int, corrupt_at: int | None) -> None:
        bw = self.hub.bandwidth_per_conn
        chunk = CHUNK if not bw else max(1024, min(CHUNK, int(bw) // 20))
        for pos in range(start, end, chunk):
            piece = content_read(data, pos, min(chunk, end - pos))
            if corrupt_at is not None and pos <= corrupt_at < pos + len(piece):
                i = corrupt_at - pos
                piece = piece[:i] + bytes(b ^ 0xFF for b in piece[i:i + 16]) + piece[i + 16:]
            self._write(piece)


# ---------------------------------------------------------------- demo

def demo_hub() -> FakeHub:
    hub = FakeHub().start()
    gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    hub.add_repo("openai-community/gpt2", {
        ".gitattributes": gitattributes,
        "config.json": json.dumps({"model_type": "gpt2", "n_layer": 12}).encode(),
        "model.safetensors": Content(5 * 1024 * 1024, seed=2),
        "onnx/decoder_model.onnx": Content(300_000, seed=3),
        "onnx/config.json": b'{"onnx": true}',
    })
    rows = "".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(200))
    hub.add_repo("databricks/databricks-dolly-15k", {".gitattributes": gitattributes, "README.md": b"# dolly\n",
                                                      "databricks-dolly-15k.jsonl": rows.encode()},
                 repo_type="dataset")
    hub.add_token("hf_demo", user="demo")
    return hub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Hugging Face Hub on 127.0.0.1")
    parser.add_argument("--demo", action="store_true", help="serve a few demo repos until Ctrl-C")
    args = parser.parse_args(argv)
    if not args.demo:
        parser.print_help()
        return
    hub = demo_hub()
    print(f"hub: {hub.url}\ncdn: {hub.cdn_url}\ntoken: hf_demo\n"
          f"try: curl -sI {hub.url}/openai-community/gpt2/resolve/main/model.safetensors\n"
          f"     HF_HUB_DISABLE_XET=1 HF_ENDPOINT={hub.url} hf download databricks/databricks-dolly-15k "
          "--repo-type dataset", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
