"""Fetching a work list: -j workers, the backend for each file (the chosen tool, or python for
files that need the token or ranged parts), retries through ONE failure-to-action table, and
each file checked and promoted to its final name.

Each file goes: pending -> downloading (bytes in its Partial) -> checked (size, hash)
-> renamed to its final name -> completed. A final name never holds partial bytes.
Moving a file's bytes is transfer.py's and tools.py's job; the task around it is downloader's.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import hf_cache
from dataset_manager import RemoteFile, file_url
from file_tracker import FileState, FileTracker, check_file
from hub_http import capped_wait
from progress import LivePublisher, Progress
from task_manager import StopReason, TaskState
from http_pool import Pool
from tools import Aria2Backend, ChildSet, WgetBackend, link_pool, tool_link
from transfer import (FULL_DISK_ERRNOS, Backend, FailureKind, FetchError, Job,
                      PythonBackend)
from partial import Partial
from ranges import LinkProbe
from stream_hash import hash_speed
from utils import UnsafePathError, format_size, printable, safe_target


@dataclass(frozen=True)
class Options:
    tool: str = "auto"
    connections: int = 0            # 0: auto, per file (auto_connections)
    jobs: int = 0                   # 0: auto, from the files to fetch (auto_jobs)
    retries: int = 5
    stall_timeout: float = 60.0
    retry_base: float = 1.0
    max_single_get: int = 50 * 10**9
    progress_interval: float = 5.0
    log_interval: float = 60.0      # seconds between progress lines in the log
    max_retry_wait: float = 600.0   # a 429's Retry-After never makes us wait longer


@dataclass
class RunResult:
    status: TaskState               # completed, failed, paused or cancelled
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
    already_complete: bool = False  # nothing was left to fetch when the run started



# ================================================================ how many at once (auto)

SMALL_FILE = 4 << 20         # below this a file is mostly waiting for its first byte
RANGED_FROM = 16 << 20       # auto: files from this size up are fetched over several connections
CONNECTION_BUDGET = 64       # auto: connections the big files being fetched at once start with
MOST_PER_FILE = 32           # auto: a file's connections grow to this while throughput grows
ONE_IS_ENOUGH = 1 / 4        # auto: a run moving this share of one core's sha256 speed with one
                             # connection per big file keeps to one (the CPU is the limit)


def auto_jobs(sizes: list[int]) -> int:
    """Files at once when -j is not given. Small files spend most of their time waiting for the
    first byte, so many go at once (3,000 files of 1-50 KB at 20 ms: -j 8 19.6 s, -j 16 12.5 s,
    -j 32 ~12 s); big files each have their own connections, so a few at once suffice."""
    small = sum(1 for s in sizes if s < SMALL_FILE)
    return 32 if small * 2 > len(sizes) else 8


def auto_connections(size: int, big_at_once: int) -> tuple[int, int]:
    """(connections to start with, most it may grow to) for a file when -x is not given: one
    for a small file; 16 for a big one (one 1 GiB file at 20 MB/s per connection: -x 8 9-11 s,
    -x 16 4.8 s; starting at 8 and doubling lost the ramp: 10.9 s against -x 16's 8.7 s in one
    loaded run), fewer when several big files share a budget of 64, doubled while the file's
    throughput still grows."""
    if size < RANGED_FROM:
        return 1, 0
    share = CONNECTION_BUDGET // max(1, big_at_once)
    start = max(2, min(16, share, size // (4 << 20)))
    if big_at_once > 1:      # eight at 8 each: 11.4 s; growing each to 16: 15.7 s (one run)
        return start, start
    return start, max(start, min(MOST_PER_FILE, 2 * start))


def probe_text(probe: LinkProbe) -> str:
    """The run's verdict on its link, for the log."""
    enough = f"one is enough from {format_size(int(probe.enough))}/s"
    if probe.rate is None and probe.answer is not None and probe.answer >= probe.far:
        return (f"the server is far (its first answers took {probe.answer * 1000:.0f} ms or "
                "more): big files open all their connections")
    moved = (f"one connection per big file moved {format_size(int(probe.rate))}/s in all"
             if probe.rate is not None else "")
    if probe.capped:
        return (f"the link is capped per connection ({moved + ', ' if moved else ''}{enough})"
                ": big files open all their connections")
    return f"{moved} ({enough}: the CPU sets the pace): one each"


def resolved(opts: Options, sizes: list[int]) -> Options:
    """The options with -j chosen from the files when it was not given (-x stays per file)."""
    import dataclasses
    return opts if opts.jobs else dataclasses.replace(opts, jobs=auto_jobs(sizes))


