"""Measuring: disk space, write permission, endpoint reachability, CPU/memory; a disk guard.

This module measures and callers decide policy: it never prints and never exits.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar


from utils import DiskSpaceError, HFDError, format_size

if TYPE_CHECKING:        # psutil and requests are imported where used: ~0.15 s at start-up
    import requests

# Under the tool's "hfdl" logger, so its lines reach logs/download.log like the rest.
log = logging.getLogger("hfdl.system_monitor")

LOW_MEMORY = 500 * 2**20
T = TypeVar("T")


# ---------------------------------------------------------------- disk

@dataclass(frozen=True)
class DiskUsage:
    path: str            # the folder measured: the asked one or its nearest existing ancestor
    total: int
    used: int
    free: int            # available to an unprivileged user (f_bavail), what a download can use
    percent_used: float
    device: int          # st_dev, the filesystem identity
    mount_point: str


def _existing_ancestor(path: str | os.PathLike[str]) -> Path:
    """The folder itself, or the nearest ancestor that exists (a download folder may not yet)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mount_points() -> list[str]:
    """The mount table's mount points: /proc/self/mounts where there is one (what psutil
    reads too, without importing it at start-up), else psutil."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        import psutil
        return [m.mountpoint for m in psutil.disk_partitions(all=True)]
    # the fields escape space, tab, newline and backslash as octal: \040 \011 \012 \134
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
            for line in lines if len(line.split()) > 1]


def _mount_point(path: Path, device: int) -> str:
    """Longest mount-table prefix on the same device; else walk up until st_dev changes."""
    real = os.path.realpath(path)
    candidates = [m for m in _mount_points()
                  if real == m or real.startswith(m.rstrip("/") + "/")]
    for mount in sorted(candidates, key=len, reverse=True):
        try:
            # Only ancestors of `path` are stat'ed: a dead network mount elsewhere cannot hang us.
            if os.stat(mount).st_dev == device:
                return mount
        except OSError:
            continue
    p = Path(real)
    while p != p.parent and os.stat(p.parent).st_dev == device:
        p = p.parent
    return str(p)


def disk_usage(path: str | os.PathLike[str]) -> DiskUsage:
    """Space on the filesystem that holds `path` (or would, once it is created)."""
    where = _existing_ancestor(path)
    st = os.statvfs(where)
    total = st.f_blocks * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    free = st.f_bavail * st.f_frsize
    # Like df: blocks reserved for root count neither as used nor as available.
    percent = round(100.0 * used / (used + free), 1) if used + free else 0.0
    device = os.stat(where).st_dev
    return DiskUsage(str(where), total, used, free, percent, device, _mount_point(where, device))


_ERRNO_REASONS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device",
                  errno.EDQUOT: "disk quota exceeded",
                  errno.EEXIST: "the path is a file, not a folder",
                  errno.ENOTDIR: "a part of the path is a file, not a folder"}


def _os_reason(exc: OSError) -> str:
    reason = _ERRNO_REASONS.get(exc.errno) if exc.errno else None
    return reason or (exc.strerror or str(exc)).lower()


def check_writable(path: str | os.PathLike[str], *, create: bool = True) -> str | None:
    """Create the folder if needed and a probe file in it: None when writable, else why not.

    create=False leaves no trace: a missing folder is judged by its nearest existing ancestor,
    where it would be created (for check-system, which must not make folders).
    """
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            where = Path(path)
        else:
            where = _existing_ancestor(path)
            if not where.is_dir():
                asked = where == Path(os.path.abspath(path))
                raise OSError(errno.EEXIST if asked else errno.ENOTDIR, "not a folder")
        # Actually writing answers what access()/mode bits cannot: ro mounts, ACLs, quotas, root.
        fd, probe = tempfile.mkstemp(prefix=".hfd-write-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return _os_reason(exc)
    return None


def is_read_only(path: str | os.PathLike[str]) -> bool:
    """The filesystem that holds `path` (or would) is mounted read-only; asks without writing."""
    return bool(os.statvfs(_existing_ancestor(path)).f_flag & os.ST_RDONLY)


# ---------------------------------------------------------------- endpoint

@dataclass(frozen=True)
class EndpointCheck:
    url: str
    ok: bool
    seconds: float | None
    status: int | None
    proxy: str | None    # password masked
    error: str | None
    hub: bool | None = None    # the answer was JSON, as a Hub API's (None: not asked)


# Greedy up to the last '@' before any '/': a password may itself contain '@'.
_USERINFO_RE = re.compile(r"^(?P<scheme>[A-Za-z][\w+.-]*://)?(?P<user>[^:/@]*):[^/]*@")


def mask_proxy(proxy: str) -> str:
    """'http://user:secret@host:3128' -> 'http://user:****@host:3128'."""
    return _USERINFO_RE.sub(lambda m: f"{m['scheme'] or ''}{m['user']}:****@", proxy, count=1)


def _proxy_for(url: str) -> str | None:
    import requests
    proxies = requests.utils.get_environ_proxies(url)   # honors HTTP(S)_PROXY and NO_PROXY
    proxy = requests.utils.select_proxy(url, proxies)
    return mask_proxy(proxy) if proxy else None


_NET_REASONS = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset",
                errno.ENETUNREACH: "network unreachable", errno.EHOSTUNREACH: "host unreachable"}


def _request_reason(exc: requests.RequestException, timeout: float) -> str:
    """A short human reason for a failed request."""
    import requests
    if isinstance(exc, requests.Timeout):
        return f"timed out after {timeout:g}s"
    prefix = "proxy: " if isinstance(exc, requests.exceptions.ProxyError) else ""
    # requests wraps urllib3's MaxRetryError, whose .reason wraps (via __cause__) the OSError.
    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            break
        if isinstance(e, socket.gaierror):
            return prefix + "name not resolved"
        if isinstance(e, OSError) and e.errno:
            return prefix + (_NET_REASONS.get(e.errno) or _os_reason(e))
        inner = [a for a in e.args if isinstance(a, BaseException)]
        e = getattr(e, "reason", None) or e.__cause__ or (inner[0] if inner else None)
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (certificate or protocol)"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return "invalid URL"
    return prefix + type(exc).__name__


def check_endpoint(url: str, timeout: float = 5.0, *, hub_answer: bool = False) -> EndpointCheck:
    """Time a small API call; any HTTP answer (even 401/404) means the endpoint is reachable.

    With `hub_answer`, the answer must also be a Hub API's: a JSON body (`GET /api/models?limit=1`
    gives a list on the Hub, an error object on a mirror that wants a token); a web server
    answering HTML is "not a Hugging Face Hub endpoint"."""
    import requests
    probe = url.rstrip("/") + "/api/models?limit=1"
    proxy = _proxy_for(probe)
    start = time.monotonic()
    body = b""
    try:
        # stream=True: the time to the status line is what we measure, not the body download.
        with requests.get(probe, timeout=timeout, allow_redirects=False, stream=True) as resp:
            seconds, status = time.monotonic() - start, resp.status_code
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip() or "no type"
            if hub_answer and not (proxy and status in (502, 504)):
                body = resp.raw.read(_HUB_ANSWER_MAX, decode_content=True) or b""
    except requests.RequestException as exc:
        return EndpointCheck(url, False, None, None, proxy, _request_reason(exc, timeout))
    if proxy and status in (502, 504):
        # The proxy answered for a host it could not reach: that is not the endpoint answering.
        return EndpointCheck(url, False, seconds, status, proxy,
                             f"the proxy could not reach it (HTTP {status})")
    if hub_answer:
        if not _is_json(body):
            return EndpointCheck(url, False, seconds, status, proxy,
                                 f"not a Hugging Face Hub endpoint (HTTP {status}, {ctype}, "
                                 f"no JSON answer from /api/models)", hub=False)
        return EndpointCheck(url, True, seconds, status, proxy, None, hub=True)
    return EndpointCheck(url, True, seconds, status, proxy, None)


_HUB_ANSWER_MAX = 256 * 1024       # /api/models?limit=1 is a few KiB


def _is_json(body: bytes) -> bool:
    """A JSON object or list (what the Hub API answers, errors included)."""
    import json
    try:
        return isinstance(json.loads(body.decode("utf-8")), (dict, list))
    except (UnicodeDecodeError, ValueError):
        return False


def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run fn in a daemon thread: a hung DNS lookup must not hold the CLI open at exit."""
    fut: Future[T] = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller through the future
            fut.set_exception(exc)

    threading.Thread(target=run, name="hfd-endpoint-check", daemon=True).start()
    return fut


