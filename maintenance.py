"""Whole-task maintenance: verify, fix-progress and clean, each under the task's lock.

These operations need both the task record (task_manager) and the per-file state
(file_tracker), so they live above both; neither of those modules imports this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Set
from typing import Any

from file_tracker import (CheckResult, FileTracker, apply_checks, check_files,
                          delete_local_files, reconcile_with_disk)
from task_manager import ENDED, FINISHED, Task, TaskState, TaskStore
from utils import MetadataError, TaskLockedError


# ---------------------------------------------------------------- verify

@dataclass(frozen=True)
class VerifyReport:
    results: list[CheckResult]
    bad: list[CheckResult]
    moved: list[tuple[str, str]]      # (path, the name it was moved to): --fix only


def verify_task(store: TaskStore, task: Task, local_dir: Path, *,
                paths: list[str] | None = None, quick: bool = False,
                fix: bool = False) -> VerifyReport:
    """verify: re-check files on disk; bad ones are marked so resume fetches them again.
    A bad file may be the user's own change: it stays where it is, unless `fix` moves it aside."""
    with store.lock(task.id):
        task = store.get(task.id)             # as it is now that nobody else can change it
        tracker = FileTracker.load(store.folder(task.id), task.id)
        paths = [f.path for f in tracker.files] if paths is None else paths
        results = check_files(tracker, local_dir, paths, quick=quick)
        moved: list[tuple[str, str]] = []
        bad = apply_checks(tracker, local_dir, results, on_bad="aside" if fix else "keep",
                           moved=moved)
        tracker.save()
        status = TaskState.FAILED if bad and task.status is TaskState.COMPLETED else task.status
        store.update(task.id, status=status,
                     reason=f"verify: {len(bad)} bad files" if bad else task.reason,
                     **tracker.summary())
    return VerifyReport(results, bad, moved)


# ---------------------------------------------------------------- fix-progress

@dataclass(frozen=True)
class FixReport:
    task_id: str
    changes: dict[str, int]
    summary: dict[str, int]
    status: TaskState
    rebuilt: bool


def fix_task(store: TaskStore, task: Task) -> FixReport:
    """fix-progress for one task: per-file states and counters from what is on disk."""
    tid = task.id
    with store.lock(tid):
        task = store.get(tid)
        rebuilt = False
        try:
            tracker = FileTracker.load(store.folder(tid), tid)
        except MetadataError:
            tracker, rebuilt = FileTracker.rebuild(store.folder(tid), tid), True
        # a batch task's other batches are on other disks: absent is expected there
        changes = reconcile_with_disk(tracker, Path(task.local_dir),
                                      missing_ok=task.kind == "batch")
        tracker.save()
        summary = tracker.summary()
        status = task.status
        if summary["files_done"] == summary["files_total"]:
            status = TaskState.COMPLETED
        elif status in (TaskState.RUNNING, TaskState.COMPLETED):
            status = TaskState.PAUSED
        store.update(tid, status=status, pid=None, **summary)
    return FixReport(tid, changes, summary, status, rebuilt)


def recover_record(store: TaskStore, default_dir: Callable[[str], Path]
                   ) -> Callable[[str, dict[str, Any]], dict[str, Any] | None]:
    """For TaskStore.rebuild_index: a task record made from the task's file_list.json and what
    the old tasks.json still says of it (its good fields). The target folder is the recorded
    one, else the default folder of the repo when that exists; else None (no record)."""
    def recover(tid: str, old: dict[str, Any]) -> dict[str, Any] | None:
        folder = store.folder(tid)
        try:
            tracker = FileTracker.rebuild(folder, tid)
        except MetadataError:
            return None
        good = {k: v for k, v in old.items() if _field_ok(tid, k, v)}
        if (folder / "batch_plan.json").exists() and "plan_id" not in good:
            return None                     # a batch task: its plan and disks are not known here
        repo_id = str(tracker.meta.get("repo_id") or good.get("repo_id") or "")
        local_dir = good.get("local_dir")
        if not local_dir and repo_id and default_dir(repo_id).is_dir():
            local_dir = str(default_dir(repo_id))
        if not repo_id or not local_dir:
            return None
        return {"id": tid, "status": TaskState.PAUSED.value,
                "reason": "rebuilt by fix-progress", "kind": "download", "repo_id": repo_id,
                "repo_type": tracker.meta.get("repo_type") or "model", "revision": None,
                "include": [], "exclude": [], "commit": tracker.meta.get("commit"),
                **good, "local_dir": local_dir, "files_total": len(tracker.files),
                "bytes_total": sum(f.size for f in tracker.files)}
    return recover


def _field_ok(tid: str, key: str, value: Any) -> bool:
    try:
        Task.from_json({"id": tid, "local_dir": "/", key: value}, "")
    except MetadataError:
        return False
    return True


# ---------------------------------------------------------------- clean

@dataclass(frozen=True)
class Cleaned:
    task_id: str
    status: str
    repo_id: str
    files_deleted: int | None     # None: files kept
    note: str = ""
    kept: tuple[str, ...] = ()    # not deleted: changed since the download


def clean_tasks(store: TaskStore, wanted: set[str], *, include_ended: bool,
                delete_files: bool) -> tuple[list[Cleaned], list[str]]:
    """Remove the records of finished tasks (and, if asked, their files).
    Returns what was removed and the ids skipped because they are running."""
    states = ENDED if include_ended else FINISHED
    removed: list[Cleaned] = []
    running: list[str] = []
    for tid, task in sorted(store.all().items()):
        if (wanted and tid not in wanted) or task.status not in states:
            continue
        try:
            with store.lock(tid):
                cleaned = _clean_one(store, tid, states, delete_files)
        except TaskLockedError:
            running.append(tid)
            continue
        if cleaned is not None:
            removed.append(cleaned)
    return removed, running


def _clean_one(store: TaskStore, tid: str, states: Set[TaskState],
               delete_files: bool) -> Cleaned | None:
    """Remove one task; call with its lock held. None if it started again meanwhile."""
    task = store.all().get(tid)
    if task is None or task.status not in states:
        return None
    deleted, note = None, ""
    kept: tuple[str, ...] = ()
    if delete_files:
        try:
            tracker = FileTracker.load(store.folder(tid), tid)
            result = delete_local_files(tracker, Path(task.local_dir),
                                        own_only=task.kind == "batch")
            deleted, kept = result.removed, tuple(result.kept)
        except MetadataError as exc:
            note = f"files not deleted ({exc})"
    store.remove(tid)
    return Cleaned(tid, task.status.value, task.repo_id, deleted, note, kept)
