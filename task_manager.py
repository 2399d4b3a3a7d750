"""Tasks: ids, tasks.json, task folders, find-or-create, the per-task lock and lifecycle states."""
from __future__ import annotations

import contextlib
import enum
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from utils import (SCHEMA_VERSION, HFDError, MetadataError, TaskLockedError, UsageError, now_iso,
                   read_json, write_json_atomic)


class TaskState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"


class StopReason(str, enum.Enum):
    """Why a run stopped before its end (the first reason wins); a paused or cancelled task."""
    INTERRUPTED = "interrupted"
    TERMINATED = "terminated"
    CANCELLED = "cancelled"
    DISK_FULL = "disk_full"


FINISHED = {TaskState.COMPLETED.value}
ENDED = {TaskState.COMPLETED.value, TaskState.CANCELLED.value, TaskState.FAILED.value}


@dataclass(frozen=True)
class TaskPaths:
    """The files of a task folder that task_manager owns (file_tracker and batch_manager name
    their own files in the same folder)."""

    root: Path

    @property
    def metadata(self) -> Path:
        return self.root / "task_metadata.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def owner(self) -> Path:
        return self.root / "owner.json"

    @property
    def cancel_flag(self) -> Path:
        return self.root / "cancel-requested"


class TaskStore:
    """tasks.json (the index) and metadata/tasks/<id>/ (the details)."""

    def __init__(self, metadata_dir: Path) -> None:
        self.root = Path(metadata_dir)
        self.index = self.root / "tasks.json"

    # ------------------------------------------------------------ the index

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        from filelock import FileLock
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.index) + ".lock", timeout=60):
            yield

    @contextlib.contextmanager
    def creation_lock(self) -> Iterator[None]:
        """Held around find-or-create (and taking the new task's lock), so two processes
        starting the same download never both create a task."""
        from filelock import FileLock, Timeout
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / "tasks.create.lock"), timeout=120)
        try:
            lock.acquire()
        except Timeout:
            raise TaskLockedError(f"another process has been creating a task in {self.root} "
                                  f"for 2 minutes", hint="try again when it is done") from None
        try:
            yield
        finally:
            lock.release()

    def _read_index(self) -> dict[str, Any]:
        data = read_json(self.index, default={"schema_version": SCHEMA_VERSION, "next_id": 1,
                                              "tasks": {}})
        if not isinstance(data.get("tasks"), dict) or not all(
                isinstance(t, dict) for t in data["tasks"].values()):
            raise MetadataError(f"metadata file {self.index} has no valid 'tasks' object",
                                hint=_INDEX_HINT)
        return data

    def all(self) -> dict[str, dict[str, Any]]:
        try:
            return self._read_index()["tasks"]
        except MetadataError as exc:
            raise MetadataError(str(exc), hint=_INDEX_HINT) from None

    def get(self, task_id: str) -> dict[str, Any]:
        task_id = normalize_id(task_id)
        task = self.all().get(task_id)
        if task is None:
            raise UsageError(f"no task {task_id}", hint="'python main.py list-tasks' shows the tasks")
        return task

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Add a task with the next id (task_001, task_002, ...)."""
        with self._index_lock():
            data = self._read_index()
            number = max(int(data.get("next_id", 1)), _highest_id(data["tasks"]) + 1)
            task_id = f"task_{number:03d}"
            stamp = now_iso()
            task = {"id": task_id, "status": TaskState.PENDING.value, "reason": "",
                    "created_at": stamp, "updated_at": stamp, **spec}
            data["tasks"][task_id] = task
            data["next_id"] = number + 1
            self.folder(task_id).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.index, data)
        self.write_metadata(task)
        return task

    def update(self, task_id: str, **fields: Any) -> dict[str, Any]:
        """Change fields of a task in tasks.json and task_metadata.json."""
        with self._index_lock():
            data = self._read_index()
            task = data["tasks"].get(task_id)
            if task is None:
                raise UsageError(f"no task {task_id}")
            task.update(fields)
            task["updated_at"] = now_iso()
            write_json_atomic(self.index, data)
        self.write_metadata(task)
        return task

    def remove(self, task_id: str) -> None:
        with self._index_lock():
            data = self._read_index()
            data["tasks"].pop(task_id, None)
            write_json_atomic(self.index, data)
        shutil.rmtree(self.folder(task_id), ignore_errors=True)

    def find(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The newest task whose fields match every item of `identity`, if any."""
        matches = [t for t in self.all().values()
                   if all(t.get(k) == v for k, v in identity.items())]
        return max(matches, key=lambda t: t["id"]) if matches else None

    def rebuild_index(self) -> list[str]:
        """fix-progress: rebuild tasks.json from each task folder's task_metadata.json."""
        with self._index_lock():
            tasks: dict[str, Any] = {}
            folder = self.root / "tasks"
            for meta in sorted(folder.glob("task_*/task_metadata.json")) if folder.is_dir() else []:
                try:
                    data = read_json(meta)
                except MetadataError:
                    continue
                data.pop("schema_version", None)
                if data.get("id") == meta.parent.name:
                    tasks[data["id"]] = data
            write_json_atomic(self.index, {"schema_version": SCHEMA_VERSION,
                                           "next_id": _highest_id(tasks) + 1, "tasks": tasks})
        return sorted(tasks)

    def index_ok(self) -> bool:
        try:
            self._read_index()
        except MetadataError:
            return False
        return True

    def live(self, task: dict[str, Any]) -> dict[str, Any]:
        """The task as it stands now: one recorded as running whose process is gone (kill -9,
        reboot) was interrupted."""
        if task.get("status") == TaskState.RUNNING.value and not self.is_locked(task["id"]):
            task = {**task, "status": TaskState.PAUSED.value,
                    "reason": "interrupted (the process died)"}
        return task

    # ------------------------------------------------------------ the task folder

    def folder(self, task_id: str) -> Path:
        """metadata/tasks/<id>/: the folder holding everything recorded about one task."""
        return self.root / "tasks" / task_id

    def paths(self, task_id: str) -> TaskPaths:
        return TaskPaths(self.folder(task_id))

    def write_metadata(self, task: dict[str, Any]) -> None:
        write_json_atomic(self.paths(task["id"]).metadata,
                          {"schema_version": SCHEMA_VERSION, **task})

    # ------------------------------------------------------------ lock and cancel

    @contextlib.contextmanager
    def lock(self, task_id: str) -> Iterator[None]:
        """Hold the task for this process; a second process is refused at once.

        The lock is a flock, so the kernel drops it when the holder dies (even kill -9):
        a stale lock never needs cleaning up.
        """
        from filelock import FileLock, Timeout
        paths = self.paths(task_id)
        paths.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(paths.lock), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise TaskLockedError(f"{task_id} is being run by another process "
                                  f"(PID {self.owner_pid(task_id) or 'unknown'})",
                                  hint=f"wait for it, or stop it with 'python main.py cancel "
                                       f"{task_id}'") from None
        try:
            write_json_atomic(paths.owner, {"pid": os.getpid(), "since": now_iso()})
            yield
        finally:
            with contextlib.suppress(OSError):
                paths.owner.unlink()
            lock.release()

    def owner_pid(self, task_id: str) -> int | None:
        try:
            return int(read_json(self.paths(task_id).owner).get("pid"))
        except (MetadataError, TypeError, ValueError):
            return None

    def is_locked(self, task_id: str) -> bool:
        from filelock import FileLock, Timeout
        lock = FileLock(str(self.paths(task_id).lock), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        lock.release()
        return False

    def request_cancel(self, task_id: str) -> None:
        flag = self.paths(task_id).cancel_flag
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text(now_iso())

    def cancel_requested(self, task_id: str) -> bool:
        return self.paths(task_id).cancel_flag.exists()

    def clear_cancel(self, task_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.paths(task_id).cancel_flag.unlink()


_INDEX_HINT = ("run 'python main.py fix-progress' to rebuild it from the task folders "
               "(metadata/tasks/*/task_metadata.json)")


def normalize_id(task_id: str) -> str:
    """'task_001', '1', '001' -> 'task_001'."""
    text = str(task_id).strip()
    digits = text[5:] if text.startswith("task_") else text
    if not digits.isdigit():
        raise UsageError(f"invalid task id {task_id!r}", hint="task ids look like task_001")
    return f"task_{int(digits):03d}"


def _highest_id(tasks: dict[str, Any]) -> int:
    numbers = [int(k[5:]) for k in tasks if k.startswith("task_") and k[5:].isdigit()]
    return max(numbers, default=0)


# ================================================================ cancel

@dataclass(frozen=True)
class CancelOutcome:
    task_id: str
    was_running: bool        # a running download was asked to stop, and did
    pid: int | None          # the process that was running it, if known


def cancel(store: TaskStore, task_id: str, wait: float, *,
           on_asked: Callable[[str, int | None], None] | None = None,
           clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> CancelOutcome:
    """Cancel a task: a running one is asked to stop (through its cancel flag) and waited for
    up to `wait` seconds; an idle one is marked cancelled under its lock. Bytes are kept."""
    task = store.get(normalize_id(task_id))
    tid = task["id"]
    if task.get("status") == TaskState.COMPLETED.value:
        raise HFDError(f"{tid} is already completed; nothing to cancel")
    if store.is_locked(tid):
        pid = store.owner_pid(tid)
        store.request_cancel(tid)
        if on_asked is not None:
            on_asked(tid, pid)
        deadline = clock() + wait
        while store.is_locked(tid) and clock() < deadline:
            sleep(0.2)
        if store.is_locked(tid):
            raise HFDError(f"{tid} is still running after {wait:g} s",
                           hint=f"it will stop at its next check; or end PID {pid} with kill")
        return CancelOutcome(tid, True, pid)
    try:
        with store.lock(tid):
            store.clear_cancel(tid)
            store.update(tid, status=TaskState.CANCELLED.value, reason="cancelled by the user",
                         pid=None)
    except TaskLockedError:
        raise HFDError(f"{tid} just started running; run cancel again") from None
    return CancelOutcome(tid, False, None)