def pick_endpoint(candidates: list[str], timeout: float = 3.0
                  ) -> tuple[str | None, list[EndpointCheck]]:
    """The first reachable candidate (earlier ones preferred) and the checks made to find it."""
    futures = [_in_daemon_thread(check_endpoint, url, timeout) for url in candidates]
    deadline = time.monotonic() + timeout
    checks: list[EndpointCheck] = []
    for url, fut in zip(candidates, futures, strict=True):
        try:
            check = fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            # requests' timeout is per phase (connect, read), so bound the whole check here.
            check = EndpointCheck(url, False, None, None, _proxy_for(url),
                                  f"timed out after {timeout:g}s")
        checks.append(check)
        if check.ok:
            return url, checks
    return None, checks


# ---------------------------------------------------------------- resources

@dataclass(frozen=True)
class Resources:
    cpu_count: int
    load_avg: tuple[float, float, float]
    memory_total: int
    memory_available: int


def resources() -> Resources:
    """CPUs this process may use, load average, and memory."""
    import psutil
    try:
        cpus = len(os.sched_getaffinity(0))   # respects taskset/cgroup cpusets, unlike cpu_count
    except AttributeError:
        cpus = psutil.cpu_count() or 1
    mem = psutil.virtual_memory()
    load = tuple(float(x) for x in psutil.getloadavg())
    return Resources(cpus, load, int(mem.total), int(mem.available))  # type: ignore[arg-type]