def settings_text(tool: str, opts: Options, sizes: list[int] | None) -> str:
    """-x and -j as the run uses them, for the header: "-x 1 or 16 (auto, up to 32) -j 8 (auto)":
    with python, a big file stays on one connection where one keeps up (ranges.LinkProbe)."""
    if opts.connections:
        x = f"-x {opts.connections}"
    elif sizes is None:
        x = "-x auto"
    else:
        big = [s for s in sizes if s >= RANGED_FROM]
        jobs = opts.jobs or auto_jobs(sizes)
        start, most = auto_connections(max(big), min(jobs, len(big))) if big else (1, 0)
        grows = f", up to {most}" if most > start and tool == "python" else ""
        first = "1 or " if tool == "python" and start > 1 else ""   # LinkProbe: one may do
        x = f"-x {first}{start} (auto{grows})"
    j = (f"-j {opts.jobs}" if opts.jobs else "-j auto" if sizes is None
         else f"-j {auto_jobs(sizes)} (auto)")
    return j if tool == "wget" else f"{x} {j}"


# ================================================================ the backends

BACKENDS: dict[str, Callable[[Options, ChildSet], Backend]] = {
    "aria2c": lambda o, c: Aria2Backend(c, stall_timeout=o.stall_timeout, jobs=o.jobs),
    "wget": lambda o, c: WgetBackend(c, stall_timeout=o.stall_timeout),
    "python": lambda o, c: PythonBackend(o.stall_timeout),
}


# ================================================================ the run

class Stopper:
    """Why a run must stop (first reason wins): interrupted, terminated, cancelled, disk_full."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: StopReason | None = None
        self.detail = ""

    def stop(self, reason: StopReason | str, detail: str = "") -> None:
        reason = StopReason(reason)          # a misspelt reason fails here, not in main's table
        if self.reason is None:
            self.reason, self.detail = reason, detail
        self.event.set()


class RateGate:
    """A 429 slows the whole task: every worker waits until the gate opens."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()

    def close_for(self, seconds: float, cap: float = 600.0,
                  log: logging.Logger | None = None) -> None:
        """Wait `seconds` (as Retry-After asked, at most `cap`); says so once per closing."""
        wait, line = capped_wait(seconds, cap)
        with self._lock:
            was_open = self._until <= time.monotonic()
            self._until = max(self._until, time.monotonic() + wait + 1)
        if was_open and log is not None:
            log.warning("%s", line)

    def wait(self, stop: threading.Event) -> None:
        while True:
            with self._lock:
                delay = self._until - time.monotonic()
            if delay <= 0 or stop.wait(min(delay, 0.5)):
                return


class Action(enum.Enum):
    """What download_one does after a failed attempt."""

    RETRY = "retry"            # count the try, back off, try again
    WAIT = "wait"              # close the rate gate for every worker, then retry
    DISCARD = "discard"        # the partial cannot be continued: remove it, then retry
    STOP_RUN = "stop_run"      # the disk is full: stop the whole run (resume later)
    PAUSE = "pause"            # the run is stopping: leave the file for the next run
    GIVE_UP = "give_up"        # more tries cannot help: the file failed


ON_FAILURE: dict[FailureKind, Action] = {
    FailureKind.TRANSIENT: Action.RETRY,
    FailureKind.RATE_LIMITED: Action.WAIT,
    FailureKind.DENIED: Action.GIVE_UP,
    FailureKind.NOT_FOUND: Action.GIVE_UP,
    FailureKind.BAD_PARTIAL: Action.DISCARD,
    FailureKind.DISK_FULL: Action.STOP_RUN,
    FailureKind.STOPPED: Action.PAUSE,
}


