"""Per-file state of one task: file_list.json, file_status.json, transitions, counters, checks.

file_list.json is written when the listing changes; file_status.json is saved on changes,
coalesced (at most every `min_interval` seconds, and at the end), never per chunk.
"""
from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dataset_manager import Listing, RemoteFile, file_url
from task_manager import TaskPaths
from utils import (SCHEMA_VERSION, MetadataError, hash_file, now_iso, read_json, safe_relpath,
                   write_json_atomic)


class FileState(str, enum.Enum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class SyncReport:
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    old_versions: dict[str, str]     # path -> expected hash before, for changed and removed files


@dataclass(frozen=True)
class CheckResult:
    path: str
    verdict: str          # ok | missing | size mismatch | hash mismatch
    detail: str = ""


class FileTracker:
    """The files of one task and their states, kept in memory and saved coalesced."""

    def __init__(self, paths: TaskPaths, task_id: str, files: list[RemoteFile],
                 status: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
        self.paths = paths
        self.task_id = task_id
        self.files = files
        self.by_path = {f.path: f for f in files}
        self.status = status
        self.meta = meta                      # repo_id, repo_type, commit
        self.min_interval = 1.0
        self._lock = threading.RLock()
        self._dirty = False
        self._last_save = 0.0
        self._recount()

    # ------------------------------------------------------------ create / load

    @classmethod
    def create(cls, paths: TaskPaths, task_id: str, listing: Listing, endpoint: str) -> "FileTracker":
        meta = {"repo_id": listing.repo_id, "repo_type": listing.repo_type,
                "commit": listing.commit}
        tracker = cls(paths, task_id, list(listing.files), {}, meta)
        for f in listing.files:
            tracker.status[f.path] = _new_status(f)
        tracker._recount()
        tracker.write_list(endpoint)
        tracker.save()
        return tracker

    @classmethod
    def load(cls, paths: TaskPaths, task_id: str) -> "FileTracker":
        files, meta = _read_list(paths)
        return cls(paths, task_id, files, cls._load_status(paths, files), meta)

    @staticmethod
    def _load_status(paths: TaskPaths, files: list[RemoteFile]) -> dict[str, dict[str, Any]]:
        """Read file_status.json; a missing or corrupt one says how to rebuild it."""
        try:
            data = read_json(paths.file_status)
            status = data.get("files")
            if not isinstance(status, dict) or not all(isinstance(v, dict) for v in status.values()):
                raise MetadataError(f"metadata file {paths.file_status} has a bad 'files' object")
        except MetadataError as exc:
            raise MetadataError(str(exc), hint="run 'python main.py fix-progress' to rebuild it "
                                               "from the files on disk") from None
        for f in files:          # entries missing from a hand-edited file start over
            if f.path not in status or status[f.path].get("status") not in _STATES:
                status[f.path] = _new_status(f)
        return status

    @classmethod
    def rebuild(cls, paths: TaskPaths, task_id: str) -> "FileTracker":
        """A fresh status for every file (fix-progress reconciles it with the disk next)."""
        files, meta = _read_list(paths)
        return cls(paths, task_id, files, {f.path: _new_status(f) for f in files}, meta)

    def write_list(self, endpoint: str) -> None:
        repo_id, repo_type, commit = self.meta["repo_id"], self.meta["repo_type"], self.meta["commit"]
        entries = [{"filename": f.path, "url": file_url(endpoint, repo_id, repo_type, commit, f.path),
                    "expected_size": f.size, "blob_id": f.blob_id, "sha256": f.sha256,
                    "lfs": f.lfs} for f in self.files]
        write_json_atomic(self.paths.file_list,
                          {"schema_version": SCHEMA_VERSION, "task_id": self.task_id, **self.meta,
                           "files": entries}, indent=None)

    # ------------------------------------------------------------ transitions

    def set_state(self, path: str, state: FileState, **fields: Any) -> None:
        with self._lock:
            entry = self.status[path]
            self._count(entry, -1)
            entry["status"] = state.value
            entry.update(fields)
            self._count(entry, +1)
            self._dirty = True

    def start(self, path: str) -> None:
        f = self.by_path[path]
        self.set_state(path, FileState.DOWNLOADING, started_at=now_iso(),
                       expected_hash=f.expected_hash)

    def attempt_failed(self, path: str, error: str, *, final: bool) -> None:
        with self._lock:
            attempts = int(self.status[path].get("attempts", 0)) + 1
        self.set_state(path, FileState.FAILED if final else FileState.DOWNLOADING,
                       attempts=attempts, error=error, last_attempt_at=now_iso())

    def complete(self, path: str, size: int) -> None:
        with self._lock:
            attempts = int(self.status[path].get("attempts", 0)) + 1
        self.set_state(path, FileState.COMPLETED, actual_size=size, completed_at=now_iso(),
                       error=None, attempts=attempts, expected_hash=self.by_path[path].expected_hash)

    def reset(self, path: str, error: str | None = None) -> None:
        self.set_state(path, FileState.PENDING, actual_size=0, completed_at=None, error=error)

    def interrupted(self, path: str) -> None:
        """A download stopped from outside: back to pending, the partial stays for resume."""
        with self._lock:
            if self.status[path]["status"] == FileState.DOWNLOADING.value:
                self.set_state(path, FileState.PENDING)

    # ------------------------------------------------------------ counters

    def _recount(self) -> None:
        self.counts = {s.value: 0 for s in FileState}
        self.bytes_done = 0
        self.bytes_total = sum(f.size for f in self.files)
        for entry in self.status.values():
            self._count(entry, +1)

    def _count(self, entry: dict[str, Any], sign: int) -> None:
        state = entry.get("status", FileState.PENDING.value)
        self.counts[state] = self.counts.get(state, 0) + sign
        if state == FileState.COMPLETED.value:
            self.bytes_done += sign * int(entry.get("actual_size") or 0)


    def summary(self) -> dict[str, int]:
        with self._lock:
            return {"files_total": len(self.files),
                    "files_done": self.counts.get(FileState.COMPLETED.value, 0),
                    "files_failed": self.counts.get(FileState.FAILED.value, 0),
                    "bytes_total": self.bytes_total, "bytes_done": self.bytes_done}

    def paths_in(self, *states: FileState) -> list[str]:
        wanted = {s.value for s in states}
        return [f.path for f in self.files if self.status[f.path]["status"] in wanted]

    # ------------------------------------------------------------ saving

    def maybe_save(self) -> None:
        """Save if something changed and the last save is old enough (coalescing)."""
        if self._dirty and time.monotonic() - self._last_save >= self.min_interval:
            self.save()

    def flush(self) -> None:
        """Save if anything changed since the last save."""
        if self._dirty:
            self.save()

    def save(self) -> None:
        with self._lock:
            started = time.monotonic()
            data = {"schema_version": SCHEMA_VERSION, "task_id": self.task_id,
                    "commit": self.meta["commit"], "updated_at": now_iso(),
                    "counts": dict(self.counts), "files": self.status}
            write_json_atomic(self.paths.file_status, data, indent=None)
            self._dirty = False
            self._last_save = time.monotonic()
            # A big status file must not eat the run: save at most ~5% of the time.
            self.min_interval = max(1.0, 20 * (self._last_save - started))

    # ------------------------------------------------------------ sync with a new listing

    def sync(self, listing: Listing, endpoint: str) -> SyncReport:
        """Adopt a new commit's listing: new or changed files go pending, removed ones are reported."""
        with self._lock:
            old = self.by_path
            added, changed = [], []
            for f in listing.files:
                before = old.get(f.path)
                if before is None:
                    added.append(f.path)
                    self.status[f.path] = _new_status(f)
                elif (before.expected_hash, before.size) != (f.expected_hash, f.size):
                    changed.append(f.path)
                    self.status[f.path] = _new_status(f)
            new_paths = {f.path for f in listing.files}
            removed = [p for p in old if p not in new_paths]
            for p in removed:
                self.status.pop(p, None)
            self.files = list(listing.files)
            self.by_path = {f.path: f for f in self.files}
            self.meta["commit"] = listing.commit
            self._recount()
            self._dirty = True
        self.write_list(endpoint)
        self.save()
        old_versions = {p: old[p].expected_hash for p in changed + removed}
        return SyncReport(added, changed, removed, len(listing.files) - len(added) - len(changed),
                          old_versions)


def _read_list(paths: TaskPaths) -> tuple[list[RemoteFile], dict[str, Any]]:
    """file_list.json: the task's files (names checked again: the file may be hand-edited)."""
    listing = read_json(paths.file_list)
    entries = listing.get("files")
    if not isinstance(entries, list):
        raise MetadataError(f"metadata file {paths.file_list} has no 'files' list",
                            hint="delete the task ('clean') and download again")
    try:
        files = [RemoteFile(safe_relpath(e["filename"]), int(e["expected_size"]),
                            e["blob_id"], e.get("sha256")) for e in entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"metadata file {paths.file_list} has a bad entry ({exc})",
                            hint="delete the task ('clean') and download again") from None
    return files, {k: listing.get(k) for k in ("repo_id", "repo_type", "commit")}


def _new_status(f: RemoteFile) -> dict[str, Any]:
    return {"status": FileState.PENDING.value, "actual_size": 0, "attempts": 0, "error": None,
            "created_at": now_iso(), "completed_at": None, "expected_hash": f.expected_hash,
            "hash_kind": f.hash_kind}


_STATES = {s.value for s in FileState}


def check_file(path: Path, f: RemoteFile, *, quick: bool = False) -> CheckResult:
    """Check one file on disk against the listing: size always, the content hash unless quick."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return CheckResult(f.path, "missing")
    if size != f.size:
        return CheckResult(f.path, "size mismatch", f"{size} bytes, expected {f.size}")
    if quick:
        return CheckResult(f.path, "ok")
    digest = hash_file(path, f.hash_kind, f.size)
    if digest != f.expected_hash:
        return CheckResult(f.path, "hash mismatch", f"{f.hash_kind} {digest}, expected {f.expected_hash}")
    return CheckResult(f.path, "ok")


def check_files(tracker: FileTracker, local_dir: Path, paths: Iterable[str], *, quick: bool = False,
                workers: int | None = None) -> list[CheckResult]:
    """Check many files, hashing in a thread pool (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor
    from utils import safe_join
    paths = list(paths)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: check_file(safe_join(local_dir, p), tracker.by_path[p],
                                                  quick=quick), paths))


def apply_checks(tracker: FileTracker, local_dir: Path, results: Iterable[CheckResult], *,
                 missing_ok: bool = False) -> list[CheckResult]:
    """Record check results: ok files completed, bad ones failed (and taken off their final
    name, so resume fetches them again), missing ones pending. Returns the bad ones."""
    from utils import safe_join
    bad = []
    for r in results:
        f = tracker.by_path[r.path]
        if r.verdict == "ok":
            if tracker.status[r.path]["status"] != FileState.COMPLETED.value:
                tracker.complete(r.path, f.size)
            continue
        if r.verdict == "missing":
            if missing_ok:
                continue
            tracker.reset(r.path, "missing on disk")
        else:
            final = safe_join(local_dir, r.path)
            _take_off_final_name(final, f, r)
            tracker.set_state(r.path, FileState.FAILED, error=f"{r.verdict}: {r.detail}",
                              actual_size=0, completed_at=None)
        bad.append(r)
    return bad


def _take_off_final_name(final: Path, f: RemoteFile, r: CheckResult) -> None:
    """A short file may be a good head: keep it as the partial. Anything else is wrong bytes."""
    from utils import Partial
    partial = Partial(final, f.expected_hash).path
    try:
        if r.verdict == "size mismatch" and final.stat().st_size < f.size:
            os.replace(final, partial)
        else:
            final.unlink()
    except FileNotFoundError:
        pass


def reconcile_with_disk(tracker: FileTracker, local_dir: Path, *,
                        missing_ok: bool = False) -> dict[str, int]:
    """fix-progress: make every file's state match the disk; returns counts of changes."""
    from utils import safe_join
    changes = {"now_completed": 0, "now_pending": 0, "now_failed": 0}
    to_check = []
    for f in tracker.files:
        state = tracker.status[f.path]["status"]
        final = safe_join(local_dir, f.path)
        exists = final.is_file()
        if state == FileState.COMPLETED.value and not exists:
            if not missing_ok:
                tracker.reset(f.path, "missing on disk")
                changes["now_pending"] += 1
        elif state != FileState.COMPLETED.value and exists:
            to_check.append(f.path)
        elif state == FileState.COMPLETED.value and final.stat().st_size != f.size:
            to_check.append(f.path)
        elif state == FileState.DOWNLOADING.value:
            tracker.set_state(f.path, FileState.PENDING)
            changes["now_pending"] += 1
    for r in check_files(tracker, local_dir, to_check):
        before = tracker.status[r.path]["status"]
        apply_checks(tracker, local_dir, [r], missing_ok=missing_ok)
        after = tracker.status[r.path]["status"]
        if after != before:
            key = {"completed": "now_completed", "pending": "now_pending"}.get(after, "now_failed")
            changes[key] += 1
    return changes


def delete_local_files(tracker: FileTracker, local_dir: Path) -> int:
    """Remove the task's files (and partials) from disk, then the folders left empty."""
    from utils import Partial, safe_join
    removed = 0
    folders = set()
    for f in tracker.files:
        final = safe_join(local_dir, f.path)
        for p in (final, *Partial(final, f.expected_hash).files()):
            try:
                p.unlink()
                removed += p == final
            except FileNotFoundError:
                pass
        folders.add(final.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != local_dir.parent and folder.is_dir():
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
    return removed


# ---------------------------------------------------------------- whole-task operations

@dataclass(frozen=True)
class VerifyReport:
    results: list[CheckResult]
    bad: list[CheckResult]


def verify_task(store, task: dict[str, Any], local_dir: Path, *, paths: list[str] | None = None,
                quick: bool = False) -> VerifyReport:
    """verify: re-check files on disk; bad ones are marked so resume fetches them again."""
    with store.lock(task["id"]):
        tracker = FileTracker.load(store.paths(task["id"]), task["id"])
        paths = [f.path for f in tracker.files] if paths is None else paths
        results = check_files(tracker, local_dir, paths, quick=quick)
        bad = apply_checks(tracker, local_dir, results)
        tracker.save()
        status = "failed" if bad and task.get("status") == "completed" else task.get("status")
        store.update(task["id"], status=status,
                     reason=f"verify: {len(bad)} bad files" if bad else task.get("reason", ""),
                     **tracker.summary())
    return VerifyReport(results, bad)


@dataclass(frozen=True)
class FixReport:
    task_id: str
    changes: dict[str, int]
    summary: dict[str, int]
    status: str
    rebuilt: bool


def fix_task(store, task: dict[str, Any]) -> FixReport:
    """fix-progress for one task: per-file states and counters from what is on disk."""
    tid = task["id"]
    with store.lock(tid):
        rebuilt = False
        try:
            tracker = FileTracker.load(store.paths(tid), tid)
        except MetadataError:
            tracker, rebuilt = FileTracker.rebuild(store.paths(tid), tid), True
        # a batch task's other batches are on other disks: absent is expected there
        changes = reconcile_with_disk(tracker, Path(task["local_dir"]),
                                      missing_ok=task.get("kind") == "batch")
        tracker.save()
        summary = tracker.summary()
        status = task.get("status")
        if summary["files_done"] == summary["files_total"]:
            status = "completed"
        elif status in ("running", "completed"):
            status = "paused"
        store.update(tid, status=status, pid=None, **summary)
    return FixReport(tid, changes, summary, status, rebuilt)
