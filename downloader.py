"""Running a task: the work list, the tool backends (aria2c, wget, python), retries, progress,
and moving each checked file into place.

Each file goes: pending -> downloading (bytes in `name.<hash>.incomplete`) -> checked (size, hash)
-> renamed to its final name -> completed. A final name never holds partial bytes.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, TextIO
from urllib.parse import urljoin, urlsplit

from dataset_manager import RemoteFile, file_url
from file_tracker import FileState, FileTracker
from task_manager import StopReason, TaskStore
from utils import (HFDError, ToolError, UsageError, format_duration, format_size, fsync_dir,
                   hash_file, new_hasher, partial_path, partial_sidecars, read_json, safe_join,
                   write_json_atomic)

if TYPE_CHECKING:
    from config import Config

TOOLS = ("auto", "aria2c", "wget", "python")
USER_AGENT = "hf-downloader/1.0"


@dataclass(frozen=True)
class Options:
    tool: str = "auto"
    connections: int = 8
    jobs: int = 8
    retries: int = 5
    stall_timeout: float = 60.0
    retry_base: float = 1.0
    max_single_get: int = 50 * 10**9
    progress_interval: float = 5.0


@dataclass
class Job:
    file: RemoteFile
    final: Path
    partial: Path
    url: str                       # the resolve URL on the endpoint
    token: str | None
    endpoint: str
    connections: int
    max_single_get: int


class FetchError(Exception):
    """One failed attempt. `retry_after` slows the whole task (429); `fatal` stops retrying."""

    def __init__(self, message: str, *, retry_after: float | None = None, fatal: bool = False,
                 discard: bool = False, disk_full: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.fatal = fatal
        self.discard = discard          # the partial is bad: start the file over
        self.disk_full = disk_full


@dataclass
class RunResult:
    status: str                     # completed | failed | paused | cancelled
    reason: str = ""                # shown and stored: "disk_full: 3 MiB free, ..."
    stop: StopReason | None = None  # why the run stopped early, if it did
    detail: str = ""                # what the stop reason was given (e.g. free space left)
    tool: str = ""
    files_total: int = 0
    files_done: int = 0
    files_failed: int = 0
    bytes_done: int = 0
    bytes_fetched: int = 0
    elapsed: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    bytes_missing: int = 0          # not on disk yet: unfinished files minus their partial bytes


# ================================================================ tool choice

def choose_tool(requested: str) -> str:
    """auto: aria2c if installed, else wget, else python."""
    if requested not in TOOLS:
        raise UsageError(f"unknown tool {requested!r}", hint="use aria2c, wget, python or auto")
    if requested == "auto":
        return next((t for t in ("aria2c", "wget") if shutil.which(t)), "python")
    if requested != "python" and not shutil.which(requested):
        package = "aria2" if requested == "aria2c" else "wget"
        raise ToolError(f"{requested} is not installed",
                        hint=f"install it (apt-get install {package}) or use --tool python")
    return requested


# ================================================================ shared HTTP pieces

def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b)


def auth_headers(url: str, job: Job) -> dict[str, str]:
    """The token goes only to the endpoint's own origin."""
    if job.token and same_origin(url, job.endpoint):
        return {"Authorization": f"Bearer {job.token}"}
    return {}


def retry_after_seconds(headers) -> float | None:
    """Retry-After, else the `t=` of the Hub's RateLimit header."""
    value = headers.get("Retry-After")
    if value and value.strip().isdigit():
        return float(value)
    match = re.search(r"\bt=(\d+)", headers.get("RateLimit", "") or "")
    return float(match.group(1)) if match else None


def http_error(status: int, url: str, headers) -> FetchError:
    """Map an HTTP status on a file request to a FetchError."""
    if status == 429:
        return FetchError("rate limited (429)", retry_after=retry_after_seconds(headers) or 5.0)
    code = headers.get("X-Error-Code", "")
    if code == "GatedRepo" or (status == 401 and code in ("", "RepoNotFound")):
        return FetchError(f"HTTP {status} {code or 'unauthorized'}: access refused",
                          fatal=code != "")
    if status == 403:
        # A signed CDN link that expired: ask /resolve/ again on the next attempt.
        return FetchError("HTTP 403 (expired or refused link)")
    if status == 404:
        return FetchError(f"HTTP 404 {code or 'not found'}", fatal=True)
    if status == 416:
        return FetchError("HTTP 416 (range not satisfiable)", discard=True)
    return FetchError(f"HTTP {status}")


def resolve_location(session, job: Job, timeout: float) -> str:
    """Follow the endpoint's redirects with HEAD, stopping at another origin (a CDN).

    Used when a token is set, so that aria2c and wget get a URL whose origin decides
    whether they may see the token, instead of following redirects with it themselves.
    """
    url = job.url
    for _ in range(10):
        resp = session.head(url, headers=auth_headers(url, job), allow_redirects=False,
                            timeout=timeout)
        if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
            url = urljoin(url, resp.headers["Location"])
            if not same_origin(url, job.endpoint):
                return url
            continue
        if resp.status_code >= 400:
            raise http_error(resp.status_code, url, resp.headers)
        return url
    raise FetchError("too many redirects")


# ================================================================ child processes

_libc = None


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent dies (kill -9 included): no orphan tools."""
    global _libc
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except OSError:
        pass


_SETPRIV: list[str | None] = []


def _setpriv() -> str | None:
    if not _SETPRIV:
        _SETPRIV.append(shutil.which("setpriv"))
    return _SETPRIV[0]


class ChildSet:
    """The tool processes of a run, so a stop can end them all at once."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def start(self, argv: list[str], *, env: dict[str, str], stdout) -> subprocess.Popen:
        # preexec_fn forces a slow fork of this process under the GIL (5.9 ms a spawn vs 0.7
        # measured); setpriv sets the same parent-death signal in the child instead.
        setpriv = _setpriv()
        extra = {} if setpriv else {"preexec_fn": _die_with_parent}
        proc = subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv,
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, **extra)
        with self._lock:
            self._procs.add(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def kill_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def child_env() -> dict[str, str]:
    """The environment for tools: proxies under both spellings (aria2c reads lower case)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        value = os.environ.get(name) or os.environ.get(name.upper())
        if value:
            env[name] = env[name.upper()] = value
    env["LC_ALL"] = "C.UTF-8"      # English messages to parse; UTF-8 file names intact
    return env


def bytes_on_disk(path: Path) -> int:
    """Bytes written so far; allocated blocks count holes left by parallel segments correctly."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    return min(st.st_size, st.st_blocks * 512)


def watch_process(proc: subprocess.Popen, job: Job, report: Callable[[int], None],
                  stop: threading.Event, stall_timeout: float) -> int:
    """Wait for a tool, reporting progress from the partial file and killing it on a stall."""
    last_mark, last_change = None, time.monotonic()
    while True:
        try:
            return proc.wait(0.25)
        except subprocess.TimeoutExpired:
            pass
        try:
            st = os.stat(job.partial)
            mark = (st.st_size, st.st_blocks)
        except FileNotFoundError:
            mark = None
        if mark != last_mark:
            last_mark, last_change = mark, time.monotonic()
            report(bytes_on_disk(job.partial))
        if stop.is_set():
            _kill_group(proc)
            raise FetchError("stopped")
        if time.monotonic() - last_change > stall_timeout:
            _kill_group(proc)
            raise FetchError(f"stalled: no byte for {stall_timeout:g} s")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "****")
    return re.sub(r"(Bearer\s+)\S+", r"\1****", text)