@dataclass
class Run:
    tracker: FileTracker
    local_dir: Path
    endpoint: str
    token: str | None
    opts: Options
    tool: Backend                  # the chosen tool
    ranged: Backend                # the python backend: the only one fetching in ranges only
    progress: Progress
    stopper: Stopper
    log: logging.Logger
    gate: RateGate = field(default_factory=RateGate)
    failures: list[tuple[str, str]] = field(default_factory=list)
    links: Pool | None = None      # for tools.tool_link, made on first use
    token_files: int = 0           # files sent to python because they need the token
    big_at_once: int = 1           # auto -x: big files fetched at the same time
    probe: LinkProbe | None = None  # auto -x: whether one connection per file keeps up

    def backend_for(self, job: Job) -> Backend:
        """The chosen tool, except for files it cannot fetch: both tools open every file with
        one plain GET (aria2c's first connection never sends Range, even when resuming with its
        control file), which the CDN refuses above max_single_get; and files that need the
        token (tools.tool_link says which), which never leaves this process."""
        if self.tool is self.ranged:
            return self.tool
        if job.needs_ranges:
            self.log.warning("%s is bigger than %s: %s cannot fetch it in ranged requests only, "
                             "so the python backend fetches it in parts", job.file.path,
                             format_size(job.max_single_get), self.tool.name)
            return self.ranged
        with contextlib.suppress(FetchError):    # else the tool's own attempt meets it again
            if self.links is None:
                self.links = link_pool(self.opts.stall_timeout)
            job.link = tool_link(self.links, job) if job.token else ""
            if job.link is None:
                self.token_files += 1            # for one log line: a lost count is harmless
                return self.ranged
        return self.tool


def make_job(run: Run, f: RemoteFile) -> Job:
    final = safe_target(run.local_dir, f.path)
    meta = run.tracker.meta
    start, most = ((run.opts.connections, 0) if run.opts.connections
                   else auto_connections(f.size, run.big_at_once))
    return Job(file=f, final=final, partial=Partial(run.local_dir, f.path, f.expected_hash),
               url=file_url(run.endpoint, meta["repo_id"], meta["repo_type"], meta["commit"], f.path),
               token=run.token, endpoint=run.endpoint, connections=start,
               max_single_get=run.opts.max_single_get, most_connections=most,
               probe=run.probe if most else None)


def prepare_partial(job: Job, backend: Backend) -> None:
    """Keep a partial (of this version: its name says so) only if this backend can continue it."""
    if job.partial.kind() not in backend.resumable:
        job.partial.discard()


def finish_file(job: Job, digest: str | None) -> None:
    """Check the partial against the listing, then give it its final name."""
    f = job.file
    check = check_file(job.partial.path, f, digest=digest)
    if check.verdict in ("missing", "size mismatch"):
        size = -1 if check.size is None else check.size
        raise FetchError(f"size mismatch: {size} bytes, expected {f.size}",
                         FailureKind.BAD_PARTIAL if size > f.size else FailureKind.TRANSIENT)
    if check.verdict != "ok":
        raise FetchError(f"{f.hash_kind} mismatch: got {str(check.digest)[:12]}..., expected "
                         f"{f.expected_hash[:12]}...", FailureKind.BAD_PARTIAL)
    if job.partial.blob is not None:      # hub cache: the blob, then the snapshot's link to it
        job.partial.promote_to(job.partial.blob)
        hf_cache.link_blob(job.partial.blob, job.final)
    else:
        job.partial.promote_to(job.final)


def blob_ready(job: Job) -> bool:
    """Hub cache, under the blob lock: is the blob already whole (another program or task
    finished it meanwhile)? Then it is checked, linked into the snapshot, our partial removed."""
    blob, f = job.partial.blob, job.file
    if blob is None or not blob.is_file() or blob.stat().st_size != f.size:
        return False
    if check_file(blob, f).verdict != "ok":
        return False                  # fetched again: the new bytes replace it
    hf_cache.link_blob(blob, job.final)
    job.partial.discard()
    return True


def _attempt(run: Run, backend: Backend, job: Job) -> FetchError | None:
    """One try at a file: fetch, check, promote. A full disk anywhere is DISK_FULL."""
    try:
        # again each try: on a folder shared with other processes, one finishing may have
        # tidied away the (then empty) partial folder since the last one
        job.partial.prepare()
        digest = backend.fetch(job, lambda n: run.progress.update(job.file.path, n),
                               run.stopper.event)
        finish_file(job, digest)
    except FetchError as exc:
        return exc
    except UnsafePathError as exc:
        return FetchError(str(exc), FailureKind.DENIED)
    except OSError as exc:
        if exc.errno not in FULL_DISK_ERRNOS:
            raise
        return FetchError(str(exc), FailureKind.DISK_FULL)
    return None


def _refuse_file(run: Run, f: RemoteFile, why: str) -> None:
    """A file that cannot be written safely: it fails with the reason, the rest go on."""
    run.progress.file_started(f.path, 0)
    run.tracker.start(f.path)
    run.tracker.attempt_failed(f.path, why, final=True)
    run.log.warning("%s: %s", printable(f.path), why)
    run.failures.append((f.path, why))
    run.progress.file_done(f.path, f.size, False, f"failed: {printable(f.path)}: {why}")


