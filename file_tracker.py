"""Per-file state of one task: file_list.json, file_status.json, transitions, counters, checks.

file_list.json is written when the listing changes; file_status.json is saved on changes,
coalesced (at most every `min_interval` seconds, and at the end), never per chunk.
The disk is the truth: checking a file (size, hash) and making the states match the disk
live here and nowhere else. The task folder comes from the caller (task_manager.TaskStore.folder);
this module does not import task_manager.
"""
from __future__ import annotations

import contextlib
import enum
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from dataset_manager import Listing, RemoteFile
from file_store import (CODES, COMPLETED, FILE_LIST, STATES, FilesByPath, StatusTable,
                        list_json, load_status, read_list)
from partial import Partial
from utils import (SCHEMA_VERSION, MetadataError, UnsafePathError, hash_file, now_iso, safe_join,
                   safe_target, write_json_atomic)


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
    size: int | None = None       # bytes on disk (None: missing)
    digest: str | None = None     # the content hash found (hash mismatch only)


FILE_STATUS = "file_status.json"   # their states, saved coalesced


class FileTracker:
    """The files of one task and their states, kept in memory and saved coalesced."""

    def __init__(self, folder: Path, task_id: str, status: StatusTable,
                 meta: dict[str, Any]) -> None:
        self.folder = Path(folder)          # the task folder (task_manager.TaskStore.folder)
        self.task_id = task_id
        self._adopt(status)
        self.meta = meta                      # repo_id, repo_type, commit
        self.min_interval = 1.0
        self.clock: Callable[[], float] = time.monotonic     # a parameter, so tests need no sleep
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()      # one save at a time, in order
        self._dirty = False
        self._last_save = 0.0
        self._recount()

    def _adopt(self, status: StatusTable) -> None:
        self.status = status                  # path -> status entry (file_store.StatusTable)
        self.files = status.files
        self.by_path = FilesByPath(status.files, status.index)

    # ------------------------------------------------------------ create / load

    @classmethod
    def create(cls, folder: Path, task_id: str, listing: Listing, endpoint: str) -> "FileTracker":
        meta = {"repo_id": listing.repo_id, "repo_type": listing.repo_type,
                "commit": listing.commit}
        tracker = cls(folder, task_id, StatusTable(list(listing.files), now_iso()), meta)
        tracker.write_list(endpoint)
        tracker.save()
        return tracker

    @classmethod
    def load(cls, folder: Path, task_id: str) -> "FileTracker":
        files, meta = read_list(Path(folder))
        return cls(folder, task_id, cls._load_status(Path(folder), files), meta)

    @staticmethod
    def _load_status(folder: Path, files: list[RemoteFile]) -> StatusTable:
        """Read file_status.json; a missing or corrupt one says how to rebuild it."""
        try:
            return load_status(folder / FILE_STATUS, files)
        except MetadataError as exc:
            raise MetadataError(str(exc), hint="run 'python main.py fix-progress' to rebuild it "
                                               "from the files on disk") from None

    @classmethod
    def rebuild(cls, folder: Path, task_id: str) -> "FileTracker":
        """A fresh status for every file (fix-progress reconciles it with the disk next)."""
        files, meta = read_list(Path(folder))
        return cls(folder, task_id, StatusTable(files, now_iso()), meta)

    def write_list(self, endpoint: str) -> None:
        """file_list.json: the listing as rows, no URLs (dataset_manager.file_url makes them
        from the endpoint, repo, commit and path)."""
        if not self.meta.get("removed"):
            self.meta.pop("removed", None)
        write_json_atomic(self.folder / FILE_LIST,
                          {"schema_version": SCHEMA_VERSION, "task_id": self.task_id, **self.meta,
                           **list_json(self.files)}, indent=None)

    # ------------------------------------------------------------ transitions

    def set_state(self, path: str, state: FileState, **fields: Any) -> None:
        with self._lock:
            i = self.status.index[path]
            entry = self.status.entry(i)
            self._count(i, -1)
            entry["status"] = state.value
            entry.update(fields)
            self.status.store(i, entry)
            self._count(i, +1)
            self._dirty = True

    def state(self, path: str) -> str:
        """The state of one file (cheaper than status[path]["status"])."""
        return self.status.state(path)

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
            if self.status.state(path) == FileState.DOWNLOADING.value:
                self.set_state(path, FileState.PENDING)

    # ------------------------------------------------------------ counters

    def _recount(self) -> None:
        codes = self.status.codes
        self.counts = {s: codes.count(code) for code, s in enumerate(STATES)}
        self.bytes_total = sum(f.size for f in self.files)
        self.bytes_done = sum(f.size for f, c in zip(self.files, codes) if c == COMPLETED)
        for i, details in self.status.details.items():
            if codes[i] == COMPLETED and "actual_size" in details:
                self.bytes_done += self.status.done_bytes(i) - self.files[i].size

    def _count(self, i: int, sign: int) -> None:
        code = self.status.codes[i]
        self.counts[STATES[code]] += sign
        if code == COMPLETED:
            self.bytes_done += sign * self.status.done_bytes(i)

    def summary(self) -> dict[str, int]:
        with self._lock:
            return {"files_total": len(self.files),
                    "files_done": self.counts.get(FileState.COMPLETED.value, 0),
                    "files_failed": self.counts.get(FileState.FAILED.value, 0),
                    "bytes_total": self.bytes_total, "bytes_done": self.bytes_done}

    def paths_in(self, *states: FileState) -> list[str]:
        wanted = {CODES[s.value] for s in states}
        return [f.path for f, c in zip(self.files, self.status.codes) if c in wanted]

    # ------------------------------------------------------------ saving

    def maybe_save(self) -> None:
        """Save if something changed and the last save is old enough (coalescing)."""
        if self._dirty and self.clock() - self._last_save >= self.min_interval:
            self.save()

    def flush(self) -> None:
        """Save if anything changed since the last save."""
        if self._dirty:
            self.save()

    def save(self, *, by_path: bool = False) -> None:
        """file_status.json in the compact form (file_store): defaults are not written."""
        # The workers' state changes wait only for a copy of the state, not for its encoding
        # and fsync (3,000 files at -j 32: they waited ~10 ms per change); saves stay in order.
        with self._save_lock:
            started = self.clock()
            with self._lock:
                data = {"schema_version": SCHEMA_VERSION, "task_id": self.task_id,
                        "commit": self.meta["commit"], "updated_at": now_iso(),
                        "counts": dict(self.counts), **self.status.to_json(by_path=by_path)}
                self._dirty = False
            try:
                write_json_atomic(self.folder / FILE_STATUS, data, indent=None)
            except BaseException:
                self._dirty = True
                raise
            self._last_save = self.clock()
            # A big status file must not eat the run: save at most ~5% of the time.
            self.min_interval = max(1.0, 20 * (self._last_save - started))

    # ------------------------------------------------------------ removed upstream

    def removed(self) -> list[RemoteFile]:
        """Files this task downloaded that a later commit no longer lists (--prune deletes
        them), with the size and hash they had when downloaded."""
        return [RemoteFile(e["filename"], e["expected_size"], e["blob_id"], e.get("sha256"))
                for e in self.meta.get("removed") or []]

    def set_removed(self, files: Iterable[RemoteFile]) -> None:
        unique = {f.path: f for f in files}
        self.meta["removed"] = [{"filename": f.path, "expected_size": f.size,
                                 "blob_id": f.blob_id, "sha256": f.sha256}
                                for f in sorted(unique.values(), key=lambda f: f.path)]

    # ------------------------------------------------------------ sync with a new listing

    def sync(self, listing: Listing, endpoint: str) -> SyncReport:
        """Adopt a new commit's listing: new or changed files go pending, removed ones are reported."""
        with self._lock:
            old, old_table = self.by_path, self.status
            table = StatusTable(list(listing.files), old_table.created_at)
            added, changed = [], []
            for i, f in enumerate(table.files):
                j = old_table.index.get(f.path)
                if j is None:
                    added.append(f.path)
                elif (old_table.files[j].expected_hash, old_table.files[j].size) == \
                        (f.expected_hash, f.size):
                    table.copy_from(old_table, j, i)
                    continue
                else:
                    changed.append(f.path)
                table.store(i, {"status": FileState.PENDING.value, "created_at": now_iso()})
            removed = [p for p in old if p not in table.index]
            # What the task downloaded and upstream removed stays recorded until --prune
            # deletes it (on this run or any later one); a path listed again is no longer a
            # candidate.
            downloaded = [old[p] for p in removed if old_table.state(p) == FileState.COMPLETED.value]
            self.set_removed([e for e in self.removed() if e.path not in table.index] +
                             downloaded)
            self._adopt(table)
            self.meta["commit"] = listing.commit
            self._recount()
            self._dirty = True
        # The states keyed by path first: they load against the old list and the new one, so
        # a crash between the two files loses none (index runs fit one list only).
        self.save(by_path=True)
        self.write_list(endpoint)
        self.save()
        old_versions = {p: old[p].expected_hash for p in changed + removed}
        return SyncReport(added, changed, removed, len(listing.files) - len(added) - len(changed),
                          old_versions)


