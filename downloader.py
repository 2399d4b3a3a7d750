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

import hf_cache
from fetcher import (Options, RunResult, Stopper, _save_or_pause,  # noqa: F401 (re-exported)
                     run_downloads, settings_text)
from file_tracker import (FileState, FileTracker, PruneReport, SyncReport, adopt_finished,
                          forget_missing, prune_removed)
from progress import live_path
from task_manager import StopReason, Task, TaskState, TaskStore, log_as
from tools import choose_tool
from partial import Partial
from utils import format_size, safe_join

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
    files = [tracker.by_path[path] for path in todo]
    have = Partial.bytes_of(local_dir, ((f.path, f.expected_hash) for f in files))
    return sum(max(0, f.size - have.get(f.path, 0)) for f in files)


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
        todo = [p for p in todo if tracker.state(p) != FileState.COMPLETED.value]
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
             before_start: Callable[[], None] | None = None,
             remember: tuple[str, dict[str, Any]] | None = None) -> RunResult:
    """Run the unfinished files of a task (or of `todo` only) and record the outcome.
    Internal: its callers (download_repo, resume, batch_manager.run_batch) hold the task lock.

    `before_start` runs after the preflight, before the first byte (a batch writes its disk
    marker there). Every log line meanwhile names the task. `remember` is (command, flags
    given): the task keeps them for later runs."""
    with log_as(task.id):
        return _run_task(store, task, tracker, endpoint=endpoint, token=token, opts=opts,
                         reserve=reserve, log=log, stream=stream, quiet=quiet, todo=todo,
                         local_dir=local_dir, before_start=before_start, remember=remember)