def download_one(run: Run, f: RemoteFile) -> None:
    """All attempts for one file; records each failure on the file. In the hub cache, under
    the blob's lock (a run stopped while another program holds it leaves the file pending)."""
    with contextlib.ExitStack() as held:
        try:
            job = make_job(run, f)
            job.final.parent.mkdir(parents=True, exist_ok=True)
            safe_target(run.local_dir, f.path)    # nothing swapped in while making the folders
            if not held.enter_context(hf_cache.blob_lock(job.partial, run.stopper.event,
                                                         run.log)):
                return
            job.partial.prepare()
            job.partial.adopt_leftover()          # under the blob lock: no one writes it now
        except (UnsafePathError, NotADirectoryError, FileExistsError) as exc:
            _refuse_file(run, f, str(exc) if isinstance(exc, UnsafePathError)
                         else f"a parent folder of {printable(f.path)} is a file")
            return
        if blob_ready(job):
            run.progress.file_started(f.path, 0, f.size)
            run.tracker.start(f.path)
            run.tracker.complete(f.path, f.size)
            run.log.info("done: %s (its blob was already in the cache)", printable(f.path))
            run.progress.file_done(f.path, f.size, True, "")
            return
        _download_attempts(run, f, job)


def _download_attempts(run: Run, f: RemoteFile, job: Job) -> None:
    tracker, stop = run.tracker, run.stopper.event
    backend = run.backend_for(job)
    prepare_partial(job, backend)
    run.progress.file_started(f.path, job.partial.bytes_on_disk(), f.size)
    tracker.start(f.path)
    attempts = int(tracker.status[f.path].get("attempts") or 0)
    tries = 0
    while True:
        run.gate.wait(stop)
        if stop.is_set():
            break
        tries += 1
        error = _attempt(run, backend, job)
        if error is None:
            tracker.complete(f.path, f.size)
            run.log.info("done: %s (%s)", printable(f.path), format_size(f.size))    # with -v
            run.progress.file_done(f.path, f.size, True, "")
            return
        action = ON_FAILURE[error.kind]
        if stop.is_set() or action is Action.PAUSE:
            break
        if action is Action.STOP_RUN:
            run.stopper.stop(StopReason.DISK_FULL, str(error))
            break
        if action is Action.DISCARD:
            job.partial.discard()
        if action is Action.WAIT:
            run.gate.close_for(error.retry_after or 5.0, run.opts.max_retry_wait, run.log)
        final = action is Action.GIVE_UP or tries > run.opts.retries
        tracker.attempt_failed(f.path, str(error), final=final)
        run.progress.update(f.path, job.partial.bytes_on_disk())
        if final:       # always shown (a warning); a retried attempt only with -v
            run.log.warning("failed: %s: %s (attempt %d)", printable(f.path), error,
                            attempts + tries)
            run.failures.append((f.path, str(error)))
            run.progress.file_done(f.path, f.size, False, "")
            return
        run.log.info("%s: attempt %d failed: %s; trying again", printable(f.path), attempts + tries,
                     error)
        _backoff(run.opts.retry_base, tries, stop)
    tracker.interrupted(f.path)
    run.progress.file_dropped(f.path, job.partial.bytes_on_disk())


def _backoff(base: float, tries: int, stop: threading.Event) -> None:
    delay = min(60.0, base * 2 ** (tries - 1))
    stop.wait(delay * random.uniform(0.5, 1.5))