# ---------------------------------------------------------------- the disk, the truth

def check_file(path: Path, f: RemoteFile, *, digest: str | None = None,
               quick: bool = False) -> CheckResult:
    """Check one file on disk against the listing: size always, the content hash unless quick.
    `digest` is the hash already computed while the bytes streamed in (saves reading them again)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return CheckResult(f.path, "missing")
    if size != f.size:
        return CheckResult(f.path, "size mismatch", f"{size} bytes, expected {f.size}", size)
    if quick:
        return CheckResult(f.path, "ok", size=size)
    if digest is None:
        digest = hash_file(path, f.hash_kind, f.size)
    if digest != f.expected_hash:
        return CheckResult(f.path, "hash mismatch",
                           f"{f.hash_kind} {digest}, expected {f.expected_hash}", size, digest)
    return CheckResult(f.path, "ok", size=size)


def check_files(tracker: FileTracker, local_dir: Path, paths: Iterable[str], *, quick: bool = False,
                workers: int | None = None) -> list[CheckResult]:
    """Check many files, hashing in a thread pool (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor
    paths = list(paths)
    if not paths:
        return []
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    results: list[CheckResult] = []
    # In slices: pool.map makes a Future (~1 KB) per item at once, 100+ MB for 100k files.
    step = 64 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for at in range(0, len(paths), step):
            results.extend(pool.map(lambda p: check_file(safe_join(local_dir, p),
                                                         tracker.by_path[p], quick=quick),
                                    paths[at:at + step]))
    return results


def apply_checks(tracker: FileTracker, local_dir: Path, results: Iterable[CheckResult], *,
                 missing_ok: bool = False, on_bad: str = "take_off",
                 moved: list[tuple[str, str]] | None = None) -> list[CheckResult]:
    """Record check results: ok files completed, bad ones failed, missing ones pending.
    Returns the bad ones. A bad file is, by `on_bad`: "take_off" its final name (fix-progress:
    a short one kept as the partial), "keep" (left as it is: it may be the user's), or "aside"
    (renamed NAME.hfdl-modified-TIME, appended to `moved`), so resume fetches it again."""
    bad = []
    for r in results:
        f = tracker.by_path[r.path]
        if r.verdict == "ok":
            if tracker.state(r.path) != FileState.COMPLETED.value:
                tracker.complete(r.path, f.size)
            continue
        if r.verdict == "missing":
            if missing_ok:
                continue
            tracker.reset(r.path, "missing on disk")
        else:
            _handle_bad(local_dir, f, r, on_bad, moved)
            tracker.set_state(r.path, FileState.FAILED, error=f"{r.verdict}: {r.detail}",
                              actual_size=0, completed_at=None)
        bad.append(r)
    return bad


def _handle_bad(local_dir: Path, f: RemoteFile, r: CheckResult, on_bad: str,
                moved: list[tuple[str, str]] | None) -> None:
    """What apply_checks does with a bad file at its final name (see there)."""
    if on_bad == "keep":
        return
    try:
        final = safe_target(local_dir, f.path)
    except UnsafePathError:
        return                  # never rename or delete through a symlink
    try:
        if on_bad == "aside":
            aside = final.with_name(f"{final.name}.hfdl-modified-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(final, aside)
            if moved is not None:
                moved.append((f.path, aside.name))
        elif r.verdict == "size mismatch" and final.stat().st_size < f.size:
            partial = Partial(local_dir, f.path, f.expected_hash)    # a good head, maybe
            partial.prepare()
            os.replace(final, partial.path)
        else:
            final.unlink()
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class DiskScan:
    """Where the recorded states and the final paths disagree (sizes only: nothing is read)."""
    unrecorded: list[str]     # not recorded as completed, yet a file is at its final path
    vanished: list[str]       # recorded as completed, no file at its final path
    resized: list[str]        # recorded as completed, the file there has another size


def scan_disk(tracker: FileTracker, local_dir: Path,
              paths: Iterable[str] | None = None) -> DiskScan:
    """Compare the states of `paths` (default: all files) with their final paths on disk."""
    root = str(local_dir)
    unrecorded, vanished, resized = [], [], []
    for path in (tracker.by_path if paths is None else paths):
        done = tracker.state(path) == FileState.COMPLETED.value
        try:      # a plain join: the names were validated when the listing was read
            st = os.stat(os.path.join(root, path))
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (FileNotFoundError, NotADirectoryError):
            size = None
        if not done and size is not None:
            unrecorded.append(path)
        elif done and size is None:
            vanished.append(path)
        elif done and size != tracker.by_path[path].size:
            resized.append(path)
    return DiskScan(unrecorded, vanished, resized)


def adopt_finished(tracker: FileTracker, local_dir: Path, paths: Iterable[str]) -> int:
    """Files at their final path but not recorded as done (a crash between rename and save):
    check them (size and hash) and record the good ones. Returns how many were adopted.
    Bad ones are left alone: the download that follows replaces them."""
    scan = scan_disk(tracker, local_dir, paths)
    good = [r for r in check_files(tracker, local_dir, scan.unrecorded) if r.verdict == "ok"]
    apply_checks(tracker, local_dir, good)
    return len(good)


def forget_missing(tracker: FileTracker, local_dir: Path,
                   among: Iterable[str] | None = None) -> int:
    """Completed files (of `among`, default all) deleted or changed in size by hand go back to
    pending (sizes only)."""
    done = tracker.paths_in(FileState.COMPLETED)
    if among is not None:
        wanted = set(among)
        done = [p for p in done if p in wanted]
    scan = scan_disk(tracker, local_dir, done)
    for path in scan.vanished + scan.resized:
        tracker.reset(path, "missing on disk")
    return len(scan.vanished) + len(scan.resized)


def reconcile_with_disk(tracker: FileTracker, local_dir: Path, *,
                        missing_ok: bool = False) -> dict[str, int]:
    """fix-progress: make every file's state match the disk; returns counts of changes.
    Unlike a run, files of the wrong size or hash are taken off their final name and failed."""
    changes = {"now_completed": 0, "now_pending": 0, "now_failed": 0}
    scan = scan_disk(tracker, local_dir)
    if not missing_ok:
        for path in scan.vanished:
            tracker.reset(path, "missing on disk")
            changes["now_pending"] += 1
    on_disk = set(scan.unrecorded)
    for path in tracker.paths_in(FileState.DOWNLOADING):   # no process is downloading it now
        if path not in on_disk:
            tracker.set_state(path, FileState.PENDING)
            changes["now_pending"] += 1
    for r in check_files(tracker, local_dir, scan.unrecorded + scan.resized):
        before = tracker.state(r.path)
        apply_checks(tracker, local_dir, [r], missing_ok=missing_ok)
        after = tracker.state(r.path)
        if after != before:
            key = {FileState.COMPLETED.value: "now_completed",
                   FileState.PENDING.value: "now_pending"}.get(after, "now_failed")
            changes[key] += 1
    return changes


HASH_BEFORE_DELETE = 64 * 2**20      # files up to this size are hashed before being deleted


@dataclass(frozen=True)
class Deleted:
    removed: int        # files deleted
    kept: list[str]     # changed since the download (size or hash), or behind a symlink


def _unchanged(path: Path, f: RemoteFile) -> bool:
    """The file at `path` is still what the task downloaded (size; hash when small)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
        return False
    return f.size > HASH_BEFORE_DELETE or hash_file(path, f.hash_kind, f.size) == f.expected_hash


def delete_local_files(tracker: FileTracker, local_dir: Path, *, own_only: bool = False) -> Deleted:
    """Remove the task's files (and partials) from disk, then the folders left empty. Only
    files still as downloaded are deleted (local_dir comes from metadata a user can edit, and
    files may have been changed since): the others are kept and listed. `own_only` (a batch
    task, whose folder other batches may share): only the files this task ever started."""
    import hf_cache
    if hf_cache.is_snapshot(local_dir):      # --hf-cache: links, then the blobs no one uses
        for f in tracker.files:
            with contextlib.suppress(ValueError):
                Partial(local_dir, f.path, f.expected_hash).discard()
        Partial.tidy(local_dir)
        return Deleted(*hf_cache.delete_snapshot(local_dir, tracker.files, _unchanged))
    removed, kept, gone = 0, [], []
    folders = set()
    for f in tracker.files:
        if own_only and tracker.status[f.path]["status"] == FileState.PENDING.value:
            continue
        try:
            final = safe_target(local_dir, f.path)
        except (UnsafePathError, ValueError):
            kept.append(f.path)
            continue
        partial = Partial(local_dir, f.path, f.expected_hash)
        partial.discard()
        folders.add(partial.path.parent)
        folders.add(final.parent)
        if _unchanged(final, f):
            final.unlink()
            removed += 1
            gone.append(f.path)
        elif os.path.lexists(final):
            kept.append(f.path)
    hf_cache.remove_local_metadata(local_dir, gone)      # hf download --local-dir's records
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != local_dir and folder.is_dir():
            try:
                safe_target(local_dir, os.path.relpath(folder, local_dir))
                folder.rmdir()
            except (OSError, ValueError):
                break
            folder = folder.parent
    with contextlib.suppress(OSError):
        local_dir.rmdir()
    return Deleted(removed, kept)


# ---------------------------------------------------------------- --prune

@dataclass(frozen=True)
class PruneReport:
    deleted: list[str]
    kept: dict[str, str]          # path -> why it was not deleted


def prune_removed(tracker: FileTracker, local_dir: Path) -> PruneReport:
    """--prune: delete the files this task downloaded that the current commit no longer lists,
    when they are still the bytes the task wrote (size and hash); a file changed since is the
    user's and is kept. Either way the record is cleared (the caller saves it: write_list)."""
    deleted, kept = [], {}
    root = os.path.realpath(local_dir)
    for f in tracker.removed():
        if f.path in tracker.by_path:
            continue                              # listed again: not removed any more
        try:
            final = safe_target(local_dir, f.path)    # never through a symlinked folder
            st = os.lstat(final)
        except (UnsafePathError, ValueError) as exc:
            kept[f.path] = str(exc)
            continue
        except (FileNotFoundError, NotADirectoryError):
            continue                              # already gone
        if not stat.S_ISREG(st.st_mode) or os.path.realpath(final) != os.path.join(root, f.path):
            kept[f.path] = "not a regular file inside the folder"
        elif (result := check_file(final, f)).verdict != "ok":
            kept[f.path] = f"changed since this task downloaded it ({result.verdict})"
        else:
            final.unlink()
            deleted.append(f.path)
            _remove_empty_parents(final.parent, Path(local_dir))
    tracker.set_removed([])
    return PruneReport(deleted, kept)


def _remove_empty_parents(folder: Path, root: Path) -> None:
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# Files up to this size are hashed by `download --dry-run`; bigger ones are checked by size only.
DRY_RUN_HASH_LIMIT = 16 * 1024 * 1024


def files_on_disk(files: Iterable[RemoteFile], local_dir: Path) -> dict[str, str]:
    """The files already complete in `local_dir`: path -> what was checked ("hash" or "size")."""
    found = {}
    for f in files:
        path = safe_join(local_dir, f.path)
        if not path.is_file():
            continue
        quick = f.size > DRY_RUN_HASH_LIMIT
        if check_file(path, f, quick=quick).verdict == "ok":
            found[f.path] = "size" if quick else "hash"
    return found

