"""Datasets bigger than the disk: the batch workflow on top of the downloader.

A plan (made by batch_planner, pinned to one commit) is stored with its task; each batch is
downloaded onto the disk mounted at the moment, with a marker file saying which batch it holds.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batch_planner import Batch, batch_capacity, plan_batches, text_table
from task_manager import Task, TaskState, TaskStore
from utils import SCHEMA_VERSION, HFDError, MetadataError, UsageError, format_size

if TYPE_CHECKING:       # at run time these are imported where used: they cost start-up time
    import logging

    from dataset_manager import Listing, RemoteFile
    from downloader import Options, RunResult
    from file_tracker import FileTracker

# ================================================================ the batch workflow (I/O)
#
# A batch task is a task of kind "batch": its plan (pinned to one commit) lives in
# tasks/<id>/batch_plan.json beside the usual file list and status. Batch N is downloaded
# into the target folder of the moment; files of other batches are expected to be absent
# (their disk was swapped out), so they are never reported missing nor fetched again.

PLAN_KIND = "hf-downloader-plan"
MARKER_NAME = ".hf-downloader-batch.json"
PLAN_FILE = "batch_plan.json"            # in the task folder, beside file_tracker's files


@dataclass
class BatchRun:
    task: Task
    batch: Batch
    result: RunResult
    warnings: list[str]
    target: str
    progress: dict[str, Any]
    batch_count: int


class BatchState(str, enum.Enum):
    """The state of one batch, from the states of its files."""
    PENDING = "pending"
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    FAILED = "failed"
    PAUSED = "paused"              # a run of it was stopped (Ctrl-C, SIGTERM, cancel, disk full)
    OVERSIZE = "oversize"          # pending, and bigger than the planned disk


_PLAN_ORDER = ("schema_version", "kind", "plan_id", "repo_id", "repo_type", "revision", "commit",
               "available_space", "safety_margin", "capacity", "created_at", "files", "batches",
               "state", "current")


@dataclass
class Plan:
    """A batch plan pinned to one commit: batch_plan.json in the task folder (with `state`, where
    each batch went) and the `plan-batch --output` file (without it).

    The JSON keeps the keys it was read with, in their order (`json_keys`); keys this version does
    not know ride along in `extra`.
    """

    plan_id: str
    repo_id: str
    repo_type: str
    revision: str
    commit: str
    available_space: int
    safety_margin: float
    capacity: int
    files: list[RemoteFile]
    batches: list[Batch]
    state: dict[int, dict[str, Any]] = field(default_factory=dict)  # batch number -> its disk
    current: int | None = None            # the batch started last (resume continues it)
    created_at: str | None = None
    schema_version: int = SCHEMA_VERSION
    json_keys: tuple[str, ...] = field(default=(), repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Any, source: Path | str, hint: str) -> Plan:
        """A plan read from `source`; a missing or wrong-typed field is a MetadataError."""
        from dataset_manager import RemoteFile
        if not isinstance(data, dict):
            raise MetadataError(f"metadata file {source} is not a valid batch plan", hint=hint)
        try:
            files = [RemoteFile(_typed(f, "path", str), _typed(f, "size", int),
                                _typed(f, "blob_id", str), _typed(f, "sha256", str, None))
                     for f in _typed(data, "files", list)]
            state = {int(n): _typed(data["state"], n, dict)
                     for n in _typed(data, "state", dict, {})}
            batches = [Batch.from_dict(b) for b in _typed(data, "batches", list)]
            listed = {f.path for f in files}
            for batch in batches:
                unlisted = [p for p in batch.paths if p not in listed]
                if unlisted:
                    raise ValueError(f"batch {batch.number} names {unlisted[0]!r}, which its "
                                     f"'files' do not list")
            return cls(plan_id=_typed(data, "plan_id", str), repo_id=_typed(data, "repo_id", str),
                       repo_type=_typed(data, "repo_type", str),
                       revision=_typed(data, "revision", str), commit=_typed(data, "commit", str),
                       available_space=_typed(data, "available_space", int),
                       safety_margin=_typed(data, "safety_margin", float),
                       capacity=_typed(data, "capacity", int), files=files,
                       batches=batches,
                       state=state, current=_typed(data, "current", int, None),
                       created_at=_typed(data, "created_at", str, None),
                       schema_version=_typed(data, "schema_version", int, SCHEMA_VERSION),
                       json_keys=tuple(data),
                       extra={k: v for k, v in data.items() if k not in _PLAN_ORDER})
        except (KeyError, TypeError, ValueError, MetadataError) as exc:
            raise MetadataError(f"metadata file {source} is not a valid batch plan ({exc})",
                                hint=hint) from None

    def to_json(self, *, with_state: bool = True) -> dict[str, Any]:
        """The plan as JSON: its keys in the order read (new ones at the end), `kind` included."""
        values: dict[str, Any] = {
            "schema_version": self.schema_version, "kind": PLAN_KIND, "plan_id": self.plan_id,
            "repo_id": self.repo_id, "repo_type": self.repo_type, "revision": self.revision,
            "commit": self.commit, "available_space": self.available_space,
            "safety_margin": self.safety_margin, "capacity": self.capacity,
            "created_at": self.created_at,
            "files": [{"path": f.path, "size": f.size, "blob_id": f.blob_id, "sha256": f.sha256}
                      for f in self.files],
            "batches": [b.to_dict() for b in self.batches],
            "state": {str(n): entry for n, entry in self.state.items()},
            "current": self.current, **self.extra}
        keys = list(self.json_keys) or [k for k in _PLAN_ORDER if k != "current"]
        if "state" not in keys:
            keys.append("state")
        if self.current is not None and "current" not in keys:
            keys.append("current")
        return {k: values[k] for k in keys if with_state or k != "state"}

    def listing(self) -> Listing:
        """The plan's pinned listing, as dataset_manager.Listing."""
        from dataset_manager import Listing
        return Listing(self.repo_id, self.repo_type, self.revision, self.commit, list(self.files))

    def batch(self, number: int) -> Batch:
        if not 1 <= number <= len(self.batches):
            raise UsageError(f"no batch {number}: the plan has batches 1 to {len(self.batches)}")
        return self.batches[number - 1]

    def target_of(self, number: int) -> str | None:
        """The folder batch `number` was last downloaded into, if any."""
        target = self.state.get(number, {}).get("target")
        return target if isinstance(target, str) else None