def run_downloads(tracker: FileTracker, paths_todo: list[str], *, local_dir: Path, endpoint: str,
                  token: str | None, opts: Options, tool: str, stopper: Stopper,
                  log: logging.Logger, stream: TextIO, quiet: bool = False,
                  on_tick: Callable[[], None] | None = None,
                  scope: list[str] | None = None, live: Path | None = None) -> RunResult:
    """Download the given files of a task with -j workers; returns when all are done or stopped.
    The progress counts `scope` (the whole task or batch; default: the files to fetch): its
    files not being fetched count as done, so a resumed run shows 8/13 files, not 0/5, and the
    partial bytes of the files to fetch count as done too. `live`: the status file to publish."""
    started = time.monotonic()
    opts = resolved(opts, [tracker.by_path[p].size for p in paths_todo])
    children = ChildSet()
    chosen = BACKENDS[tool](opts, children)
    ranged = chosen if tool == "python" else BACKENDS["python"](opts, children)
    fetching = set(paths_todo)
    done = [p for p in (scope or paths_todo) if p not in fetching]
    done_bytes = sum(tracker.by_path[p].size for p in done)
    total_bytes = done_bytes + sum(tracker.by_path[p].size for p in paths_todo)
    progress = Progress(len(done) + len(paths_todo), total_bytes, len(done), done_bytes, stream,
                        opts.progress_interval, quiet, kept=partial_bytes(tracker, local_dir,
                                                                          paths_todo))
    publisher = live_publisher(live, tracker, progress, scope or paths_todo)
    run = Run(tracker, local_dir, endpoint, token, opts, chosen, ranged, progress, stopper, log)
    run.big_at_once = min(opts.jobs, sum(tracker.by_path[p].size >= RANGED_FROM
                                         for p in paths_todo))
    if not opts.connections and run.big_at_once:
        run.probe = LinkProbe(ONE_IS_ENOUGH * hash_speed(), lambda: progress.fetched)
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
        chosen.open()
    threads = [threading.Thread(target=worker, name=f"worker-{i}", daemon=True)
               for i in range(max(1, min(opts.jobs, len(paths_todo))))]
    for t in threads:
        t.start()
    logged = time.monotonic()
    said: tuple[bool, bool] = (False, False)    # the probe's verdict, as last logged
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.25 / len(threads))
            progress.tick()
            if run.probe and (run.probe.judged, run.probe.capped) != said:
                said = (run.probe.judged, run.probe.capped)
                log.info("%s", probe_text(run.probe))
            if time.monotonic() - logged >= opts.log_interval:    # the log is never silent
                logged = time.monotonic()
                log.info("%s", progress.line())
            if publisher:
                publisher.tick()
            _save_or_pause(tracker.maybe_save, stopper, log)
            if on_tick:
                _save_or_pause(on_tick, stopper, log)     # it writes tasks.json
            if stopper.event.is_set():
                children.kill_all()
                _join_for(threads, 5.0)
                break
    finally:
        if stopper.event.is_set():
            children.kill_all()     # SIGTERM first: aria2c saves its control files on TERM
        for backend in {id(chosen): chosen, id(ranged): ranged}.values():
            backend.close()         # always: a stopped run must not leave temp folders behind
        children.kill_all()
        if not any(t.is_alive() for t in threads):
            Partial.tidy(local_dir)
        progress.tick(force=True)
        progress.close()
        if publisher:
            publisher.close()
        for p in tracker.paths_in(FileState.DOWNLOADING):
            tracker.interrupted(p)
        _save_or_pause(tracker.save, stopper, log)
    if run.token_files:
        log.info("%d files that need the token went through python: %s never sees the token",
                 run.token_files, chosen.name)
    after = tracker.summary()
    result = RunResult(status=TaskState.PENDING, tool=tool, files_total=after["files_total"],
                       files_done=after["files_done"], files_failed=after["files_failed"],
                       bytes_done=after["bytes_done"], bytes_fetched=progress.fetched,
                       elapsed=time.monotonic() - started, failures=run.failures)
    return result


def partial_bytes(tracker: FileTracker, local_dir: Path, paths: list[str]) -> dict[str, int]:
    """The bytes already in the partials of `paths` (one stat each), by path."""
    return Partial.bytes_of(local_dir, ((p, tracker.by_path[p].expected_hash) for p in paths))


def live_publisher(path: Path | None, tracker: FileTracker, progress: Progress,
                   scope: list[str]) -> LivePublisher | None:
    """The status file's writer; the task's completed files outside the scope count too."""
    if path is None:
        return None
    inside = set(scope)
    outside = [f for f in tracker.files if f.path not in inside
               and tracker.state(f.path) == FileState.COMPLETED.value]
    summary = tracker.summary()
    return LivePublisher(path, progress.snapshot, pid=os.getpid(),
                         base_bytes=sum(f.size for f in outside), base_files=len(outside),
                         task_bytes=summary["bytes_total"], task_files=summary["files_total"])


def _save_or_pause(save: Callable[[], object], stopper: Stopper, log: logging.Logger) -> bool:
    """Save the state; a full disk (ENOSPC) stops the run as disk_full instead of crashing it.
    The atomic writer leaves the previous file intact, and resume rebuilds from the disk."""
    try:
        save()
        return True
    except OSError as exc:
        if exc.errno not in FULL_DISK_ERRNOS:
            raise
        log.warning("cannot save the task state: %s", exc.strerror)
        stopper.stop(StopReason.DISK_FULL, "no space left to save the task state")
        return False


def _join_for(threads: list[threading.Thread], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