def _run_task(store: TaskStore, task: Task, tracker: FileTracker, *, endpoint: str,
              token: str | None, opts: Options, reserve: int, log: logging.Logger,
              stream: TextIO, quiet: bool, todo: list[str] | None, local_dir: Path | None,
              before_start: Callable[[], None] | None,
              remember: tuple[str, dict[str, Any]] | None) -> RunResult:
    import system_monitor
    if remember and any(v is not None for v in remember[1].values()):
        store.update(task.id, options=remembered_options(store.get(task.id), remember[1],
                                                         remember[0]))
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
        log.info("%d files found complete on disk", work.adopted)
    if work.missing:
        log.warning("%d completed files are no longer on disk; fetching them again",
                    work.missing)
    for path in work.todo:           # a new run gives failed files a fresh set of tries
        if tracker.state(path) == FileState.FAILED.value:
            tracker.reset(path, tracker.status[path].get("error"))
    store.clear_cancel(task.id)
    # The reserve guards bytes still to write: a run with none (a complete task on a nearly full
    # disk) is neither refused nor stopped by the guard.
    needed = bytes_still_needed(tracker, local_dir, work.todo)
    if needed:
        system_monitor.preflight(local_dir, reserve=reserve, needed=needed)
    if before_start:
        before_start()
    stopper = Stopper()
    store.update(task.id, status=TaskState.RUNNING, reason="", tool=tool, pid=os.getpid(),
                 endpoint=endpoint, **tracker.summary())
    log.info("%s %s@%s, %d files to fetch with %s (%s)",
             task.repo_type, task.repo_id, tracker.meta["commit"], len(work.todo), tool,
             settings_text(tool, opts, [tracker.by_path[p].size for p in work.todo]))

    def on_low(usage: system_monitor.DiskUsage) -> None:
        stopper.stop(StopReason.DISK_FULL, f"{format_size(usage.free)} free, "
                                  f"{format_size(reserve)} kept in reserve")

    result = RunResult(status=TaskState.COMPLETED, tool=tool, already_complete=not work.todo)
    guard = (system_monitor.DiskGuard(local_dir, reserve, interval=2.0, on_low=on_low) if needed
             else contextlib.nullcontext())
    with stop_signals(stopper), guard:
        fetch = hf_cache.one_per_blob(tracker.by_path, work.todo) if cache else work.todo
        if fetch:
            result = run_downloads(tracker, fetch, local_dir=local_dir, endpoint=endpoint,
                                   token=token, opts=opts, tool=tool, stopper=stopper, log=log,
                                   stream=stream, quiet=quiet,
                                   on_tick=TaskTicker(store, task.id, tracker, stopper),
                                   live=live_path(store.folder(task.id)),
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
    # the bytes kept in partials are done bytes too (never fetched again): a stopped run's
    # summary shows what is on disk, as its last progress line did
    summary = tracker.summary()
    result.bytes_done += max(0, summary["bytes_total"] - summary["bytes_done"]
                             - result.bytes_missing)
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
    log.info("%s %s (%d/%d files, %d bytes fetched in %.1f s)", result.status.value,
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

    def find(self, store: TaskStore) -> Task | None:
        """The task of the same download. In the hub cache the folder is the commit's snapshot:
        the task of a sibling snapshot (the branch moved since) is the same download too."""
        if not hf_cache.is_snapshot(self.local_dir):
            return store.find(self.identity())
        same = {k: v for k, v in self.identity().items() if k != "local_dir"}
        snapshots = str(Path(self.local_dir).parent)
        found = [t for t in store.all().values() if t.matches(same)
                 and str(Path(t.local_dir).parent) == snapshots]
        return max(found, key=lambda t: t.id) if found else None


@dataclass
class DownloadOutcome:
    task: Task
    result: RunResult
    sync: SyncReport | None = None        # when the commit moved
    pruned: list[str] = field(default_factory=list)
    resumed: bool = False
    kept: dict[str, str] = field(default_factory=dict)    # --prune did not delete: path -> why
    prunable: list[str] = field(default_factory=list)     # removed upstream, still here


def open_task(store: TaskStore, req: DownloadRequest, listing: Listing,
              endpoint: str) -> tuple[Task, FileTracker, SyncReport | None]:
    """Find the task of the same download (resume it, syncing to a new commit) or create one.
    Internal to download_repo, which holds the lock of an existing task around it;
    returns (task, tracker, sync report)."""
    existing = req.find(store)
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
        moved = {"local_dir": str(req.local_dir)} if hf_cache.is_snapshot(req.local_dir) else {}
        existing = store.update(existing.id, commit=listing.commit, **summary, **moved,
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
                  stream: TextIO, quiet: bool = False,
                  remember: tuple[str, dict[str, Any]] | None = None) -> DownloadOutcome:
    """`download REPO`: find or create the task, take its lock, sync, run.

    Find-or-create and taking the task's lock happen under the store's creation lock: of two
    processes started together, one creates the task and the other finds it held (exit 6),
    or finished."""
    with contextlib.ExitStack() as held:
        with store.creation_lock():
            existing = req.find(store)
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
        held.enter_context(log_as(lock_id))
        if existing is not None:
            task, tracker, sync = open_task(store, req, listing, endpoint)
        if sync:
            drop_old_partials(req.local_dir, sync.old_versions)
        pruned = PruneReport([], {})
        if req.prune:
            pruned = prune_removed(tracker, req.local_dir)
            tracker.write_list(endpoint)
            for path in pruned.deleted:
                log.info("%s: pruned %s (removed upstream)", task.id, path)
        prunable = [f.path for f in tracker.removed()]
        result = run_task(store, task, tracker, endpoint=endpoint, token=token, opts=opts,
                          reserve=reserve, log=log, stream=stream, quiet=quiet,
                          remember=remember)
    return DownloadOutcome(store.get(lock_id), result, sync, pruned.deleted, existing is not None,
                           pruned.kept, prunable)


# ================================================================ resume and options

def resume_task(store: TaskStore, task_id: str, *, endpoint: str, token: str | None,
                opts: Options, reserve: int, log: logging.Logger, stream: TextIO,
                quiet: bool = False,
                on_start: Callable[[str, list[int]], None] | None = None) -> DownloadOutcome:
    """`resume TASK`: take the task's lock, load its files and run the unfinished ones.

    `on_start` gets the pinned commit and the file sizes once the lock is held, before any
    preflight."""
    with store.lock(task_id), log_as(task_id):
        task = store.get(task_id)
        tracker = FileTracker.load(store.folder(task_id), task_id)
        if on_start is not None:
            on_start(tracker.meta["commit"], [f.size for f in tracker.files])
        result = run_task(store, task, tracker, endpoint=endpoint, token=token, opts=opts,
                          reserve=reserve, log=log, stream=stream, quiet=quiet)
    return DownloadOutcome(store.get(task_id), result, resumed=True)


# Defaults of the run flags that have no setting in config (tool and reserve have: HFDL_TOOL,
# HFDL_DISK_RESERVE). argparse leaves them None, so a task can tell a flag given from a default.
# connections and jobs 0: chosen by the run (fetcher.auto_connections, fetcher.auto_jobs).
RUN_DEFAULTS: dict[str, Any] = {"connections": 0, "jobs": 0, "retries": 5, "stall_timeout": 60.0}
# The flags a task remembers (Task.options), in the order they are shown.
RUN_FLAGS = ("tool", "connections", "jobs", "retries", "stall_timeout", "reserve")
_TOOLS = ("auto", "aria2c", "wget", "python")


def options_from_config(cfg: Config, *, tool: str | None = None, connections: int | None = None,
                        jobs: int | None = None, retries: int | None = None,
                        stall_timeout: float | None = None) -> Options:
    """The run's options: the per-command flags (None: not given, the default applies) plus the
    settings that live in config."""
    given = {"connections": connections, "jobs": jobs, "retries": retries,
             "stall_timeout": stall_timeout}
    flags: dict[str, Any] = {k: RUN_DEFAULTS[k] if v is None else v for k, v in given.items()}
    return Options(tool=tool or cfg.get("tool"), retry_base=cfg.get("retry_base_delay"),
                   max_single_get=cfg.get("max_single_get"),
                   progress_interval=cfg.get("progress_interval"),
                   log_interval=60 * cfg.get("log_interval"),
                   max_retry_wait=cfg.get("max_retry_wait"), **flags)


@dataclass(frozen=True)
class RunSettings:
    """What a run uses: the flags given now over the ones the task remembers, over config."""
    opts: Options
    reserve: int
    remembered: dict[str, Any]        # the task's options used (not overridden now)
    remembered_from: str              # the command that gave them


def remembered_flags(task: Task | None, overridden: frozenset[str] = frozenset()
                     ) -> tuple[dict[str, Any], str]:
    """The flags a task remembers and the command that gave them; a bad value (unless
    `overridden` now) is a MetadataError naming tasks.json."""
    from utils import MetadataError
    options = (task.options if task is not None else None) or {}
    flags, command = options.get("flags") or {}, options.get("command") or "download"
    if not isinstance(flags, dict) or not isinstance(command, str):
        raise MetadataError(f"task {task.id if task else '?'} has bad 'options' in tasks.json",
                            hint="remove its 'options' (the flags on the command line apply)")
    checks: dict[str, Callable[[Any], bool]] = {
        "tool": lambda v: v in _TOOLS,
        "connections": lambda v: _whole(v) and v > 0, "jobs": lambda v: _whole(v) and v > 0,
        "retries": lambda v: _whole(v) and v >= 0, "reserve": lambda v: _whole(v) and v >= 0,
        "stall_timeout": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        and 0 < v <= 86400}
    for key, value in flags.items():
        if key in checks and key not in overridden and not checks[key](value):
            raise MetadataError(f"task {task.id if task else '?'} remembers a bad {key!r} "
                                f"({value!r}) in tasks.json",
                                hint="remove it from the task's 'options', or give the flag")
    return {k: flags[k] for k in RUN_FLAGS if k in flags}, command


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def run_settings(cfg: Config, given: dict[str, Any], task: Task | None) -> RunSettings:
    """The flags given on this command line (None: not given) over the task's remembered ones."""
    now = {k: v for k, v in given.items() if v is not None}
    remembered, command = remembered_flags(task, frozenset(now))
    used = {k: v for k, v in remembered.items() if k not in now}
    flags = {**used, **now}
    reserve = flags.pop("reserve", None)
    return RunSettings(options_from_config(cfg, **flags),
                       cfg.get("disk_reserve") if reserve is None else reserve, used, command)


def remembered_options(task: Task, given: dict[str, Any], command: str) -> dict[str, Any]:
    """The task's options once `command` ran with the flags `given` (None: not given)."""
    flags, _ = remembered_flags(task, frozenset(k for k, v in given.items() if v is not None))
    flags.update({k: v for k, v in given.items() if v is not None and k in RUN_FLAGS})
    return {"command": command, "flags": {k: flags[k] for k in RUN_FLAGS if k in flags}}


def flag_text(flags: dict[str, Any]) -> str:
    """Remembered flags as they would be typed: "--tool wget -j 4 --reserve 500M"."""
    names = {"tool": "--tool", "connections": "-x", "jobs": "-j", "retries": "--retries",
             "stall_timeout": "--stall-timeout", "reserve": "--reserve"}
    parts = []
    for key in RUN_FLAGS:
        if key in flags:
            value = flags[key]
            text = (_size_text(value) if key == "reserve" else
                    f"{value:g}" if isinstance(value, float) else str(value))
            parts.append(f"{names[key]} {text}")
    return " ".join(parts)


def _size_text(n: int) -> str:
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
