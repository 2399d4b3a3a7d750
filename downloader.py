"""Running a task: find or create it (`download`) or open it (`resume`) under its lock, bring
it to the listed commit, plan the work from what is on disk, run it under the signal handlers
and the disk guard, and record the outcome. fetcher.py fetches the files themselves.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from fetcher import (Options, RunResult, Stopper, _save_or_pause,  # noqa: F401 (re-exported)
                     run_downloads)
import hf_cache
from file_tracker import FileState, FileTracker, SyncReport, adopt_finished, forget_missing
from task_manager import StopReason, Task, TaskState, TaskStore
from tools import choose_tool
from utils import Partial, format_size, safe_join, safe_target

if TYPE_CHECKING:
    from config import Config
    from dataset_manager import Listing


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
        needed += max(0, f.size - Partial(local_dir, f.path, f.expected_hash).bytes_on_disk())
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
    cache = hf_cache.is_snapshot(local_dir)
    if cache:      # a blob already in the cache is linked here, then checked by the adoption
        hf_cache.link_snapshot(tracker.files, set(tracker.paths_in(FileState.COMPLETED)),
                               local_dir, log)
    work = plan_work(tracker, local_dir, todo)
    if cache:
        hf_cache.unlink_unchecked(local_dir, work.todo)
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
        fetch = hf_cache.one_per_blob(tracker.by_path, work.todo) if cache else work.todo
        if fetch:
            result = run_downloads(tracker, fetch, local_dir=local_dir, endpoint=endpoint,
                                   token=token, opts=opts, tool=tool, stopper=stopper, log=log,
                                   stream=stream, quiet=quiet,
                                   on_tick=TaskTicker(store, task.id, tracker, stopper),
                                   scope=[f.path for f in tracker.files] if todo is None else todo)
        if cache:      # the files fetched become blobs; the ones sharing them are linked too
            hf_cache.link_snapshot(tracker.files, set(tracker.paths_in(FileState.COMPLETED)),
                                   local_dir, log)
            adopt_finished(tracker, local_dir, [p for p in work.todo if p not in set(fetch)])
        else:          # what `hf download --local-dir` keeps, so it finds these files current
            hf_cache.record_local_metadata(local_dir, tracker.folder, tracker.meta["commit"],
                                           tracker.by_path, tracker.paths_in(FileState.COMPLETED),
                                           work.todo, log)
    result = finish_task(store, task, tracker, result, stopper, log)
    if cache and result.status is TaskState.COMPLETED and task.revision:
        hf_cache.write_ref(local_dir, task.revision, tracker.meta["commit"], log)
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
            partial = Partial(local_dir, path, old_hash)
        except ValueError:
            continue
        partial.discard()


def prune_removed(local_dir: Path, removed: list[str]) -> list[str]:
    """Delete local files that the new commit removed (only with --prune)."""
    gone = []
    for path in removed:
        with contextlib.suppress(ValueError, FileNotFoundError):
            safe_target(local_dir, path).unlink()
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