# ---------------------------------------------------------------- report

class Status(enum.StrEnum):
    """Check outcomes, in order of severity."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status       # a str: compares equal to "ok" / "warn" / "fail"
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SystemReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.status != Status.FAIL for c in self.checks)

    @property
    def worst(self) -> Status:
        return max((c.status for c in self.checks), key=list(Status).index, default=Status.OK)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "worst": str(self.worst),
                "checks": [{**asdict(c), "status": str(c.status)} for c in self.checks]}


def _disk_check(path: str | os.PathLike[str], size: int, reserve: int,
                warn_percent: float) -> Check:
    u = disk_usage(path)
    data = {**asdict(u), "size": size, "reserve": reserve, "fits": u.free - size >= reserve}
    if u.free - size < reserve:
        return Check("disk", Status.FAIL, f"{format_size(size)} needed: does not fit: "
                     f"{format_size(u.free)} free ({format_size(reserve)} kept in reserve) on "
                     f"{u.mount_point}", data)
    text = (f"{format_size(u.free)} free of {format_size(u.total)} "
            f"({u.percent_used:.0f}% used) on {u.mount_point}")
    if size:
        text = f"{format_size(size)} needed: fits, {text}"
    # The unrounded share: 89.96% shows as 90.0 but is not yet at a 90% threshold.
    if u.used + u.free and 100.0 * u.used / (u.used + u.free) >= warn_percent:
        return Check("disk", Status.WARN, f"{text}: nearly full", data)
    return Check("disk", Status.OK, text, data)


def _write_check(path: str | os.PathLike[str]) -> Check:
    reason = check_writable(path, create=False)
    if reason:
        return Check("write", Status.FAIL, f"cannot write to {path}: {reason}", {"error": reason})
    later = "" if os.path.isdir(path) else " (it will be created)"
    return Check("write", Status.OK, f"{path} is writable{later}", {"error": None})


def _endpoint_check(endpoint: str, timeout: float) -> Check:
    c = check_endpoint(endpoint, timeout, hub_answer=True)
    via = f"via proxy {c.proxy}" if c.proxy else "direct"
    if c.hub is False:
        return Check("endpoint", Status.FAIL, f"{endpoint}: {c.error} ({via})", asdict(c))
    if not c.ok:
        return Check("endpoint", Status.FAIL, f"{endpoint} unreachable: {c.error} ({via})",
                     asdict(c))
    return Check("endpoint", Status.OK, f"{endpoint} answered in {c.seconds:.2f}s "
                 f"(HTTP {c.status}, {via})", asdict(c))


def _resources_check() -> Check:
    r = resources()
    text = (f"{r.cpu_count} CPUs, load {' '.join(f'{x:.2f}' for x in r.load_avg)}, "
            f"{format_size(r.memory_available)} of {format_size(r.memory_total)} memory available")
    status = Status.WARN if r.memory_available < LOW_MEMORY else Status.OK
    suffix = ": low memory" if status is Status.WARN else ""
    return Check("resources", status, text + suffix, asdict(r))


def _guarded(name: str, fn: Callable[..., Check], *args: Any) -> Check:
    """An OSError while measuring is a failed check, not a crash of the whole report."""
    try:
        return fn(*args)
    except OSError as exc:
        return Check(name, Status.FAIL, _os_reason(exc), {"error": str(exc)})


def check_system(path: str | os.PathLike[str], *, size: int = 0, reserve: int,
                 warn_percent: float = 90.0, endpoint: str | None = None,
                 timeout: float = 5.0) -> SystemReport:
    """Disk, write permission, endpoint (when given) and resources, as one report."""
    checks = [_guarded("disk", _disk_check, path, size, reserve, warn_percent),
              _guarded("write", _write_check, path)]
    if endpoint:
        checks.append(_endpoint_check(endpoint, timeout))
    checks.append(_guarded("resources", _resources_check))
    return SystemReport(tuple(checks))


def format_report(report: SystemReport) -> str:
    """One aligned row per check: name, STATUS, message."""
    width = max((len(c.name) for c in report.checks), default=0)
    return "\n".join(f"{c.name:<{width}}  {c.status.upper():<4}  {c.message}"
                     for c in report.checks)


# ---------------------------------------------------------------- preflight and guard

def preflight(path: str | os.PathLike[str], *, needed: int, reserve: int) -> DiskUsage:
    """The usage, or DiskSpaceError when `needed` does not fit above the reserve, or HFDError.
    Nothing to write (`needed` 0) always passes: the reserve guards bytes still to come."""
    usage = disk_usage(path)
    if needed <= 0:
        return usage
    # A read-only disk first: freeing space cannot help there. statvfs asks without writing.
    if is_read_only(usage.path):
        raise HFDError(f"cannot write to {path}: read-only file system",
                       hint="pick another folder with --local-dir")
    # Space next: it has no side effects, and on a full disk the probe would fail with ENOSPC.
    # A folder we cannot write at all (/proc, a folder of another user) has no space either:
    # say what stops us, since freeing space would not help.
    if usage.free - reserve < needed:
        reason = check_writable(path, create=False)
        if reason and reason not in (_ERRNO_REASONS[errno.ENOSPC], _ERRNO_REASONS[errno.EDQUOT]):
            raise HFDError(f"cannot write to {path}: {reason}",
                           hint="pick another folder with --local-dir")
        raise DiskSpaceError(
            f"not enough space in {path}: {format_size(needed)} needed, {format_size(usage.free)} "
            f"free ({format_size(reserve)} kept in reserve)",
            hint="free space, download elsewhere with --local-dir, narrow the files with "
                 "--include/--exclude, or use batch-download")
    reason = check_writable(path)
    if reason:
        raise HFDError(f"cannot write to {path}: {reason}",
                       hint="pick another folder with --local-dir")
    return usage


class DiskGuard:
    """Watch free space during a download; call on_low(usage) once when it drops below reserve.

    on_low runs in the guard's thread: keep it short (e.g. set an Event the downloader checks).
    """

    def __init__(self, path: str | os.PathLike[str], reserve: int, interval: float = 2.0,
                 on_low: Callable[[DiskUsage], None] | None = None) -> None:
        self.path, self.reserve, self.interval, self.on_low = path, reserve, interval, on_low
        self.last: DiskUsage | None = None
        self.last_error: str | None = None
        self.triggered = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> DiskGuard:
        if self._thread is not None:
            raise RuntimeError("DiskGuard already started")
        self._thread = threading.Thread(target=self._run, name="hfd-disk-guard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        # on_low may call stop() from the guard thread itself, which cannot join itself.
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> DiskGuard:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._measure() or self._stop.wait(self.interval):
                return

    def _measure(self) -> bool:
        """One measurement; True when the guard has fired and should stop watching."""
        try:
            usage = disk_usage(self.path)
        except Exception as exc:  # keep watching: a transient error must not end the guard
            if str(exc) != self.last_error:   # log each distinct error once, not every interval
                log.warning("disk guard could not measure %s: %s", self.path, exc)
            self.last_error = str(exc)
            return False
        self.last, self.last_error = usage, None
        if usage.free >= self.reserve:
            return False
        self.triggered = True
        if self.on_low is not None:
            try:
                self.on_low(usage)
            except Exception:
                log.exception("disk guard on_low callback failed")
        return True