# ================================================================ backends

class Backend:
    """One way of fetching a file into its partial; `fetch` blocks and raises FetchError."""

    name = "base"
    partial_kinds: tuple[str, ...] = ("seq",)

    def __init__(self, opts: Options, children: ChildSet, log) -> None:
        self.opts = opts
        self.children = children
        self.log = log
        self._local = threading.local()

    def session(self):
        import requests
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = USER_AGENT
            s.headers["Accept-Encoding"] = "identity"    # byte offsets must be file offsets
            self._local.session = s
        return s

    def tool_url(self, job: Job) -> str:
        """With a token, resolve redirects here so the tool never carries it to a CDN."""
        if not job.token:
            return job.url
        try:
            return resolve_location(self.session(), job, timeout=min(30, self.opts.stall_timeout))
        except FetchError:
            raise
        except Exception as exc:
            raise FetchError(f"resolving the download link failed: {_short(exc)}") from None

    def fetch(self, job: Job, report: Callable[[int], None], stop: threading.Event) -> str | None:
        raise NotImplementedError

    def open(self) -> None:
        """Start whatever the backend keeps running for the run (called from the main thread)."""

    def close(self) -> None:
        """End whatever the backend keeps running for the run."""

    def tail(self, text: str, token: str | None) -> str:
        """The last lines of a tool's output, for the error message and the log."""
        lines = text.strip().splitlines()
        return redact(" | ".join(lines[-3:]), token)[:400]


def _probe(backend: "Backend", job: Job) -> float:
    """aria2c does not show response headers: ask once how long the Hub wants us to wait."""
    try:
        resp = backend.session().head(job.url, headers=auth_headers(job.url, job),
                                      allow_redirects=False, timeout=10)
        return retry_after_seconds(resp.headers) or 5.0
    except Exception:
        return 5.0


class ToolBackend(Backend):
    """What aria2c and wget share: one process per file, and the hand-off of huge files."""

    def probe_retry_after(self, job: Job) -> float:
        return _probe(self, job)

    def too_big(self, job: Job) -> bool:
        """The CDN refuses one GET above max_single_get, and both tools open with one
        (aria2c's first connection never sends Range, even when resuming with its control
        file), so such files, or their ranged partials, go to the python backend."""
        return job.file.size > job.max_single_get or _parts_path(job.partial).exists()

    def fetch_in_ranges(self, job: Job, report, stop) -> str | None:
        self.log.warning("%s is bigger than %s: %s cannot fetch it in ranged requests only, so "
                         "the python backend fetches it in parts", job.file.path,
                         format_size(job.max_single_get), self.name)
        if not hasattr(self, "_python"):
            self._python = PythonBackend(self.opts, self.children, self.log)
        return self._python.fetch(job, report, stop)

    def _run(self, argv, job, report, stop) -> None:
        """Run one tool process for one file; its output goes to a scratch file we read back."""
        self.log.debug("running: %s", redact(" ".join(argv), job.token))
        with tempfile.TemporaryFile() as output:
            proc = self.children.start(argv, env=child_env(), stdout=output)
            try:
                code = watch_process(proc, job, report, stop, self.opts.stall_timeout)
            finally:
                self.children.forget(proc)
            output.seek(0)
            detail = self.tail(output.read().decode(errors="replace"), job.token)
        if code != 0:
            error = self.error(code, detail)
            if error.retry_after is None and "429" in str(error):
                error.retry_after = self.probe_retry_after(job)
            raise error
        report(bytes_on_disk(job.partial))

