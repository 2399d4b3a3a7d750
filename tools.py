"""The external tools (aria2c, wget) behind transfer's Backend interface, and the one place
that starts child processes: argv lists, no inherited token, killed with the run.

The tools never see the token: they only get links that need none (a signed link on another
origin, or any link when no token is set); the downloader sends the rest to the python backend.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from stream_hash import PrefixHasher, aria2_done_prefix
from http_pool import USER_AGENT, Pool
from transfer import (FailureKind, FetchError, Job, Report,
                      auth_headers, cut_short, http_error, refused, resolve_location,
                      retry_after_seconds, same_origin, short_error, stalled, strip_query)
from utils import ToolError, UsageError

log = logging.getLogger("hfdl.tools")

TOOLS = ("auto", "aria2c", "wget", "python")


def choose_tool(requested: str) -> str:
    """auto: python, the fastest transport for every kind of repo measured (bench/, idle, at
    170f7bc: one 1 GiB file at -x 16 4.80 s against aria2c's 4.93 s, eight 256 MiB files at -x 8
    4.64 s against 7.22 s, 3,000 small files at -j 16 13.0 s against wget's 19.3 s and aria2c's
    28.6 s, 2 GiB uncapped at -x 1 2.90 s against wget's 4.29 s); it also keeps every
    connection in-process (pooled, no process per file)."""
    if requested not in TOOLS:
        raise UsageError(f"unknown tool {requested!r}", hint="use aria2c, wget, python or auto")
    if requested == "auto":
        return "python"
    if requested != "python" and not shutil.which(requested):
        package = "aria2" if requested == "aria2c" else "wget"
        raise ToolError(f"{requested} is not installed",
                        hint=f"install it (apt-get install {package}) or use --tool python")
    return requested


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
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()

    def start(self, argv: list[str], *, env: dict[str, str],
              stdout: IO[bytes]) -> subprocess.Popen[bytes]:
        # preexec_fn forces a slow fork of this process under the GIL (5.9 ms a spawn vs 0.7
        # measured); setpriv sets the same parent-death signal in the child instead.
        setpriv = _setpriv()
        extra: dict[str, Any] = {} if setpriv else {"preexec_fn": _die_with_parent}
        proc = subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv,
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, **extra)
        with self._lock:
            self._procs.add(proc)
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
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


def watch_process(proc: subprocess.Popen[bytes], job: Job, report: Report,
                  stop: threading.Event, stall_timeout: float) -> int:
    """Wait for a tool, reporting progress from the partial file and killing it on a stall."""
    last_mark: tuple[int, int] | None = None
    last_change = time.monotonic()
    while True:
        try:
            return proc.wait(0.25)
        except subprocess.TimeoutExpired:
            pass
        try:
            st = os.stat(job.partial.path)
            mark: tuple[int, int] | None = (st.st_size, st.st_blocks)
        except FileNotFoundError:
            mark = None
        if mark != last_mark:
            last_mark, last_change = mark, time.monotonic()
            report(job.partial.bytes_on_disk())
        if stop.is_set():
            kill_group(proc)
            raise FetchError("stopped", FailureKind.STOPPED)
        if time.monotonic() - last_change > stall_timeout:
            kill_group(proc)
            raise stalled(stall_timeout)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM the tool's process group, KILL it after 3 s."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def redact(text: str, token: str | None) -> str:
    """Text fit for a log or a message: no token, no Bearer value, no signed query string."""
    if token:
        text = text.replace(token, "****")
    return strip_query(re.sub(r"(Bearer\s+)\S+", r"\1****", text))


def private_file(folder: Path, name: str, text: str) -> Path:
    """Write a file only we can read (0600), refusing to reuse an existing one."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


TEMP_PREFIX = "hfdl-"


def temp_folder(kind: str) -> Path:
    """A private temp folder named after our pid, so a later run can tell a dead run's."""
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{kind}-{os.getpid()}-"))


def remove_stale_temp() -> int:
    """Remove the temp folders of our runs that died without cleaning up (kill -9): those of
    this user whose pid is no longer alive. Returns how many were removed."""
    removed = 0
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            m = re.fullmatch(rf"{TEMP_PREFIX}[a-z0-9]+-(\d+)-\w+", entry.name)
            if not m or int(m.group(1)) == os.getpid():
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.getuid() or \
                        not entry.is_dir(follow_symlinks=False):
                    continue
                os.kill(int(m.group(1)), 0)
                continue                      # alive: another run's
            except ProcessLookupError:
                pass
            except OSError:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


# ================================================================ what the tools share

def link_pool(stall_timeout: float) -> Pool:
    """Connections for the HEAD requests that resolve links and probe Retry-After."""
    t = min(30, stall_timeout)
    return Pool(t, t)


def tool_link(pool: Pool, job: Job) -> str | None:
    """The link a tool may be given, or None when the file needs the token (the endpoint
    serves it itself): with a token, follow the endpoint's redirects here, with the token,
    to a link on another origin (a signed CDN link), which needs none."""
    if not job.token:
        return job.url
    try:
        url = resolve_location(pool, job)
    except FetchError:
        raise
    except Exception as exc:
        raise FetchError(f"resolving the download link failed: {short_error(exc)}") from None
    return None if same_origin(url, job.endpoint) else url


def tool_url(pool: Pool, job: Job) -> str:
    """The link for this attempt: the one resolved ahead for the first, a fresh one after
    (signed links expire)."""
    url, job.link = job.link, None
    url = url or tool_link(pool, job)
    if url is None:       # the endpoint now serves it itself: only the python backend may
        raise FetchError("the file now needs the token; it is left for the next run")
    return url


def probe_retry_after(pool: Pool, job: Job) -> float:
    """The tools do not always show response headers: ask once how long the Hub wants us to
    wait."""
    try:
        with pool.request("HEAD", job.url, auth_headers(job.url, job)) as resp:
            return retry_after_seconds(resp.headers) or 5.0
    except Exception:
        return 5.0


# ================================================================ aria2c

class Aria2Daemon:
    """One aria2c for the whole run, driven over JSON-RPC on 127.0.0.1.

    A process per file costs more than a small file takes to fetch, and loses aria2c's
    connection reuse; one daemon keeps both. Its RPC secret reaches it through a 0600 config
    file, removed as soon as aria2c answers (it has read it), and nothing is sent to the port
    before we have seen that the socket listening there is our child's. It never gets the
    token: only links that need none."""

    def __init__(self, children: ChildSet, *, stall_timeout: float, jobs: int) -> None:
        import secrets

        import requests
        self.secret = secrets.token_hex(16)
        if remove_stale_temp():
            log.info("removed the temp folders of runs that died")
        self.http = requests.Session()
        self.http.trust_env = False          # 127.0.0.1: never through a proxy
        self._ids = 0
        # The port is free when we pick it, but another process may bind it before aria2c does
        # (seen under load): aria2c then exits at once, and we try another port.
        for attempt in range(1, 4):
            try:
                self._start(children, stall_timeout, jobs)
                return
            except ToolError as exc:
                if attempt == 3 or "Address already in use" not in str(exc):
                    raise
                log.info("aria2c's RPC port %d was taken meanwhile; trying another", self.port)

    def _start(self, children: ChildSet, stall: float, jobs: int) -> None:
        self.folder = temp_folder("aria2")       # removed once aria2c has read it, or by close()
        conf = private_file(self.folder, "aria2.conf", f"rpc-secret={self.secret}\n")
        self.port = _free_port()
        argv = ["aria2c", f"--conf-path={conf}", "--enable-rpc", "--rpc-listen-all=false",
                f"--rpc-listen-port={self.port}", f"--max-concurrent-downloads={max(1, jobs)}",
                "--continue=true", "--auto-file-renaming=false", "--allow-overwrite=true",
                "--file-allocation=none", "--max-tries=1", "--retry-wait=0",
                "--auto-save-interval=1", f"--connect-timeout={int(min(60, stall))}",
                f"--timeout={int(max(5, stall))}", "--console-log-level=warn",
                "--summary-interval=0", "--show-console-readout=false", "--remote-time=false",
                "--allow-piece-length-change=true", f"--user-agent={USER_AGENT}",
                f"--stop-with-process={os.getpid()}"]
        log.info("running: %s", " ".join(argv))
        self.output = tempfile.TemporaryFile()
        try:
            self.proc = children.start(argv, env=child_env(), stdout=self.output)
        except BaseException:
            self.output.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                if not _listens_on(self.proc.pid, self.port):
                    raise FetchError("not listening yet")
                self.call("aria2.getVersion")
                shutil.rmtree(self.folder, ignore_errors=True)    # the secret: read, not kept
                return
            except Exception:
                self.output.seek(0)
                text = self.output.read().decode(errors="replace").strip()[-300:]
                # aria2c keeps running when it could bind only one of 127.0.0.1 / ::1
                if self.proc.poll() is not None or time.monotonic() > deadline or \
                        "Address already in use" in text:
                    self.close()
                    raise ToolError(f"aria2c did not start its RPC server: {text or 'no output'}",
                                    hint="try --tool python or --tool wget") from None
                time.sleep(0.05)

    def call(self, method: str, *params: Any) -> Any:
        # Our child listening there (checked before the first call) keeps the port from anyone
        # else while it lives: once it is gone, nothing more is sent.
        if self.proc.poll() is not None:
            raise FetchError("aria2c has stopped")
        self._ids += 1
        try:
            resp = self.http.post(f"http://127.0.0.1:{self.port}/jsonrpc", timeout=30, json={
                "jsonrpc": "2.0", "id": self._ids, "method": method,
                "params": [f"token:{self.secret}", *params]})
            data = resp.json()
        except Exception as exc:
            raise FetchError(f"aria2c stopped answering: {short_error(exc)}") from None
        if "error" in data:
            raise FetchError(f"aria2c: {data['error'].get('message', data['error'])}")
        return data["result"]

    def close(self) -> None:
        """End the daemon and remove its temp folder. After a normal run every download was
        completed or removed (removal writes the control file), so nothing is left to save:
        SIGKILL is immediate, while aria2c's own shutdown takes 1 s (SIGTERM) to 4 s (RPC)
        even when idle. After a stop, ChildSet.kill_all has already ended it with SIGTERM."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.output.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _listens_on(pid: int, port: int) -> bool:
    """Whether every socket listening on 127.0.0.1:port (or any address) is held by `pid`, and
    there is one: a local user who bound the port first must never get our RPC secret."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                addr, _, hexport = fields[1].partition(":")
                if fields[3] == "0A" and int(hexport, 16) == port:    # 0A: LISTEN
                    inodes.add(fields[9])
    if not inodes:
        return False
    held = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    held.add(link[8:-1])
    return inodes <= held


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Aria2Backend:
    """aria2c: split downloads over several connections, through one daemon per run."""

    name = "aria2c"
    resumable = frozenset({"seq", "aria2"})
    POLL = 0.2

    def __init__(self, children: ChildSet, *, stall_timeout: float, jobs: int) -> None:
        self.children = children
        self.stall_timeout = stall_timeout
        self.jobs = jobs
        self.links = link_pool(stall_timeout)
        self._daemon: Aria2Daemon | None = None
        self._daemon_lock = threading.Lock()

    def open(self) -> None:
        """Start the daemon from the main thread: a child gets SIGKILL when the *thread* that
        started it ends (PR_SET_PDEATHSIG), and worker threads end before the run does."""
        self.daemon()

    def daemon(self) -> Aria2Daemon:
        with self._daemon_lock:
            if self._daemon is None:
                self._daemon = Aria2Daemon(self.children, stall_timeout=self.stall_timeout,
                                           jobs=self.jobs)
            return self._daemon

    def close(self) -> None:
        with self._daemon_lock:
            daemon, self._daemon = self._daemon, None
        if daemon is not None:
            daemon.close()

    def fetch(self, job: Job, report: Report, stop: threading.Event) -> str | None:
        job.partial.check()        # the tool follows symlinks: none may be on the way
        url = tool_url(self.links, job)
        split = max(1, job.connections)
        options: dict[str, Any] = {
            "dir": str(job.partial.path.parent), "out": job.partial.path.name,
            "split": str(split), "max-connection-per-server": str(min(16, split)),
            # 1M: with bigger segments aria2c idles half its connections after the
            # redirect until the first segments finish (measured: 8.0 s -> 4.9 s, 1 GiB)
            "min-split-size": "1M"}
        daemon = self.daemon()
        gid = daemon.call("aria2.addUri", [url], options)
        hasher = PrefixHasher(job.partial.path, job.file)
        try:
            self._watch(daemon, gid, job, report, stop, hasher)
        finally:
            hasher.close()
            with contextlib.suppress(Exception):
                daemon.call("aria2.forceRemove", gid)
            with contextlib.suppress(Exception):
                daemon.call("aria2.removeDownloadResult", gid)
        report(job.partial.bytes_on_disk())
        return hasher.finish()

    def _watch(self, daemon: Aria2Daemon, gid: str, job: Job, report: Report,
               stop: threading.Event, hasher: PrefixHasher) -> None:
        """Poll one download: progress, the finished prefix (to the hasher), completion,
        errors, stalls and stops."""
        keys = ["status", "completedLength", "errorCode", "errorMessage", "bitfield",
                "pieceLength"]
        last, last_change = -1, time.monotonic()
        delay = 0.01          # small files finish in tens of ms: look soon, then back off
        while True:
            if stop.wait(delay):
                raise FetchError("stopped", FailureKind.STOPPED)
            delay = min(self.POLL, delay * 1.5)
            st = daemon.call("aria2.tellStatus", gid, keys)
            done = int(st.get("completedLength") or 0)
            if done != last:
                last, last_change = done, time.monotonic()
                report(done)
                hasher.advance(aria2_done_prefix(st.get("bitfield") or "",
                                                 int(st.get("pieceLength") or 0), job.file.size))
            if st["status"] == "complete":
                return
            if st["status"] in ("error", "removed"):
                raise self.error(int(st.get("errorCode") or 1), st.get("errorMessage") or "", job)
            if time.monotonic() - last_change > self.stall_timeout:
                raise stalled(self.stall_timeout)

    def error(self, code: int, detail: str, job: Job) -> FetchError:
        """aria2c's error code and message in the words every backend uses (transfer.py):
        the HTTP status in its message, 2 (timeout), 3 (not found), 9 (disk full), and a
        dropped connection (1 or 6: "Connection reset", "EOF", or the "No URI available"
        left when the connections of a download failed that way)."""
        detail = redact(detail, job.token)[:300]
        status = re.search(r"status=(\d{3})", detail)
        n = int(status.group(1)) if status else None
        if n == 429:
            return FetchError("rate limited (429)", FailureKind.RATE_LIMITED,
                              retry_after=probe_retry_after(self.links, job))
        if n == 401:
            return FetchError(f"HTTP {n}: access refused", FailureKind.DENIED)
        if n is not None and n >= 400:
            return http_error(n, job.url, {})
        if code == 3:
            return FetchError("HTTP 404 not found", FailureKind.NOT_FOUND)
        if code == 9:
            return FetchError(f"aria2c: not enough disk space: {detail}", FailureKind.DISK_FULL)
        if code == 2 or "timeout" in detail.lower() or "timed out" in detail.lower():
            return stalled(self.stall_timeout)
        if "refused" in detail.lower():
            return refused()
        if code in (1, 6) and re.search(r"reset|EOF|receive|No URI|closed", detail, re.I):
            return cut_short(job.partial.bytes_on_disk(), job.file.size)
        return FetchError(f"aria2c error {code}: {detail}")


# ================================================================ wget

class WgetBackend:
    """wget: one process per file, one connection each."""

    name = "wget"
    resumable = frozenset({"seq"})

    def __init__(self, children: ChildSet, *, stall_timeout: float) -> None:
        self.children = children
        self.stall_timeout = stall_timeout
        self.links = link_pool(stall_timeout)

    def open(self) -> None:
        """Nothing runs between files."""

    def close(self) -> None:
        """Nothing to end: each process ends with its file."""

    def fetch(self, job: Job, report: Report, stop: threading.Event) -> str | None:
        job.partial.check()        # the tool follows symlinks: none may be on the way
        url = tool_url(self.links, job)
        # --no-iri: in a C locale (cron) wget would otherwise re-encode the signed CDN URL.
        # --progress=dot:giga: verbose enough to say why a transfer ended ("Read error at byte
        # ... (Connection reset by peer)"), one line per 32 MiB of progress dots.
        argv = ["wget", "--no-config", "--continue", "--no-iri", "--tries=1", "--server-response",
                "--progress=dot:giga", f"--timeout={int(max(5, self.stall_timeout))}",
                f"--user-agent={USER_AGENT}", f"--output-document={job.partial.path}", "--", url]
        hasher = PrefixHasher(job.partial.path, job.file)

        def landed(n: int) -> None:       # wget writes in order: what is on disk is final
            report(n)
            hasher.advance(n)
        try:
            self._run(argv, job, landed, stop)
        finally:
            hasher.close()
        return hasher.finish()

    def _run(self, argv: list[str], job: Job, report: Report, stop: threading.Event) -> None:
        """Run wget for one file; its output goes to a scratch file we read back."""
        log.debug("running: %s", redact(" ".join(argv), job.token))
        with tempfile.TemporaryFile() as output:
            proc = self.children.start(argv, env=child_env(), stdout=output)
            try:
                code = watch_process(proc, job, report, stop, self.stall_timeout)
            finally:
                self.children.forget(proc)
            output.seek(0)
            detail = _wget_tail(output.read().decode(errors="replace"), job.token)
        if code != 0:
            raise self.error(code, detail, job)
        report(job.partial.bytes_on_disk())

    def error(self, code: int, detail: str, job: Job) -> FetchError:
        """wget's exit code (3: file write error, 4: network failure) and the last HTTP
        status it printed, in the words every backend uses (transfer.py)."""
        statuses = re.findall(r"HTTP/[\d.]+ (\d{3})", detail)
        n = int(statuses[-1]) if statuses else None
        if n == 429:
            after = re.findall(r"Retry-After:\s*(\d+)", detail)
            return FetchError("rate limited (429)", FailureKind.RATE_LIMITED,
                              retry_after=float(after[-1]) if after
                              else probe_retry_after(self.links, job))
        if n == 401:
            return FetchError(f"HTTP {n}: access refused", FailureKind.DENIED)
        if n == 416:
            return FetchError("HTTP 416: the partial file is longer than the file",
                              FailureKind.BAD_PARTIAL)
        if n is not None and n >= 400:
            return http_error(n, job.url, {})
        if code == 3:
            return FetchError(f"wget: file write error: {detail}", FailureKind.DISK_FULL)
        if "timed out" in detail:
            return stalled(self.stall_timeout)
        if "refused" in detail:
            return refused()
        if code == 4:
            return cut_short(job.partial.bytes_on_disk(), job.file.size)
        return FetchError(f"wget exited {code}: {detail}")


def _wget_tail(text: str, token: str | None) -> str:
    """The lines of wget's output that explain a failure, for the error message and the log."""
    keep = [ln.strip() for ln in text.splitlines()
            if re.search(r"^\s*HTTP/\d|^\s*Retry-After:|Cannot write|No space left|rror:|"
                         r"failed|refused|ERROR|Read error|Connection closed|timed out", ln)]
    return redact(" | ".join(keep[-4:]), token)[:400]
