"""Running a task: the work list, the choice of backend per file, retries, progress, and
moving each checked file into place. Moving a file's bytes is transfer.py's and tools.py's job.

Each file goes: pending -> downloading (bytes in its Partial) -> checked (size, hash)
-> renamed to its final name -> completed. A final name never holds partial bytes.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from dataset_manager import RemoteFile, file_url
from hub_http import capped_wait
from file_tracker import (FileState, FileTracker, SyncReport, adopt_finished, check_file,
                          forget_missing)
from progress import Progress
from task_manager import StopReason, Task, TaskState, TaskStore
from tools import (Aria2Backend, ChildSet, WgetBackend, choose_tool,  # main: downloader.choose_tool
                   tool_link)
from transfer import (FULL_DISK_ERRNOS, Backend, FailureKind, FetchError, HttpSessions, Job,
                      PythonBackend)
from utils import Partial, format_size, safe_join

if TYPE_CHECKING:
    from config import Config
    from dataset_manager import Listing


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
    sessions: HttpSessions = field(default_factory=HttpSessions)
    token_files: int = 0           # files sent to python because they need the token

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
            job.link = tool_link(self.sessions, job, self.opts.stall_timeout) if job.token else ""
            if job.link is None:
                self.token_files += 1            # for one log line: a lost count is harmless
                return self.ranged
        return self.tool


def make_job(run: Run, f: RemoteFile) -> Job:
    final = safe_join(run.local_dir, f.path)
    meta = run.tracker.meta
    return Job(file=f, final=final, partial=Partial(final, f.expected_hash),
               url=file_url(run.endpoint, meta["repo_id"], meta["repo_type"], meta["commit"], f.path),
               token=run.token, endpoint=run.endpoint, connections=run.opts.connections,
               max_single_get=run.opts.max_single_get)


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
    job.partial.promote_to(job.final)


def _attempt(run: Run, backend: Backend, job: Job) -> FetchError | None:
    """One try at a file: fetch, check, promote. A full disk anywhere is DISK_FULL."""
    try:
        digest = backend.fetch(job, lambda n: run.progress.update(job.file.path, n),
                               run.stopper.event)
        finish_file(job, digest)
    except FetchError as exc:
        return exc
    except OSError as exc:
        if exc.errno not in FULL_DISK_ERRNOS:
            raise
        return FetchError(str(exc), FailureKind.DISK_FULL)
    return None


def download_one(run: Run, f: RemoteFile) -> None:
    """All attempts for one file; records each failure on the file."""
    tracker, stop = run.tracker, run.stopper.event
    job = make_job(run, f)
    job.final.parent.mkdir(parents=True, exist_ok=True)
    backend = run.backend_for(job)
    prepare_partial(job, backend)
    run.progress.file_started(f.path, job.partial.bytes_on_disk())
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
            run.log.info("completed %s (%d bytes)", f.path, f.size)
            run.progress.file_done(f.path, f.size, True, f"done: {f.path} ({format_size(f.size)})")
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
        run.log.warning("%s: attempt %d failed: %s", f.path, attempts + tries, error)
        run.progress.update(f.path, job.partial.bytes_on_disk())
        if final:
            run.failures.append((f.path, str(error)))
            run.progress.file_done(f.path, f.size, False, f"failed: {f.path}: {error}")
            return
        _backoff(run.opts.retry_base, tries, stop)
    tracker.interrupted(f.path)
    run.progress.file_dropped(f.path)


def _backoff(base: float, tries: int, stop: threading.Event) -> None:
    delay = min(60.0, base * 2 ** (tries - 1))
    stop.wait(delay * random.uniform(0.5, 1.5))


def run_downloads(tracker: FileTracker, paths_todo: list[str], *, local_dir: Path, endpoint: str,
                  token: str | None, opts: Options, tool: str, stopper: Stopper,
                  log: logging.Logger, stream: TextIO, quiet: bool = False,
                  on_tick: Callable[[], None] | None = None) -> RunResult:
    """Download the given files of a task with -j workers; returns when all are done or stopped."""
    started = time.monotonic()
    children = ChildSet()
    chosen = BACKENDS[tool](opts, children)
    ranged = chosen if tool == "python" else BACKENDS["python"](opts, children)
    todo_bytes = sum(tracker.by_path[p].size for p in paths_todo)
    progress = Progress(len(paths_todo), todo_bytes, 0, 0, stream, opts.progress_interval, quiet)
    run = Run(tracker, local_dir, endpoint, token, opts, chosen, ranged, progress, stopper, log)
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
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.25 / len(threads))
            progress.tick()
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
        progress.tick(force=True)
        progress.close()
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


# ================================================================ running a task

_STOP_EXIT = {StopReason.INTERRUPTED: TaskState.PAUSED, StopReason.TERMINATED: TaskState.PAUSED,
              StopReason.DISK_FULL: TaskState.PAUSED, StopReason.CANCELLED: TaskState.CANCELLED}


@contextlib.contextmanager
def stop_signals(stopper: Stopper):
    """Ctrl-C and SIGTERM stop the run cleanly (tools ended, state saved) instead of raising."""
    handlers = {signal.SIGINT: StopReason.INTERRUPTED, signal.SIGTERM: StopReason.TERMINATED}
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
        needed += max(0, f.size - Partial(final, f.expected_hash).bytes_on_disk())
    return needed


@dataclass(frozen=True)
class WorkList:
    """What a run fetches, once the recorded states match the disk."""
    todo: list[str]
    adopted: int          # found complete at their final path: recorded without a download
    missing: int          # recorded complete but gone from the disk: fetched again


def plan_work(tracker: FileTracker, local_dir: Path, todo: list[str] | None) -> WorkList:
    """The files to fetch: the unfinished ones (or those of `todo`), after adopting files found
    complete on disk and, for a whole task, forgetting completed files that are gone."""
    unfinished = tracker.paths_in(FileState.PENDING, FileState.DOWNLOADING, FileState.FAILED)
    if todo is not None:
        wanted = set(todo)
        unfinished = [p for p in unfinished if p in wanted]
    adopted = adopt_finished(tracker, local_dir, unfinished)
    missing = 0
    if todo is None:
        missing = forget_missing(tracker, local_dir)
        todo = tracker.paths_in(FileState.PENDING, FileState.DOWNLOADING, FileState.FAILED)
    else:       # a batch: its other files live on other disks, absent is expected
        todo = [p for p in todo if tracker.status[p]["status"] != FileState.COMPLETED.value]
    return WorkList(todo, adopted, missing)


class TaskTicker:
    """Runs between progress ticks: polls the cancel flag, and keeps the counters in tasks.json
    fresh for `status` in another terminal (at most every `every` seconds, only on change)."""

    def __init__(self, store: TaskStore, task_id: str, tracker: FileTracker, stopper: Stopper, *,
                 every: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.task_id, self.tracker, self.stopper = store, task_id, tracker, stopper
        self.every, self.clock = every, clock
        self._last = clock()
        self._summary = tracker.summary()

    def __call__(self) -> None:
        if self.store.cancel_requested(self.task_id):
            self.stopper.stop(StopReason.CANCELLED)
        now = self.clock()
        if now - self._last >= self.every:
            summary = self.tracker.summary()
            if summary != self._summary:
                self.store.update(self.task_id, **summary)
            self._last, self._summary = now, summary


def run_task(store: TaskStore, task: Task, tracker: FileTracker, *, endpoint: str,
             token: str | None, opts: Options, reserve: int, log: logging.Logger,
             stream: TextIO, quiet: bool = False, todo: list[str] | None = None,
             local_dir: Path | None = None,
             before_start: Callable[[], None] | None = None) -> RunResult:
    """Run the unfinished files of a task (or of `todo` only) and record the outcome.
    Internal: its callers (download_repo, resume, batch_manager.run_batch) hold the task lock.

    `before_start` runs after the preflight, before the first byte (a batch writes its disk
    marker there)."""
    import system_monitor
    tool = choose_tool(opts.tool)
    local_dir = Path(local_dir or task.local_dir)
    work = plan_work(tracker, local_dir, todo)
    if work.adopted:
        log.info("%s: %d files found complete on disk", task.id, work.adopted)
    if work.missing:
        log.warning("%s: %d completed files are no longer on disk; fetching them again",
                    task.id, work.missing)
    for path in work.todo:           # a new run gives failed files a fresh set of tries
        if tracker.status[path]["status"] == FileState.FAILED.value:
            tracker.reset(path, tracker.status[path].get("error"))
    store.clear_cancel(task.id)
    if work.todo:
        system_monitor.preflight(local_dir, reserve=reserve,
                                 needed=bytes_still_needed(tracker, local_dir, work.todo))
    if before_start:
        before_start()
    stopper = Stopper()
    store.update(task.id, status=TaskState.RUNNING, reason="", tool=tool, pid=os.getpid(),
                 endpoint=endpoint, **tracker.summary())
    log.info("%s: %s %s@%s, %d files to fetch with %s (-x %d -j %d)", task.id,
             task.repo_type, task.repo_id, tracker.meta["commit"], len(work.todo), tool,
             opts.connections, opts.jobs)

    def on_low(usage: system_monitor.DiskUsage) -> None:
        stopper.stop(StopReason.DISK_FULL, f"{format_size(usage.free)} free, "
                                  f"{format_size(reserve)} kept in reserve")

    result = RunResult(status=TaskState.COMPLETED, tool=tool)
    with stop_signals(stopper), system_monitor.DiskGuard(local_dir, reserve, interval=2.0,
                                                         on_low=on_low):
        if work.todo:
            result = run_downloads(tracker, work.todo, local_dir=local_dir, endpoint=endpoint,
                                   token=token, opts=opts, tool=tool, stopper=stopper, log=log,
                                   stream=stream, quiet=quiet,
                                   on_tick=TaskTicker(store, task.id, tracker, stopper))
    result = finish_task(store, task, tracker, result, stopper, log)
    result.bytes_missing = bytes_still_needed(tracker, local_dir, tracker.paths_in(
        FileState.PENDING, FileState.DOWNLOADING, FileState.FAILED))
    return result


def finish_task(store: TaskStore, task: Task, tracker: FileTracker, result: RunResult,
                stopper: Stopper, log: logging.Logger) -> RunResult:
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
        result.status = TaskState.FAILED
        result.reason = f"{result.files_failed} of {result.files_total} files failed"
    else:
        result.status = TaskState.COMPLETED
    store.clear_cancel(task.id)
    _save_or_pause(lambda: store.update(
        task.id, status=result.status, reason=result.reason, pid=None,
        finished_at=(time.strftime("%Y-%m-%dT%H:%M:%S%z")
                     if result.status is not TaskState.PAUSED else None),
        **summary), stopper, log)
    log.info("%s: %s %s (%d/%d files, %d bytes fetched in %.1f s)", task.id, result.status.value,
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

    def identity(self) -> dict[str, Any]:
        return {"kind": "download", "repo_id": self.repo_id, "repo_type": self.repo_type,
                "revision": self.revision, "local_dir": str(self.local_dir),
                "include": list(self.include), "exclude": list(self.exclude)}


@dataclass
class DownloadOutcome:
    task: Task
    result: RunResult
    sync: SyncReport | None = None        # when the commit moved
    pruned: list[str] = field(default_factory=list)
    resumed: bool = False


def open_task(store: TaskStore, req: DownloadRequest, listing: Listing,
              endpoint: str) -> tuple[Task, FileTracker, SyncReport | None]:
    """Find the task of the same download (resume it, syncing to a new commit) or create one.
    Internal to download_repo, which holds the lock of an existing task around it;
    returns (task, tracker, sync report)."""
    existing = store.find(req.identity())
    if existing is None:
        task = store.create({**req.identity(), "commit": listing.commit,
                             "files_total": len(listing.files), "bytes_total": listing.total_size})
        tracker = FileTracker.create(store.folder(task.id), task.id, listing, endpoint)
        return task, tracker, None
    tracker = FileTracker.load(store.folder(existing.id), existing.id)
    sync = None
    if tracker.meta["commit"] != listing.commit:
        sync = tracker.sync(listing, endpoint)
        summary = tracker.summary()
        # Until it runs (it may yet be refused for space), the record must not say "completed"
        # for a commit whose new files are missing.
        behind = summary["files_done"] < summary["files_total"] and \
            existing.status is TaskState.COMPLETED
        existing = store.update(existing.id, commit=listing.commit, **summary,
                                **({"status": TaskState.PAUSED,
                                    "reason": "new commit: files to fetch"} if behind else {}))
    return existing, tracker, sync


def drop_old_partials(local_dir: Path, old_versions: dict[str, str]) -> None:
    """Partial bytes of versions the new commit replaced can never complete: remove them."""
    for path, old_hash in old_versions.items():
        try:
            partial = Partial(safe_join(local_dir, path), old_hash)
        except ValueError:
            continue
        partial.discard()


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


def download_repo(store: TaskStore, req: DownloadRequest, listing: Listing, *, endpoint: str,
                  token: str | None, opts: Options, reserve: int, log: logging.Logger,
                  stream: TextIO, quiet: bool = False) -> DownloadOutcome:
    """`download REPO`: find or create the task, take its lock, sync, run.

    Find-or-create and taking the task's lock happen under the store's creation lock: of two
    processes started together, one creates the task and the other finds it held (exit 6),
    or finished."""
    with contextlib.ExitStack() as held:
        with store.creation_lock():
            existing = store.find(req.identity())
            if existing is None:
                # Refuse before creating anything: no task, no folder, no file.
                import system_monitor
                system_monitor.preflight(req.local_dir, reserve=reserve,
                                         needed=_needed_for_new(req.local_dir, listing))
                task, tracker, sync = open_task(store, req, listing, endpoint)
                lock_id = task.id
            else:
                lock_id = existing.id
            held.enter_context(store.lock(lock_id))
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
        tracker = FileTracker.load(store.folder(task_id), task_id)
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
                   progress_interval=cfg.get("progress_interval"),
                   max_retry_wait=cfg.get("max_retry_wait"))
