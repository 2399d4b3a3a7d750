"""Tasks: ids, tasks.json, task folders, find-or-create, the per-task lock and lifecycle states."""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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


FINISHED = frozenset({TaskState.COMPLETED})
ENDED = frozenset({TaskState.COMPLETED, TaskState.CANCELLED, TaskState.FAILED})


# ================================================================ the task record

_INT_FIELDS = frozenset({"files_total", "files_done", "files_failed", "bytes_total",
                         "bytes_done"})
_OPT_INT_FIELDS = frozenset({"pid", "batch_count", "available_space"})


@dataclass(frozen=True)
class Task:
    """One task record, as in tasks.json and tasks/<id>/task_metadata.json.

    The JSON keeps exactly the keys it had (in their order): `json_keys` remembers them, so a
    record written before a key existed is written back without it, and keys this version does
    not know are carried in `extra` unchanged.
    """

    id: str
    status: TaskState = TaskState.PENDING
    reason: str = ""
    kind: str | None = None                 # "download" or "batch"
    repo_id: str = ""
    repo_type: str = ""
    revision: str | None = None
    local_dir: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    commit: str | None = None
    files_total: int = 0
    files_done: int = 0
    files_failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    tool: str | None = None
    pid: int | None = None
    endpoint: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    finished_at: str | None = None
    plan_id: str | None = None              # batch tasks: the plan they run
    batch_count: int | None = None
    available_space: int | None = None
    safety_margin: float | None = None
    # the run flags given to download (or a batch command), used by later runs unless
    # overridden: {"command": "download", "flags": {"tool": "wget", "jobs": 4}}
    options: Mapping[str, Any] | None = None
    json_keys: tuple[str, ...] = field(default=(), repr=False, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any, source: Path | str) -> Task:
        """A record read from `source`; a wrong type is a MetadataError naming the file."""
        if not isinstance(data, dict):
            raise MetadataError(f"metadata file {source} has a task record that is not an object",
                                hint=_INDEX_HINT)
        known, extra = {}, {}
        for key, value in data.items():
            if key in _FIELDS:
                try:
                    known[key] = _convert(key, value)
                except (TypeError, ValueError) as exc:
                    raise MetadataError(f"metadata file {source}: task {data.get('id')!r} has a "
                                        f"bad {key!r} ({exc})", hint=_INDEX_HINT) from None
            else:
                extra[key] = value
        if "id" not in known:
            raise MetadataError(f"metadata file {source} has a task record without an id",
                                hint=_INDEX_HINT)
        if known.get("kind") and not known.get("local_dir"):
            # without it, resume, verify and clean would work on the current folder
            raise MetadataError(f"metadata file {source}: task {known['id']!r} has no 'local_dir'",
                                hint=_INDEX_HINT)
        return cls(**known, json_keys=tuple(data), extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON: the same keys, in the same order, as it was read or made with."""
        out: dict[str, Any] = {}
        for key in self.json_keys:
            if key in _FIELDS:
                value = getattr(self, key)
                out[key] = (value.value if isinstance(value, TaskState)
                            else list(value) if isinstance(value, tuple) else value)
            else:
                out[key] = self.extra[key]
        return out

    def changed(self, **fields: Any) -> Task:
        """A copy with `fields` set (JSON values or typed ones); new keys go at the end."""
        known = {k: _convert(k, v) for k, v in fields.items() if k in _FIELDS}
        extra = {**self.extra, **{k: v for k, v in fields.items() if k not in _FIELDS}}
        keys = self.json_keys + tuple(k for k in fields if k not in self.json_keys)
        return dataclasses.replace(self, **known, json_keys=keys, extra=extra)

    def matches(self, identity: Mapping[str, Any]) -> bool:
        """Whether every item of `identity` (JSON values) is what this record says."""
        record = self.to_json()
        return all(record.get(k) == v for k, v in identity.items())


_FIELDS = frozenset(f.name for f in dataclasses.fields(Task)) - {"json_keys", "extra"}


_STATE_VALUES = frozenset(s.value for s in TaskState)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _convert(key: str, value: Any) -> Any:
    """A JSON value checked (and, for state and lists, converted) for the field `key`."""
    if key == "id":
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if key == "status":
        if isinstance(value, TaskState):
            return value
        if value not in _STATE_VALUES:
            raise ValueError(f"expected one of {', '.join(sorted(_STATE_VALUES))}, got {value!r}")
        return TaskState(value)
    if key in ("include", "exclude"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"expected a list of strings, got {value!r}")
        return tuple(value)
    if key == "options":
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"expected an object or null, got {value!r}")
        return None if value is None else dict(value)
    if key == "safety_margin":
        ok, wanted = value is None or _is_number(value), "a number or null"
    elif key in _INT_FIELDS:
        ok, wanted = _is_int(value), "an integer"
    elif key in _OPT_INT_FIELDS:
        ok, wanted = value is None or _is_int(value), "an integer or null"
    else:
        ok, wanted = value is None or isinstance(value, str), "a string or null"
    if not ok:
        raise TypeError(f"expected {wanted}, got {value!r}")
    return value


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

    def all(self) -> dict[str, Task]:
        try:
            records = self._read_index()["tasks"]
        except MetadataError as exc:
            raise MetadataError(str(exc), hint=_INDEX_HINT) from None
        return {tid: Task.from_json(record, self.index) for tid, record in records.items()}

    def get(self, task_id: str) -> Task:
        task_id = normalize_id(task_id)
        task = self.all().get(task_id)
        if task is None:
            raise UsageError(f"no task {task_id} in {self.root}",
                             hint="'python main.py list-tasks' shows the tasks there; "
                                  "--metadata-dir or METADATA_DIR names another folder")
        return task

    def create(self, spec: Mapping[str, Any]) -> Task:
        """Add a task with the next id (task_001, task_002, ...)."""
        with self._index_lock():
            data = self._read_index()
            number = max(int(data.get("next_id", 1)), _highest_id(data["tasks"]) + 1)
            task_id = f"task_{number:03d}"
            stamp = now_iso()
            task = Task.from_json({"id": task_id, "status": TaskState.PENDING.value,
                                   "reason": "", "created_at": stamp, "updated_at": stamp,
                                   **spec}, self.index)
            data["tasks"][task_id] = task.to_json()
            data["next_id"] = number + 1
            self.folder(task_id).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.index, data)
        self.write_metadata(task)
        return task

    def update(self, task_id: str, **fields: Any) -> Task:
        """Change fields of a task in tasks.json and task_metadata.json; returns the new record."""
        with self._index_lock():
            data = self._read_index()
            record = data["tasks"].get(task_id)
            if record is None:
                raise UsageError(f"no task {task_id} in {self.root}")
            task = Task.from_json(record, self.index).changed(**fields, updated_at=now_iso())
            data["tasks"][task_id] = task.to_json()
            write_json_atomic(self.index, data)
        self.write_metadata(task)
        return task

    def remove(self, task_id: str) -> None:
        with self._index_lock():
            data = self._read_index()
            data["tasks"].pop(task_id, None)
            write_json_atomic(self.index, data)
        shutil.rmtree(self.folder(task_id), ignore_errors=True)

    def find(self, identity: Mapping[str, Any]) -> Task | None:
        """The newest task whose fields match every item of `identity` (JSON values), if any."""
        matches = [t for t in self.all().values() if t.matches(identity)]
        return max(matches, key=lambda t: t.id) if matches else None

    def rebuild_index(self, recover: Callable[[str, dict[str, Any]], dict[str, Any] | None]
                      | None = None, notes: list[str] | None = None) -> list[str]:
        """fix-progress: rebuild tasks.json from each task folder's task_metadata.json.

        A folder whose task_metadata.json is unreadable keeps its task when the old tasks.json
        still holds a good record of it, or when `recover(task_id, old_record)` makes one (from
        file_list.json); else it is moved aside to `<id>.dropped`. Each is said in `notes`."""
        notes = [] if notes is None else notes
        with self._index_lock():
            old = _readable_records(self.index)
            tasks: dict[str, Any] = {}
            folder = self.root / "tasks"
            found = sorted(p for p in folder.iterdir()
                           if p.is_dir() and _TASK_DIR.fullmatch(p.name)) if folder.is_dir() else []
            for task_dir in found:
                tid, meta = task_dir.name, task_dir / "task_metadata.json"
                try:
                    data = read_json(meta)
                    data.pop("schema_version", None)
                    if data.get("id") != tid:
                        raise MetadataError(f"metadata file {meta} is of task {data.get('id')!r}")
                    Task.from_json(data, meta)  # a record of the wrong shape would break commands
                    tasks[tid] = data
                    continue
                except MetadataError as exc:
                    why = str(exc)
                record, source = old.get(tid), str(self.index)
                if record is not None and not _valid(record, tid):
                    record = None
                if record is None and recover is not None:
                    record, source = recover(tid, old.get(tid) or {}), "file_list.json"
                if record is not None and _valid(record, tid):
                    tasks[tid] = record
                    notes.append(f"{tid}: rebuilt from {source} ({why})")
                    continue
                aside = _free_name(task_dir.with_name(tid + ".dropped"))
                task_dir.rename(aside)
                notes.append(f"{tid}: dropped: {why}; neither {self.index.name} nor its "
                             f"file_list.json could rebuild it (its metadata is kept in {aside})")
            write_json_atomic(self.index, {"schema_version": SCHEMA_VERSION,
                                           "next_id": _highest_id(tasks) + 1, "tasks": tasks})
        for tid in tasks:
            if any(n.startswith(f"{tid}: rebuilt") for n in notes):
                self.write_metadata(Task.from_json(tasks[tid], self.index))
        return sorted(tasks)

    def index_ok(self) -> bool:
        """Whether tasks.json reads, and every record in it has the right shape."""
        try:
            self.all()
        except MetadataError:
            return False
        return True

    def live(self, task: Task) -> Task:
        """The task as it stands now: one recorded as running whose process is gone (kill -9,
        reboot) was interrupted."""
        if task.status is TaskState.RUNNING and not self.is_locked(task.id):
            task = task.changed(status=TaskState.PAUSED, reason="interrupted (the process died)")
        return task

    # ------------------------------------------------------------ the task folder

    def folder(self, task_id: str) -> Path:
        """metadata/tasks/<id>/: the folder holding everything recorded about one task."""
        return self.root / "tasks" / task_id

    def paths(self, task_id: str) -> TaskPaths:
        return TaskPaths(self.folder(task_id))

    def write_metadata(self, task: Task) -> None:
        write_json_atomic(self.paths(task.id).metadata,
                          {"schema_version": SCHEMA_VERSION, **task.to_json()})

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
        """Whether a process holds the task, probed read-only: a reader (status, list-tasks)
        creates no file and works on a read-only metadata folder."""
        import fcntl
        try:
            fd = os.open(self.paths(task_id).lock, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False                 # never locked: the lock file is made by the first lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)                 # closing drops our probe's own flock too
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


_TASK_DIR = re.compile(r"task_\d+")


def _readable_records(index: Path) -> dict[str, Any]:
    """The task records of a tasks.json that may be damaged: whatever still reads."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    return {k: v for k, v in tasks.items() if isinstance(v, dict)} if isinstance(tasks, dict) else {}


def _valid(record: dict[str, Any], task_id: str) -> bool:
    try:
        return Task.from_json(record, "").id == task_id
    except MetadataError:
        return False


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


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
    tid = task.id
    if task.status is TaskState.COMPLETED:
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
            store.update(tid, status=TaskState.CANCELLED, reason="cancelled by the user",
                         pid=None)
    except TaskLockedError:
        raise HFDError(f"{tid} just started running; run cancel again") from None
    return CancelOutcome(tid, False, None)


# ================================================================ the task tag of log lines

_running: list[str] = []      # the task this process is running (a plain list: worker threads see it)


@contextlib.contextmanager
def log_as(task_id: str) -> Iterator[None]:
    """Every log line written meanwhile, from any thread, names the task (see TaskTag)."""
    _running.append(task_id)
    try:
        yield
    finally:
        _running.pop()


class TaskTag(logging.Filter):
    """Gives each record `task`: "task_001: " while a task runs, else "" (for a handler's
    format), so the task id is on every line of a task without hand-written prefixes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.task = f"{_running[-1]}: " if _running else ""
        return True