class Aria2Daemon:
    """One aria2c for the whole run, driven over JSON-RPC on 127.0.0.1.

    A process per file costs more than a small file takes to fetch, and loses aria2c's
    connection reuse; one daemon keeps both. Its RPC secret reaches it through a 0600 config
    file, and the token only ever travels in RPC calls to 127.0.0.1, never on a command line."""

    def __init__(self, opts: Options, children: ChildSet, log) -> None:
        import secrets
        self.secret = secrets.token_hex(16)
        self.folder = tempfile.mkdtemp(prefix="hfdl-aria2-")
        conf = Path(self.folder) / "aria2.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"rpc-secret={self.secret}\n")
        self.port = _free_port()
        stall = opts.stall_timeout
        argv = ["aria2c", f"--conf-path={conf}", "--enable-rpc", "--rpc-listen-all=false",
                f"--rpc-listen-port={self.port}", f"--max-concurrent-downloads={max(1, opts.jobs)}",
                "--continue=true", "--auto-file-renaming=false", "--allow-overwrite=true",
                "--file-allocation=none", "--max-tries=1", "--retry-wait=0",
                "--auto-save-interval=1", f"--connect-timeout={int(min(60, stall))}",
                f"--timeout={int(max(5, stall))}", "--console-log-level=warn",
                "--summary-interval=0", "--show-console-readout=false", "--remote-time=false",
                "--allow-piece-length-change=true", f"--user-agent={USER_AGENT}",
                f"--stop-with-process={os.getpid()}"]
        log.info("running: %s", " ".join(argv))
        self.output = tempfile.TemporaryFile()
        self.proc = children.start(argv, env=child_env(), stdout=self.output)
        import requests
        self.http = requests.Session()
        self.http.trust_env = False          # 127.0.0.1: never through a proxy
        self._ids = 0
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.call("aria2.getVersion")
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.output.seek(0)
                    text = self.output.read().decode(errors="replace").strip()[-300:]
                    raise ToolError(f"aria2c did not start its RPC server: {text or 'no output'}",
                                    hint="try --tool python or --tool wget") from None
                time.sleep(0.05)

    def call(self, method: str, *params):
        self._ids += 1
        try:
            resp = self.http.post(f"http://127.0.0.1:{self.port}/jsonrpc", timeout=30, json={
                "jsonrpc": "2.0", "id": self._ids, "method": method,
                "params": [f"token:{self.secret}", *params]})
            data = resp.json()
        except Exception as exc:
            raise FetchError(f"aria2c stopped answering: {_short(exc)}") from None
        if "error" in data:
            raise FetchError(f"aria2c: {data['error'].get('message', data['error'])}")
        return data["result"]

    def close(self) -> None:
        """End the daemon once every download was completed or removed (removal writes the
        control file), so nothing is left to save: SIGKILL is immediate, while aria2c's own
        shutdown takes 1 s (SIGTERM) to 4 s (RPC) even when idle."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.output.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Aria2Backend(ToolBackend):
    name = "aria2c"
    partial_kinds = ("seq", "aria2", "parts")
    POLL = 0.2

    def __init__(self, opts: Options, children: ChildSet, log) -> None:
        super().__init__(opts, children, log)
        self._daemon: Aria2Daemon | None = None
        self._daemon_lock = threading.Lock()

    def open(self) -> None:
        """Start the daemon from the main thread: a child gets SIGKILL when the *thread* that
        started it ends (PR_SET_PDEATHSIG), and worker threads end before the run does."""
        self.daemon()

    def daemon(self) -> Aria2Daemon:
        with self._daemon_lock:
            if self._daemon is None:
                self._daemon = Aria2Daemon(self.opts, self.children, self.log)
            return self._daemon

    def close(self) -> None:
        if self._daemon is not None:
            self._daemon.close()

    def fetch(self, job: Job, report, stop) -> str | None:
        if self.too_big(job):
            return self.fetch_in_ranges(job, report, stop)
        url = self.tool_url(job)
        split = max(1, job.connections)
        options = {"dir": str(job.partial.parent), "out": job.partial.name, "split": str(split),
                   "max-connection-per-server": str(min(16, split)),
                   # 1M: with bigger segments aria2c idles half its connections after the
                   # redirect until the first segments finish (measured: 8.0 s -> 4.9 s, 1 GiB)
                   "min-split-size": "1M"}
        headers = [f"{k}: {v}" for k, v in auth_headers(url, job).items()]
        if headers:
            options["header"] = headers
        daemon = self.daemon()
        gid = daemon.call("aria2.addUri", [url], options)
        try:
            self._watch(daemon, gid, job, report, stop)
        finally:
            with contextlib.suppress(Exception):
                daemon.call("aria2.forceRemove", gid)
            with contextlib.suppress(Exception):
                daemon.call("aria2.removeDownloadResult", gid)
        report(bytes_on_disk(job.partial))
        return None

    def _watch(self, daemon: Aria2Daemon, gid: str, job: Job, report, stop) -> None:
        """Poll one download: progress, completion, errors, stalls and stops."""
        keys = ["status", "completedLength", "errorCode", "errorMessage"]
        last, last_change = -1, time.monotonic()
        delay = 0.01          # small files finish in tens of ms: look soon, then back off
        while True:
            if stop.wait(delay):
                raise FetchError("stopped")
            delay = min(self.POLL, delay * 1.5)
            st = daemon.call("aria2.tellStatus", gid, keys)
            done = int(st.get("completedLength") or 0)
            if done != last:
                last, last_change = done, time.monotonic()
                report(done)
            if st["status"] == "complete":
                return
            if st["status"] in ("error", "removed"):
                raise self.error(int(st.get("errorCode") or 1), st.get("errorMessage") or "",
                                 job)
            if time.monotonic() - last_change > self.opts.stall_timeout:
                raise FetchError(f"stalled: no byte for {self.opts.stall_timeout:g} s")

    def error(self, code: int, detail: str, job: Job | None = None) -> FetchError:
        detail = redact(detail, job.token if job else None)[:300]
        status = re.search(r"status=(\d{3})", detail)
        n = int(status.group(1)) if status else None
        if n == 429:
            return FetchError(f"rate limited (429): {detail}",
                              retry_after=self.probe_retry_after(job) if job else None)
        if n in (401, 404) or code == 3:
            return FetchError(f"HTTP {n or 404}: {detail}", fatal=True)
        if code == 9:
            return FetchError(f"aria2c: not enough disk space: {detail}", disk_full=True)
        return FetchError(f"aria2c error {code}: {detail}")


class WgetBackend(ToolBackend):
    name = "wget"
    partial_kinds = ("seq", "parts")

    def fetch(self, job: Job, report, stop) -> str | None:
        if self.too_big(job):
            return self.fetch_in_ranges(job, report, stop)
        url = self.tool_url(job)
        headers = auth_headers(url, job)
        # --no-iri: in a C locale (cron) wget would otherwise re-encode the signed CDN URL.
        argv = ["wget", "--continue", "--no-iri", "--tries=1", "--server-response", "--no-verbose",
                f"--timeout={int(max(5, self.opts.stall_timeout))}",
                f"--user-agent={USER_AGENT}", f"--output-document={job.partial}"]
        config_dir = None
        try:
            if headers:
                # The token reaches wget through a private config file, never argv.
                config_dir = tempfile.mkdtemp(prefix="hfdl-wget-")
                config = Path(config_dir) / "wgetrc"
                fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    for name, value in headers.items():
                        f.write(f"header = {name}: {value}\n")
                argv.insert(1, f"--config={config}")
            else:
                argv.insert(1, "--no-config")
            argv += ["--", url]
            return self._run(argv, job, report, stop)
        finally:
            if config_dir:
                shutil.rmtree(config_dir, ignore_errors=True)

    def error(self, code: int, detail: str) -> FetchError:
        statuses = re.findall(r"HTTP/[\d.]+ (\d{3})", detail)
        n = int(statuses[-1]) if statuses else None
        if n == 429:
            after = re.findall(r"Retry-After:\s*(\d+)", detail)
            return FetchError("rate limited (429)", retry_after=float(after[-1]) if after else None)
        if n in (401, 404):
            return FetchError(f"HTTP {n}: {detail}", fatal=True)
        if n == 416:
            return FetchError("HTTP 416: the partial file is longer than the file", discard=True)
        if code == 3:
            return FetchError(f"wget: file write error: {detail}", disk_full=True)
        return FetchError(f"wget exited {code}" + (f" (HTTP {n})" if n else "") + f": {detail}")

    def tail(self, text: str, token: str | None) -> str:
        keep = [ln.strip() for ln in text.splitlines()
                if re.search(r"^\s*HTTP/\d|^\s*Retry-After:|Cannot write|No space left|rror:|"
                             r"failed|refused|ERROR", ln)]
        return redact(" | ".join(keep[-4:]), token)[:400]


class PythonBackend(Backend):
    """requests in threads; hashes while writing; ranged parts for huge files or -x N."""

    name = "python"
    partial_kinds = ("seq", "parts")
    CHUNK = 1 << 20        # read1: up to this much, but whatever has arrived (slow links too)
    MIN_PART = 64 << 20

    def fetch(self, job: Job, report, stop) -> str | None:
        size = job.file.size
        parts_file = _parts_path(job.partial)
        if size > job.max_single_get or parts_file.exists() or (
                job.connections > 1 and size >= 2 * self.MIN_PART):
            self._fetch_parts(job, report, stop)
            return None
        return self._fetch_stream(job, report, stop)

    # ---- one stream, resumed from the partial's length, hashed as it is written
    def _fetch_stream(self, job: Job, report, stop) -> str:
        f = job.file
        offset = os.path.getsize(job.partial) if job.partial.exists() else 0
        if offset > f.size:
            offset = 0
        hasher = new_hasher(f.hash_kind, f.size)
        if offset:
            hash_file(job.partial, f.hash_kind, f.size, start_hasher=hasher)  # primes hasher
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._get(job, headers)
        with resp:
            if offset and resp.status_code == 200:      # the server ignored Range: start over
                offset, hasher = 0, new_hasher(f.hash_kind, f.size)
            elif offset and not _range_starts_at(resp, offset):
                raise FetchError("the server answered a different range", discard=True)
            mode = "r+b" if offset else "wb"
            with open(job.partial, mode) as out:
                out.seek(offset)
                out.truncate()
                done = self._copy(resp, out, hasher, offset, report, stop)
                out.flush()
        if done != f.size:
            raise FetchError(f"body cut short: {done} of {f.size} bytes")
        return hasher.hexdigest()

    def _get(self, job: Job, headers: dict[str, str], url: str | None = None):
        """GET the resolve URL, following redirects ourselves so the token stays home."""
        import requests
        url = url or job.url
        try:
            for _ in range(10):
                resp = self.session().get(url, headers={**headers, **auth_headers(url, job)},
                                          stream=True, allow_redirects=False,
                                          timeout=(min(30, self.opts.stall_timeout),
                                                   self.opts.stall_timeout))
                if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                    url = urljoin(url, resp.headers["Location"])
                    resp.close()
                    continue
                if resp.status_code >= 400:
                    resp.close()
                    raise http_error(resp.status_code, url, resp.headers)
                return resp
        except requests.RequestException as exc:
            raise FetchError(_short(exc)) from None
        raise FetchError("too many redirects")

    def _copy(self, resp, out, hasher, offset: int, report, stop) -> int:
        done = offset
        try:
            for chunk in _chunks(resp, self.CHUNK):
                if stop.is_set():
                    raise FetchError("stopped")
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise FetchError(f"write failed: {exc.strerror}",
                                     disk_full=exc.errno == errno.ENOSPC) from None
                if hasher is not None:
                    hasher.update(chunk)
                done += len(chunk)
                report(done)
        except _NETWORK_ERRORS() as exc:
            raise FetchError(f"connection lost after {done} bytes: {_short(exc)}") from None
        return done

    # ---- ranged parts into one file; progress of each part kept in `partial.parts`
    def _fetch_parts(self, job: Job, report, stop) -> None:
        f = job.file
        parts = self._load_parts(job)
        with open(job.partial, "r+b" if job.partial.exists() else "w+b") as out:
            out.truncate(f.size)
        lock = threading.Lock()
        errors: list[FetchError] = []

        def total() -> int:
            return sum(p[2] - p[0] for p in parts)

        def run_part(part: list[int]) -> None:
            try:
                self._fetch_range(job, part, lock, lambda: report(total()), stop)
            except FetchError as exc:
                errors.append(exc)

        workers = [threading.Thread(target=run_part, args=(p,), daemon=True)
                   for p in parts if p[2] <= p[1]]
        saver_stop = threading.Event()
        saver = threading.Thread(target=self._save_parts_loop, args=(job, parts, lock, saver_stop),
                                 daemon=True)
        saver.start()
        for batch_start in range(0, len(workers), max(1, job.connections)):
            batch = workers[batch_start:batch_start + max(1, job.connections)]
            for t in batch:
                t.start()
            for t in batch:
                t.join()
        saver_stop.set()
        saver.join()
        self._save_parts(job, parts, lock)
        if errors:
            raise errors[0]
        report(total())

    def _load_parts(self, job: Job) -> list[list[int]]:
        """[start, end(inclusive), next offset] per part, from the sidecar if it matches."""
        f, path = job.file, _parts_path(job.partial)
        try:
            saved = read_json(path)
            if saved.get("size") == f.size and saved.get("hash") == f.expected_hash:
                return [list(map(int, p)) for p in saved["parts"]]
        except (HFDError, KeyError, TypeError, ValueError):
            pass
        count = max(job.connections, -(-f.size // job.max_single_get))
        step = max(1, -(-f.size // max(1, count)))
        parts = [[s, min(f.size, s + step) - 1, s] for s in range(0, f.size, step)]
        if job.partial.exists() and not path.exists():   # a sequential partial: keep its head
            have = min(os.path.getsize(job.partial), parts[0][1] + 1) if parts else 0
            if parts:
                parts[0][2] = have
        return parts

    def _fetch_range(self, job: Job, part: list[int], lock, report, stop) -> None:
        start, end, offset = part
        resp = self._get(job, {"Range": f"bytes={offset}-{end}"})
        with resp, open(job.partial, "r+b") as out:
            if not _range_starts_at(resp, offset):
                raise FetchError("the server ignored a range request")
            out.seek(offset)
            try:
                for chunk in _chunks(resp, self.CHUNK):
                    if stop.is_set():
                        raise FetchError("stopped")
                    chunk = chunk[:end + 1 - offset]
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise FetchError(f"write failed: {exc.strerror}",
                                         disk_full=exc.errno == errno.ENOSPC) from None
                    offset += len(chunk)
                    with lock:
                        part[2] = offset
                    report()
                    if offset > end:
                        break
            except _NETWORK_ERRORS() as exc:
                raise FetchError(f"connection lost: {_short(exc)}") from None
            out.flush()
            os.fsync(out.fileno())
        if offset <= end:
            raise FetchError(f"range cut short at {offset} of {end + 1}")

    def _save_parts_loop(self, job, parts, lock, stop: threading.Event) -> None:
        while not stop.wait(2.0):
            self._save_parts(job, parts, lock)

    def _save_parts(self, job: Job, parts, lock) -> None:
        # Data first, then the record of it: the sidecar never claims unwritten bytes.
        with contextlib.suppress(OSError):
            fd = os.open(job.partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with lock:
            snapshot = [list(p) for p in parts]
        with contextlib.suppress(OSError):
            write_json_atomic(_parts_path(job.partial), {"size": job.file.size,
                                                         "hash": job.file.expected_hash,
                                                         "parts": snapshot}, indent=None)


def _chunks(resp, size: int):
    """The body as it arrives: read1 returns what is there (up to `size`) instead of waiting
    for a full chunk, so big chunks stay cheap on fast links and prompt on slow ones."""
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:
        yield from resp.iter_content(size)
        return
    while True:
        chunk = read1(size)
        if not chunk:
            return
        yield chunk


def _NETWORK_ERRORS() -> tuple[type[BaseException], ...]:
    import requests
    import urllib3
    return (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError,
            TimeoutError)


def _range_starts_at(resp, offset: int) -> bool:
    if resp.status_code != 206:
        return offset == 0 and resp.status_code == 200
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == offset


def _parts_path(partial: Path) -> Path:
    return partial_sidecars(partial)[1]


def _aria2_path(partial: Path) -> Path:
    return partial_sidecars(partial)[0]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    text = re.sub(r"<urllib3\.[^>]*>", "", text)
    return text[:200]


BACKENDS = {"aria2c": Aria2Backend, "wget": WgetBackend, "python": PythonBackend}


# ================================================================ progress

class Progress:
    """Bytes and files done, speed, ETA: a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, total_files: int, total_bytes: int, done_files: int, done_bytes: int,
                 stream: TextIO, interval: float, quiet: bool = False) -> None:
        self.total_files, self.total_bytes = total_files, total_bytes
        self.done_files, self.base_bytes = done_files, done_bytes
        self.active: dict[str, int] = {}
        self.fetched = 0
        self._lock = threading.Lock()
        self.stream, self.interval, self.quiet = stream, interval, quiet
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque(maxlen=40)
        self._last_line = time.monotonic()
        self.bar = None
        if not quiet and stream.isatty():
            from tqdm import tqdm
            # A terminal that reports no width (a bare pty) still gets an 80-column bar.
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True,
                            unit_divisor=1024, file=stream, dynamic_ncols=sized,
                            ncols=None if sized else 80, nrows=None if sized else 24,
                            leave=True)

    def update(self, path: str, have: int) -> None:
        with self._lock:
            before = self.active.get(path, 0)
            if have > before:
                self.fetched += have - before
            self.active[path] = have

    def file_done(self, path: str, size: int, ok: bool, message: str) -> None:
        with self._lock:
            self.active.pop(path, None)
            if ok:
                self.done_files += 1
                self.base_bytes += size
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def file_started(self, path: str, have: int) -> None:
        """Bytes already in the partial count as done, not as fetched by this run."""
        with self._lock:
            self.active[path] = have

    def file_dropped(self, path: str) -> None:
        with self._lock:
            self.active.pop(path, None)

    def bytes_done(self) -> int:
        with self._lock:
            return self.base_bytes + sum(self.active.values())

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        done = self.bytes_done()
        self._samples.append((now, self.fetched))
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = min(done, self.total_bytes)
            self.bar.set_postfix_str(f"{self.done_files}/{self.total_files} files", refresh=False)
            self.bar.refresh()
            return
        if force or now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(final=force), file=self.stream, flush=True)

    def speed(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, final: bool = False) -> str:
        done, speed = self.bytes_done(), self.speed()
        if final:       # the average over the run, not the last few seconds
            elapsed = time.monotonic() - self.started
            speed = self.fetched / elapsed if elapsed > 0 else 0.0
        eta = (self.total_bytes - done) / speed if speed > 0 else None
        pct = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        return (f"progress: {format_size(done)} / {format_size(self.total_bytes)} ({pct:.1f}%), "
                f"{self.done_files}/{self.total_files} files, {format_size(speed)}/s, "
                f"ETA {format_duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ================================================================ the run

class Stopper:
    """Why a run must stop (first reason wins): interrupted, terminated, cancelled, disk_full."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: StopReason | None = None
        self.detail = ""

    def stop(self, reason: StopReason | str, detail: str = "") -> None:
        if self.reason is None:
            self.reason, self.detail = StopReason(reason), detail
        self.event.set()


class RateGate:
    """A 429 slows the whole task: every worker waits until the gate opens."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()

    def close_for(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds + 1)

    def wait(self, stop: threading.Event) -> None:
        while True:
            with self._lock:
                delay = self._until - time.monotonic()
            if delay <= 0 or stop.wait(min(delay, 0.5)):
                return


@dataclass
class Run:
    tracker: FileTracker
    local_dir: Path
    endpoint: str
    token: str | None
    opts: Options
    backend: Backend
    progress: Progress
    stopper: Stopper
    log: object
    gate: RateGate = field(default_factory=RateGate)
    failures: list[tuple[str, str]] = field(default_factory=list)


def make_job(run: Run, f: RemoteFile) -> Job:
    final = safe_join(run.local_dir, f.path)
    meta = run.tracker.meta
    return Job(file=f, final=final, partial=partial_path(final, f.expected_hash),
               url=file_url(run.endpoint, meta["repo_id"], meta["repo_type"], meta["commit"], f.path),
               token=run.token, endpoint=run.endpoint, connections=run.opts.connections,
               max_single_get=run.opts.max_single_get)


def prepare_partial(job: Job, backend: Backend) -> None:
    """Keep a partial (of this version: its name says so) only if this tool can continue it."""
    control = _aria2_path(job.partial)
    with contextlib.suppress(FileNotFoundError):
        if control.stat().st_size == 0:      # aria2c could not save it (disk full): unreadable
            control.unlink()
    kind = "aria2" if control.exists() else (
        "parts" if _parts_path(job.partial).exists() else "seq")
    if not job.partial.exists() or kind not in backend.partial_kinds \
            or (kind == "seq" and _has_holes(job.partial)):
        discard_partial(job)


def _has_holes(path: Path) -> bool:
    """A split download killed before its control file was saved leaves a sparse file whose
    length says nothing about which bytes are there: it cannot be continued by length."""
    st = os.stat(path)
    return st.st_blocks * 512 + 4096 < st.st_size


def discard_partial(job: Job) -> None:
    for p in (job.partial, _aria2_path(job.partial), _parts_path(job.partial)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def finish_file(job: Job, digest: str | None) -> None:
    """Check the partial against the listing, then give it its final name."""
    f = job.file
    size = os.path.getsize(job.partial) if job.partial.exists() else -1
    if size != f.size:
        raise FetchError(f"size mismatch: {size} bytes, expected {f.size}", discard=size > f.size)
    if digest is None:
        digest = hash_file(job.partial, f.hash_kind, f.size)
    if digest != f.expected_hash:
        raise FetchError(f"{f.hash_kind} mismatch: got {digest[:12]}..., expected "
                         f"{f.expected_hash[:12]}...", discard=True)
    with open(job.partial, "rb+") as fh:
        os.fsync(fh.fileno())
    for sidecar in (_aria2_path(job.partial), _parts_path(job.partial)):
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
    os.replace(job.partial, job.final)
    fsync_dir(job.final.parent)


def download_one(run: Run, f: RemoteFile) -> None:
    """All attempts for one file; records each failure on the file."""
    tracker, opts = run.tracker, run.opts
    job = make_job(run, f)
    job.final.parent.mkdir(parents=True, exist_ok=True)
    prepare_partial(job, run.backend)
    run.progress.file_started(f.path, bytes_on_disk(job.partial))
    tracker.start(f.path)
    attempts = int(tracker.status[f.path].get("attempts") or 0)
    tries = 0
    while True:
        run.gate.wait(run.stopper.event)
        if run.stopper.event.is_set():
            break
        tries += 1
        try:
            digest = run.backend.fetch(job, lambda n: run.progress.update(f.path, n),
                                       run.stopper.event)
            finish_file(job, digest)
        except FetchError as exc:
            if run.stopper.event.is_set():
                break
            if exc.disk_full:
                run.stopper.stop("disk_full", str(exc))
                break
            if exc.discard:
                discard_partial(job)
            if exc.retry_after:
                run.gate.close_for(exc.retry_after)
            final = exc.fatal or tries > opts.retries
            tracker.attempt_failed(f.path, str(exc), final=final)
            run.log.warning("%s: attempt %d failed: %s", f.path, attempts + tries, exc)
            run.progress.update(f.path, bytes_on_disk(job.partial))
            if final:
                run.failures.append((f.path, str(exc)))
                run.progress.file_done(f.path, f.size, False, f"failed: {f.path}: {exc}")
                return
            _backoff(opts.retry_base, tries, run.stopper.event)
            continue
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                run.stopper.stop("disk_full", str(exc))
                break
            raise
        tracker.complete(f.path, f.size)
        run.log.info("completed %s (%d bytes)", f.path, f.size)
        run.progress.file_done(f.path, f.size, True, f"done: {f.path} ({format_size(f.size)})")
        return
    tracker.interrupted(f.path)
    run.progress.file_dropped(f.path)


def _backoff(base: float, tries: int, stop: threading.Event) -> None:
    delay = min(60.0, base * 2 ** (tries - 1))
    stop.wait(delay * random.uniform(0.5, 1.5))


def reconcile(tracker: FileTracker, local_dir: Path, files: Iterable[RemoteFile]) -> int:
    """Files at their final path but not recorded as done (a crash between rename and save):
    check them and record them. Returns how many were adopted."""
    adopted = 0
    for f in files:
        entry = tracker.status[f.path]
        if entry["status"] == FileState.COMPLETED.value:
            continue
        final = safe_join(local_dir, f.path)
        if final.is_file() and final.stat().st_size == f.size and \
                hash_file(final, f.hash_kind, f.size) == f.expected_hash:
            tracker.complete(f.path, f.size)
            adopted += 1
    return adopted


def forget_missing(tracker: FileTracker, local_dir: Path) -> int:
    """Completed files deleted (or changed in size) by hand go back to pending."""
    count = 0
    root = str(local_dir)
    for path in tracker.paths_in(FileState.COMPLETED):     # paths were checked on load
        try:
            ok = os.stat(os.path.join(root, path)).st_size == tracker.by_path[path].size
        except (FileNotFoundError, NotADirectoryError):
            ok = False
        if not ok:
            tracker.reset(path, "missing on disk")
            count += 1
    return count


def run_downloads(tracker: FileTracker, paths_todo: list[str], *, local_dir: Path, endpoint: str,
                  token: str | None, opts: Options, tool: str, stopper: Stopper, log,
                  stream: TextIO, quiet: bool = False,
                  on_tick: Callable[[], None] | None = None) -> RunResult:
    """Download the given files of a task with -j workers; returns when all are done or stopped."""
    started = time.monotonic()
    children = ChildSet()
    backend = BACKENDS[tool](opts, children, log)
    todo_bytes = sum(tracker.by_path[p].size for p in paths_todo)
    progress = Progress(len(paths_todo), todo_bytes, 0, 0, stream, opts.progress_interval, quiet)
    run = Run(tracker, local_dir, endpoint, token, opts, backend, progress, stopper, log)
    work: queue.Queue[str] = queue.Queue()
    for p in paths_todo:
        work.put(p)

    def worker() -> None:
        while not stopper.event.is_set():
            try:
                path = work.get_nowait()
            except queue.Empty:
                return
            try:
                download_one(run, tracker.by_path[path])
            except Exception as exc:     # a bug in one file must not hang the run
                log.exception("unexpected error on %s", path)
                tracker.attempt_failed(path, f"internal error: {exc}", final=True)
                run.failures.append((path, f"internal error: {exc}"))

    if any(tracker.by_path[p].size <= opts.max_single_get for p in paths_todo):
        backend.open()
    threads = [threading.Thread(target=worker, name=f"worker-{i}", daemon=True)
               for i in range(max(1, min(opts.jobs, len(paths_todo))))]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.25 / len(threads))
            progress.tick()
            _save_or_pause(tracker.maybe_save, stopper, log)
            if on_tick:
                on_tick()
            if stopper.event.is_set():
                children.kill_all()
                _join_for(threads, 5.0)
                break
    finally:
        if not stopper.event.is_set():
            backend.close()
        children.kill_all()
        progress.tick(force=True)
        progress.close()
        for p in tracker.paths_in(FileState.DOWNLOADING):
            tracker.interrupted(p)
        _save_or_pause(tracker.save, stopper, log)
    after = tracker.summary()
    result = RunResult(status="", tool=tool, files_total=after["files_total"],
                       files_done=after["files_done"], files_failed=after["files_failed"],
                       bytes_done=after["bytes_done"], bytes_fetched=progress.fetched,
                       elapsed=time.monotonic() - started, failures=run.failures)
    return result


def _save_or_pause(save: Callable[[], None], stopper: "Stopper", log) -> bool:
    """Save the state; a full disk (ENOSPC) stops the run as disk_full instead of crashing it.
    The atomic writer leaves the previous file intact, and resume rebuilds from the disk."""
    try:
        save()
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.warning("cannot save the task state: %s", exc.strerror)
        stopper.stop("disk_full", "no space left to save the task state")
        return False


def _join_for(threads: list[threading.Thread], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


# ================================================================ running a task

_STOP_EXIT = {StopReason.INTERRUPTED: "paused", StopReason.TERMINATED: "paused",
              StopReason.DISK_FULL: "paused", StopReason.CANCELLED: "cancelled"}


@contextlib.contextmanager
def stop_signals(stopper: Stopper):
    """Ctrl-C and SIGTERM stop the run cleanly (tools ended, state saved) instead of raising."""
    handlers = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig, reason in handlers.items():
            previous[sig] = signal.signal(sig, lambda *_a, r=reason: stopper.stop(r))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def bytes_still_needed(tracker: FileTracker, local_dir: Path, todo: list[str]) -> int:
    """What the selected files still need on disk: their sizes minus partial bytes present."""
    needed = 0
    for path in todo:
        f = tracker.by_path[path]
        final = safe_join(local_dir, f.path)
        partial = partial_path(final, f.expected_hash)
        needed += max(0, f.size - bytes_on_disk(partial))
    return needed


def run_task(store, task: dict, tracker: FileTracker, *, endpoint: str, token: str | None,
             opts: Options, reserve: int, log, stream: TextIO, quiet: bool = False,
             todo: list[str] | None = None, local_dir: Path | None = None,
             before_start: Callable[[], None] | None = None) -> RunResult:
    """Run the unfinished files of a task (or of `todo` only) under its lock; record the outcome.

    `before_start` runs after the preflight, before the first byte (a batch writes its disk
    marker there)."""
    import system_monitor
    tool = choose_tool(opts.tool)
    local_dir = Path(local_dir or task["local_dir"])
    unfinished = tracker.paths_in(FileState.PENDING, FileState.DOWNLOADING, FileState.FAILED)
    if todo is not None:
        wanted = set(todo)
        unfinished = [p for p in unfinished if p in wanted]
    adopted = reconcile(tracker, local_dir, (tracker.by_path[p] for p in unfinished))
    if adopted:
        log.info("%s: %d files found complete on disk", task["id"], adopted)
    if todo is None:
        missing = forget_missing(tracker, local_dir)
        if missing:
            log.warning("%s: %d completed files are no longer on disk; fetching them again",
                        task["id"], missing)
        todo = tracker.paths_in(FileState.PENDING, FileState.DOWNLOADING, FileState.FAILED)
    else:
        todo = [p for p in todo if tracker.status[p]["status"] != FileState.COMPLETED.value]
    for path in todo:           # a new run gives failed files a fresh set of tries
        if tracker.status[path]["status"] == FileState.FAILED.value:
            tracker.reset(path, tracker.status[path].get("error"))
    store.clear_cancel(task["id"])
    if todo:
        system_monitor.preflight(local_dir, needed=bytes_still_needed(tracker, local_dir, todo),
                                 reserve=reserve)
    if before_start:
        before_start()
    stopper = Stopper()
    store.update(task["id"], status="running", reason="", tool=tool, pid=os.getpid(),
                 endpoint=endpoint, **tracker.summary())
    log.info("%s: %s %s@%s, %d files to fetch with %s (-x %d -j %d)", task["id"],
             task["repo_type"], task["repo_id"], tracker.meta["commit"], len(todo), tool,
             opts.connections, opts.jobs)

    last_summary = [time.monotonic(), tracker.summary()]

    def on_tick() -> None:
        if store.cancel_requested(task["id"]):
            stopper.stop("cancelled")
        # `status` from another terminal reads tasks.json: keep its counters fresh (every 5 s)
        now = time.monotonic()
        if now - last_summary[0] >= 5:
            summary = tracker.summary()
            if summary != last_summary[1]:
                store.update(task["id"], **summary)
            last_summary[:] = [now, summary]

    def on_low(usage) -> None:
        stopper.stop("disk_full", f"{format_size(usage.free)} free, "
                                  f"{format_size(reserve)} kept in reserve")

    result = RunResult(status="completed", tool=tool)
    with stop_signals(stopper), system_monitor.DiskGuard(local_dir, reserve, interval=2.0,
                                                         on_low=on_low):
        if todo:
            result = run_downloads(tracker, todo, local_dir=local_dir, endpoint=endpoint,
                                   token=token, opts=opts, tool=tool, stopper=stopper, log=log,
                                   stream=stream, quiet=quiet, on_tick=on_tick)
    result = finish_task(store, task, tracker, result, stopper, log)
    result.bytes_missing = bytes_still_needed(tracker, local_dir, tracker.paths_in(
        FileState.PENDING, FileState.DOWNLOADING, FileState.FAILED))
    return result


def finish_task(store, task: dict, tracker: FileTracker, result: RunResult, stopper: Stopper,
                log) -> RunResult:
    # files adopted from the disk without a download still need their state saved
    _save_or_pause(tracker.flush, stopper, log)
    summary = tracker.summary()
    result.files_total, result.files_done = summary["files_total"], summary["files_done"]
    result.files_failed, result.bytes_done = summary["files_failed"], summary["bytes_done"]
    if stopper.reason:
        result.status, result.reason = _STOP_EXIT[stopper.reason], stopper.reason.value
        result.stop, result.detail = stopper.reason, stopper.detail
        if stopper.detail:
            result.reason += f": {stopper.detail}"
    elif result.files_failed:
        result.status = "failed"
        result.reason = f"{result.files_failed} of {result.files_total} files failed"
    else:
        result.status = "completed"
    store.clear_cancel(task["id"])
    _save_or_pause(lambda: store.update(
        task["id"], status=result.status, reason=result.reason, pid=None,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z") if result.status != "paused" else None,
        **summary), stopper, log)
    log.info("%s: %s %s (%d/%d files, %d bytes fetched in %.1f s)", task["id"], result.status,
             result.reason, result.files_done, result.files_total, result.bytes_fetched,
             result.elapsed)
    return result


# ================================================================ the main path

@dataclass(frozen=True)
class DownloadRequest:
    repo_id: str
    repo_type: str
    revision: str
    local_dir: Path
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    prune: bool = False

    def identity(self) -> dict:
        return {"kind": "download", "repo_id": self.repo_id, "repo_type": self.repo_type,
                "revision": self.revision, "local_dir": str(self.local_dir),
                "include": list(self.include), "exclude": list(self.exclude)}


@dataclass
class DownloadOutcome:
    task: dict
    result: RunResult
    sync: object | None = None            # file_tracker.SyncReport when the commit moved
    pruned: list[str] = field(default_factory=list)
    resumed: bool = False


def open_task(store, req: DownloadRequest, listing, endpoint: str):
    """Find the task of the same download (resume it, syncing to a new commit) or create one.
    Call with the task lock held for an existing task; returns (task, tracker, sync report)."""
    existing = store.find(req.identity())
    if existing is None:
        task = store.create({**req.identity(), "commit": listing.commit,
                             "files_total": len(listing.files), "bytes_total": listing.total_size})
        tracker = FileTracker.create(store.paths(task["id"]), task["id"], listing, endpoint)
        return task, tracker, None
    tracker = FileTracker.load(store.paths(existing["id"]), existing["id"])
    sync = None
    if tracker.meta["commit"] != listing.commit:
        sync = tracker.sync(listing, endpoint)
        summary = tracker.summary()
        # Until it runs (it may yet be refused for space), the record must not say "completed"
        # for a commit whose new files are missing.
        behind = summary["files_done"] < summary["files_total"] and \
            existing.get("status") == "completed"
        existing = store.update(existing["id"], commit=listing.commit, **summary,
                                **({"status": "paused", "reason": "new commit: files to fetch"}
                                   if behind else {}))
    return existing, tracker, sync


def drop_old_partials(local_dir: Path, old_versions: dict[str, str]) -> None:
    """Partial bytes of versions the new commit replaced can never complete: remove them."""
    for path, old_hash in old_versions.items():
        try:
            partial = partial_path(safe_join(local_dir, path), old_hash)
        except ValueError:
            continue
        for p in (partial, *partial_sidecars(partial)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def prune_removed(local_dir: Path, removed: list[str]) -> list[str]:
    """Delete local files that the new commit removed (only with --prune)."""
    gone = []
    for path in removed:
        with contextlib.suppress(ValueError, FileNotFoundError):
            safe_join(local_dir, path).unlink()
            gone.append(path)
    return gone


def _needed_for_new(local_dir: Path, listing) -> int:
    """Bytes a new task will write: files already complete at their final path don't count."""
    needed = 0
    for f in listing.files:
        try:
            if os.stat(safe_join(local_dir, f.path)).st_size == f.size:
                continue
        except (FileNotFoundError, NotADirectoryError, ValueError):
            pass
        needed += f.size
    return needed


def download_repo(store, req: DownloadRequest, listing, *, endpoint: str, token: str | None,
                  opts: Options, reserve: int, log, stream: TextIO,
                  quiet: bool = False) -> DownloadOutcome:
    """`download REPO`: find or create the task, take its lock, sync, run."""
    existing = store.find(req.identity())
    if existing is None:
        # Refuse before creating anything: no task, no folder, no file.
        import system_monitor
        system_monitor.preflight(req.local_dir, needed=_needed_for_new(req.local_dir, listing),
                                 reserve=reserve)
        task, tracker, sync = open_task(store, req, listing, endpoint)
        lock_id = task["id"]
    else:
        lock_id = existing["id"]
    with store.lock(lock_id):
        if existing is not None:
            task, tracker, sync = open_task(store, req, listing, endpoint)
        if sync:
            drop_old_partials(req.local_dir, sync.old_versions)
        pruned = prune_removed(req.local_dir, sync.removed) if sync and req.prune else []
        result = run_task(store, task, tracker, endpoint=endpoint, token=token, opts=opts,
                          reserve=reserve, log=log, stream=stream, quiet=quiet)
    return DownloadOutcome(store.get(lock_id), result, sync, pruned, existing is not None)


# ================================================================ resume and options

def resume_task(store: TaskStore, task_id: str, *, endpoint: str, token: str | None,
                opts: Options, reserve: int, log: logging.Logger, stream: TextIO,
                quiet: bool = False,
                on_start: Callable[[str], None] | None = None) -> DownloadOutcome:
    """`resume TASK`: take the task's lock, load its files and run the unfinished ones.

    `on_start` gets the pinned commit once the lock is held, before any preflight."""
    with store.lock(task_id):
        task = store.get(task_id)
        tracker = FileTracker.load(store.paths(task_id), task_id)
        if on_start is not None:
            on_start(tracker.meta["commit"])
        result = run_task(store, task, tracker, endpoint=endpoint, token=token, opts=opts,
                          reserve=reserve, log=log, stream=stream, quiet=quiet)
    return DownloadOutcome(store.get(task_id), result, resumed=True)


def options_from_config(cfg: Config, *, connections: int, jobs: int, retries: int,
                        stall_timeout: float) -> Options:
    """The run's options: the per-command flags plus the settings that live in config."""
    return Options(tool=cfg.get("tool"), connections=connections, jobs=jobs, retries=retries,
                   stall_timeout=stall_timeout, retry_base=cfg.get("retry_base_delay"),
                   max_single_get=cfg.get("max_single_get"),
                   progress_interval=cfg.get("progress_interval"))