_MISSING = object()


def _typed(data: dict[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    """data[key], which must be of `kind` (float accepts an int; None only as the default)."""
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {data!r}")
    if key not in data:
        if default is _MISSING:
            raise KeyError(key)
        return default
    value = data[key]
    if value is None and default is None:
        return None
    wanted: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise TypeError(f"{key!r} should be {kind.__name__}, not {value!r}")
    return value


def batch_identity(repo_id: str, repo_type: str, revision: str, include: Sequence[str],
                   exclude: Sequence[str], available: int, margin: float) -> dict[str, Any]:
    """What makes two plan-batch/batch-download calls 'the same plan' (the target may vary)."""
    return {"kind": "batch", "repo_id": repo_id, "repo_type": repo_type, "revision": revision,
            "include": list(include), "exclude": list(exclude), "available_space": available,
            "safety_margin": margin}


def new_plan(listing: Listing, available: int, margin: float) -> Plan:
    """A self-contained plan: the pinned listing and its batches."""
    import uuid
    from utils import now_iso
    capacity = batch_capacity(available, margin)
    return Plan(plan_id=uuid.uuid4().hex, repo_id=listing.repo_id, repo_type=listing.repo_type,
                revision=listing.revision, commit=listing.commit, available_space=available,
                safety_margin=margin, capacity=capacity, created_at=now_iso(),
                files=list(listing.files),
                batches=plan_batches(listing.files, capacity, margin=margin))


_TASK_PLAN_HINT = "run plan-batch again (or restore it from its --output file)"


def read_plan_file(path: str) -> Plan:
    from utils import read_json
    data = read_json(Path(path))
    if data.get("kind") != PLAN_KIND or not isinstance(data.get("batches"), list):
        raise UsageError(f"{path} is not a batch plan written by 'plan-batch --output'")
    return Plan.from_json(data, path, hint="write it again with 'plan-batch --output'")


def write_plan_file(path: str, plan: Plan) -> None:
    from utils import write_json_atomic
    write_json_atomic(Path(path), plan.to_json(with_state=False), indent=None)


def load_task_plan(store: TaskStore, task_id: str) -> Plan:
    from utils import read_json
    path = store.folder(task_id) / PLAN_FILE
    if not path.exists():
        raise UsageError(f"{task_id} is not a batch task",
                         hint="batch commands take the task that plan-batch or batch-download made")
    return Plan.from_json(read_json(path), path, hint=_TASK_PLAN_HINT)


def save_task_plan(store: TaskStore, task_id: str, plan: Plan) -> None:
    from utils import write_json_atomic
    write_json_atomic(store.folder(task_id) / PLAN_FILE, plan.to_json(), indent=None)


def open_batch_task(store: TaskStore, identity: dict[str, Any], plan: Plan,
                    local_dir: Path, endpoint: str) -> Task:
    """Create the task for a new plan: task record, file list and status, batch plan."""
    from file_tracker import FileTracker
    listing = plan.listing()
    task = store.create({**identity, "plan_id": plan.plan_id, "commit": plan.commit,
                         "local_dir": str(local_dir), "batch_count": len(plan.batches),
                         "files_total": len(listing.files), "bytes_total": listing.total_size})
    FileTracker.create(store.folder(task.id), task.id, listing, endpoint)
    save_task_plan(store, task.id, plan)
    return task


@dataclass(frozen=True)
class PlanChoice:
    task: Task
    plan: Plan
    reused: bool                 # an existing task's plan (pinned at its commit), not a new one


def plan_or_reuse(store: TaskStore, identity: dict[str, Any],
                  list_files: Callable[[], tuple[Listing, str]], local_dir: Path,
                  metadata_dir: Path) -> PlanChoice:
    """The batch task of the same repo, filters, space and margin; planned now if new.

    `list_files` returns (dataset_manager.Listing, endpoint); it is called only when a new plan
    is needed, so reusing a plan needs no network."""
    task = store.find(identity)
    if task is not None:
        return PlanChoice(task, load_task_plan(store, task.id), True)
    import dataset_manager
    listing, endpoint = list_files()
    plan = new_plan(listing, identity["available_space"], identity["safety_margin"])
    with store.creation_lock():        # another process may have planned it meanwhile
        task = store.find(identity)
        if task is not None:
            return PlanChoice(task, load_task_plan(store, task.id), True)
        task = open_batch_task(store, identity, plan, local_dir, endpoint)
    dataset_manager.register(metadata_dir, listing)
    return PlanChoice(task, plan, False)


def resume_point(store: TaskStore, task_id: str) -> tuple[int, str | None]:
    """`resume` of a batch task: the batch that was running, and the target it was going to."""
    plan = load_task_plan(store, task_id)
    number = plan.current or 1
    return number, plan.target_of(number)


def task_for_plan_file(store: TaskStore, plan: Plan, local_dir: Path,
                       endpoint: str) -> Task:
    """batch-continue plan.json N: this machine's task for that plan, created on first use."""
    task = store.find({"kind": "batch", "plan_id": plan.plan_id})
    if task is not None:
        return task
    identity = batch_identity(plan.repo_id, plan.repo_type, plan.revision, [], [],
                              plan.available_space, plan.safety_margin)
    with store.creation_lock():        # one task per plan, even for two starts at once
        task = store.find({"kind": "batch", "plan_id": plan.plan_id})
        if task is not None:
            return task
        return open_batch_task(store, identity, dataclasses.replace(plan, state={}), local_dir,
                               endpoint)


# ---------------------------------------------------------------- per-batch state

def batch_progress(batch: Batch, tracker: FileTracker,
                   entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Files and bytes done of one batch, and its state from its files' states. `entry` (the
    plan's record of the batch) says whether its last run was stopped (`stopped`: why) and the
    partial bytes that run kept on the disk: they count as done bytes (never fetched again)."""
    from file_tracker import FileState
    states = [tracker.status[p]["status"] for p in batch.paths]
    done = sum(1 for s in states if s == FileState.COMPLETED.value)
    done_bytes = sum(tracker.by_path[p].size for p, s in zip(batch.paths, states)
                     if s == FileState.COMPLETED.value)
    stopped = (entry or {}).get("stopped") or {}
    stopped = stopped if isinstance(stopped, dict) else {}
    if done == len(states):
        state = BatchState.COMPLETED
    elif FileState.FAILED.value in states:
        state = BatchState.FAILED
    elif stopped:
        state = BatchState.PAUSED
        done_bytes += int(stopped.get("partial_bytes") or 0)
    elif done or FileState.DOWNLOADING.value in states:
        state = BatchState.DOWNLOADING
    else:
        state = BatchState.OVERSIZE if batch.oversize else BatchState.PENDING
    return {"state": state.value, "stopped": stopped.get("reason", "") if stopped else "",
            "files_done": done, "files_total": len(states),
            "bytes_done": min(done_bytes, batch.total_bytes), "bytes_total": batch.total_bytes}


def disk_identity(target: Path) -> dict[str, Any]:
    """Where a batch went: the folder, its filesystem, and the disk id in the tool's marker."""
    import os
    import system_monitor
    usage = system_monitor.disk_usage(target)
    marker = read_marker(target)
    try:
        fsid = os.statvfs(usage.path).f_fsid
    except OSError:
        fsid = 0
    return {"target": str(target), "device": usage.device, "fsid": fsid,
            "mount_point": usage.mount_point, "disk_id": marker.get("disk_id") if marker else None}


def read_marker(target: Path) -> dict[str, Any] | None:
    """The marker this tool leaves on a batch's disk, or None (no marker, or unreadable)."""
    from utils import read_json
    try:
        marker = read_json(Path(target) / MARKER_NAME)
    except (HFDError, OSError):
        return None
    return marker if isinstance(marker.get("batches"), list) else None


def write_marker(target: Path, task: Task, plan: Plan, number: int,
                 state: BatchState) -> str:
    """Record on the disk itself which task and batch it holds; returns the disk id."""
    import uuid
    from utils import now_iso, write_json_atomic
    marker = read_marker(target) or {"disk_id": uuid.uuid4().hex[:12], "batches": []}
    entries = [e for e in marker["batches"]
               if not (e.get("plan_id") == plan.plan_id and e.get("batch") == number)]
    entries.append({"task_id": task.id, "plan_id": plan.plan_id, "batch": number,
                    "repo_id": plan.repo_id, "commit": plan.commit, "state": state.value,
                    "updated_at": now_iso()})
    marker["batches"] = sorted(entries, key=lambda e: (e.get("plan_id", ""), e.get("batch", 0)))
    Path(target).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(target) / MARKER_NAME, marker)
    return marker["disk_id"]


def marker_has(target: Path, plan: Plan, number: int) -> bool:
    marker = read_marker(target)
    if not marker:
        return False
    return any(e.get("plan_id") == plan.plan_id and e.get("batch") == number
               for e in marker["batches"])


# ---------------------------------------------------------------- running a batch

def run_batch(store: TaskStore, task: Task, number: int, *, target: Path | None,
              endpoint: str, token: str | None, opts: Options, reserve: int,
              log: logging.Logger, stream: TextIO, quiet: bool = False) -> BatchRun:
    """Download batch N of a batch task onto whatever disk is at the target now."""
    import downloader
    from file_tracker import FileTracker
    from utils import now_iso
    with store.lock(task.id):
        plan = load_task_plan(store, task.id)
        batch = plan.batch(number)
        tracker = FileTracker.load(store.folder(task.id), task.id)
        target = Path(target or task.local_dir)
        warnings = [f"batch {b.number} is not complete ({p['files_done']}/{p['files_total']} "
                    f"files); finish it later with batch-continue {task.id} {b.number}"
                    for b in plan.batches[:number - 1]
                    for p in [batch_progress(b, tracker)] if p["state"] != BatchState.COMPLETED]
        for w in warnings:
            log.warning(w)

        def mark_start() -> None:
            disk_id = write_marker(target, task, plan, number, BatchState.DOWNLOADING)
            plan.state[number] = {**disk_identity(target), "disk_id": disk_id,
                                  "started_at": now_iso(), "completed_at": None}
            plan.current = number
            save_task_plan(store, task.id, plan)

        result = downloader.run_task(store, task, tracker, endpoint=endpoint, token=token,
                                     opts=opts, reserve=reserve, log=log, stream=stream,
                                     quiet=quiet, todo=list(batch.paths), local_dir=target,
                                     before_start=mark_start)
        _finish_batch(store, task, plan, batch, tracker, target, result)
        progress = batch_progress(batch, tracker, plan.state.get(number))
    return BatchRun(store.get(task.id), batch, result, warnings, str(target), progress,
                    len(plan.batches))


def _finish_batch(store: TaskStore, task: Task, plan: Plan, batch: Batch,
                  tracker: FileTracker, target: Path, result: RunResult) -> None:
    """Record the batch's outcome on the disk and in the plan; the task's state follows."""
    from downloader import bytes_still_needed
    from file_tracker import FileState
    from utils import now_iso
    entry = plan.state.setdefault(batch.number, {"target": str(target)})
    entry.pop("stopped", None)
    if result.stop is not None:
        unfinished = [p for p in batch.paths
                      if tracker.status[p]["status"] != FileState.COMPLETED.value]
        needed = sum(tracker.by_path[p].size for p in unfinished)
        entry["stopped"] = {"reason": result.stop.value, "at": now_iso(), "partial_bytes":
                            needed - bytes_still_needed(tracker, target, unfinished)}
    progress = batch_progress(batch, tracker, entry)
    if progress["state"] == BatchState.COMPLETED:
        entry["completed_at"] = now_iso()
        if read_marker(target) is not None or target.exists():
            write_marker(target, task, plan, batch.number, BatchState.COMPLETED)
    save_task_plan(store, task.id, plan)
    if result.status is not TaskState.COMPLETED:
        return                          # paused, cancelled or failed: run_task said why
    batches = plan.batches
    left = [b.number for b in batches
            if batch_progress(b, tracker)["state"] != BatchState.COMPLETED]
    if left:
        store.update(task.id, status=TaskState.PAUSED,
                     reason=f"batch {batch.number} of {len(batches)} done; next: batch-continue "
                            f"{task.id} {left[0]}")


def batch_rows(store: TaskStore, task: Task) -> list[dict[str, Any]]:
    """batch-status: one row per batch, with where it went and whether that disk is here now."""
    from file_tracker import FileTracker
    plan = load_task_plan(store, task.id)
    tracker = FileTracker.load(store.folder(task.id), task.id)
    rows = []
    for b in plan.batches:
        where = plan.state.get(b.number, {})
        target = plan.target_of(b.number)
        rows.append({"batch": b.number, **batch_progress(b, tracker, where),
                     "oversize": b.oversize,
                     "needed_space": b.needed_space, "first_path": b.first_path,
                     "last_path": b.last_path, "target": target,
                     "disk_id": where.get("disk_id"), "device": where.get("device"),
                     "mount_point": where.get("mount_point"),
                     "started_at": where.get("started_at"),
                     "completed_at": where.get("completed_at"),
                     "disk_present": marker_has(Path(target), plan, b.number) if target else False})
    return rows


def format_batch_rows(task: Task, rows: list[dict[str, Any]]) -> str:
    lines = [f"{task.id}: {task.repo_type} {task.repo_id} @ "
             f"{str(task.commit)[:12]}, {len(rows)} batches of at most "
             f"{format_size(batch_capacity(task.available_space or 0, task.safety_margin or 0.0))}"]
    table = []
    for r in rows:
        state = r["state"] + (f" ({r['stopped']})" if r.get("stopped") else "")
        state += (f" (needs a {format_size(r['needed_space'])} disk)"
                  if r["oversize"] and r["state"] != BatchState.COMPLETED else "")
        where = "-"
        if r["target"]:
            where = (f"{r['target']} [disk {r['disk_id'] or '?'} on {r['mount_point']}]"
                     f"{' (mounted now)' if r['disk_present'] else ''}")
        table.append([str(r["batch"]), state, f"{r['files_done']}/{r['files_total']}",
                      f"{format_size(r['bytes_done'])} / {format_size(r['bytes_total'])}", where])
    lines += text_table(["BATCH", "STATE", "FILES", "BYTES", "WHERE"], table, {0, 2, 3})
    return "\n".join(lines)


def batch_on_disk(store: TaskStore, task: Task, number: int | None,
                  local_dir: Path | None) -> tuple[list[str], Path]:
    """verify --batch N: the batch's files and its folder; the disk's marker must name it."""
    if task.kind != "batch":
        raise UsageError(f"{task.id} is not a batch task; verify it without --batch")
    if not number:
        raise UsageError(f"{task.id} is a batch task: say which batch to check",
                         hint=f"python main.py verify {task.id} --batch N (batch-status "
                              f"shows the batches)")
    plan = load_task_plan(store, task.id)
    batch = plan.batch(number)
    folder = Path(local_dir or plan.target_of(number) or task.local_dir)
    if not marker_has(folder, plan, number):
        holds = ", ".join(f"batch {e.get('batch')} of {e.get('task_id')}"
                          for e in (read_marker(folder) or {}).get("batches", []))
        raise HFDError(f"the disk at {folder} does not hold batch {number} of {task.id} "
                       f"(it holds {holds or 'no batch of this tool'})",
                       hint="mount the disk of that batch there, or give its folder with "
                            "--local-dir")
    return list(batch.paths), folder
