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

# the stored plan lives in batch_plan; batch_manager.Plan & co. stay where callers find them
from batch_plan import (LISTING_REF, PLAN_FILE, PLAN_KIND, Plan, load_task_plan,  # noqa: F401
                        new_plan, read_plan_file, save_task_plan, write_plan_file)
from batch_planner import Batch, batch_capacity, text_table
from task_manager import Task, TaskState, TaskStore, log_as
from utils import HFDError, UsageError, format_size

if TYPE_CHECKING:       # at run time these are imported where used: they cost start-up time
    import logging

    from dataset_manager import Listing
    from downloader import Options, RunResult
    from file_tracker import FileTracker

# ================================================================ the batch workflow (I/O)
#
# A batch task is a task of kind "batch": its plan (pinned to one commit) lives in
# tasks/<id>/batch_plan.json beside the usual file list and status. Batch N is downloaded
# into the target folder of the moment; files of other batches are expected to be absent
# (their disk was swapped out), so they are never reported missing nor fetched again.

MARKER_NAME = ".hf-downloader-batch.json"


@dataclass
class BatchRun:
    task: Task
    batch: Batch
    result: RunResult
    warnings: list[str]
    target: str
    progress: dict[str, Any]
    batch_count: int
    left: list[int] = field(default_factory=list)     # batches not complete, after this run
    next_step: str | None = None                      # the command for the next one


class BatchState(str, enum.Enum):
    """The state of one batch, from the states of its files."""
    PENDING = "pending"
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    FAILED = "failed"
    PAUSED = "paused"              # a run of it was stopped (Ctrl-C, SIGTERM, cancel, disk full)
    OVERSIZE = "oversize"          # pending, and bigger than the planned disk


def batch_identity(repo_id: str, repo_type: str, revision: str, include: Sequence[str],
                   exclude: Sequence[str], available: int | None, margin: float,
                   workers: int | None = None) -> dict[str, Any]:
    """What makes two plan-batch/batch-download calls 'the same plan' (the target may vary)."""
    identity = {"kind": "batch", "repo_id": repo_id, "repo_type": repo_type,
                "revision": revision, "include": list(include), "exclude": list(exclude),
                "available_space": available, "safety_margin": margin}
    return identity if workers is None else {**identity, "workers": workers}


def open_batch_task(store: TaskStore, identity: dict[str, Any], plan: Plan,
                    local_dir: Path, endpoint: str) -> Task:
    """Create the task for a new plan: task record, file list and status, batch plan."""
    from file_tracker import FileTracker
    listing = plan.listing()
    task = store.create({**identity, "plan_id": plan.plan_id, "commit": plan.commit,
                         "local_dir": str(local_dir), "batch_count": len(plan.batches),
                         "files_total": len(listing.files), "bytes_total": listing.total_size})
    FileTracker.create(store.folder(task.id), task.id, listing, endpoint)
    save_task_plan(store, task.id, dataclasses.replace(plan, compact=True))
    return task


@dataclass(frozen=True)
class PlanChoice:
    task: Task
    plan: Plan
    reused: bool                 # an existing task's plan (pinned at its commit), not a new one
    replaced: tuple[str, ...] = ()   # unstarted plans of the same repo and folder, removed


def is_unstarted(store: TaskStore, task: Task) -> bool:
    """A batch task that has only been planned: no batch ever started."""
    if task.kind != "batch" or task.status is not TaskState.PENDING:
        return False
    try:
        plan = load_task_plan(store, task.id)
    except HFDError:
        return False
    return not plan.state and plan.current is None


def remove_unstarted(store: TaskStore, tasks: Sequence[Task]) -> list[str]:
    """Remove these plans that nobody started meanwhile (each checked under its lock)."""
    from utils import TaskLockedError
    removed = []
    for task in tasks:
        try:
            with store.lock(task.id):
                now = store.all().get(task.id)
                if now is None or not is_unstarted(store, now):
                    continue
                store.remove(task.id)
        except TaskLockedError:
            continue
        removed.append(task.id)
    return removed


def unstarted_plans(store: TaskStore, repo_id: str | None = None, repo_type: str | None = None,
                    local_dir: str | None = None) -> list[Task]:
    """Unstarted batch plans (of one repo and folder, when given), oldest first."""
    return [t for _, t in sorted(store.all().items())
            if (repo_id is None or (t.repo_id, t.repo_type, t.local_dir) ==
                (repo_id, repo_type, local_dir)) and is_unstarted(store, t)]


def plan_or_reuse(store: TaskStore, identity: dict[str, Any],
                  list_files: Callable[[], tuple[Listing, str]],
                  local_dir: Path | Callable[[str], Path], metadata_dir: Path) -> PlanChoice:
    """The batch task of the same repo, filters, space and margin; planned now if new.
    `local_dir` may depend on the commit planned (a snapshot of the hub cache).

    `list_files` returns (dataset_manager.Listing, endpoint); it is called only when a new plan
    is needed, so reusing a plan needs no network."""
    task = store.find(identity)
    if task is not None:
        return PlanChoice(task, load_task_plan(store, task.id), True)
    import dataset_manager
    listing, endpoint = list_files()
    if callable(local_dir):
        local_dir = local_dir(listing.commit)
    plan = new_plan(listing, identity["available_space"], identity["safety_margin"],
                    workers=identity.get("workers"), endpoint=endpoint,
                    include=tuple(identity["include"]), exclude=tuple(identity["exclude"]))
    with store.creation_lock():        # another process may have planned it meanwhile
        task = store.find(identity)
        if task is not None:
            return PlanChoice(task, load_task_plan(store, task.id), True)
        trials = unstarted_plans(store, identity["repo_id"], identity["repo_type"],
                                 str(local_dir))
        task = open_batch_task(store, identity, plan, local_dir, endpoint)
    dataset_manager.register(metadata_dir, listing)
    # a trial plan of the same repo and folder (another --available-space, margin or filters)
    # that nobody started is replaced, not piled up
    return PlanChoice(task, plan, False, tuple(remove_unstarted(store, trials)))


def held_batches(target: Path, plan: Plan) -> list[int]:
    """The batches of `plan` that the disk at `target` holds, from its marker."""
    marker = read_marker(target) or {"batches": []}
    return sorted({e["batch"] for e in marker["batches"]
                   if e.get("plan_id") == plan.plan_id and isinstance(e.get("batch"), int)})


def _held_text(target: Path, plan: Plan, numbers: list[int], task_id: str) -> str:
    ids = {e.get("task_id") for e in (read_marker(target) or {"batches": []})["batches"]
           if e.get("plan_id") == plan.plan_id} - {None}
    owner = task_id if task_id in ids or not ids else sorted(map(str, ids))[0]
    which = (f"batch {numbers[0]}" if len(numbers) == 1
             else "batches " + ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}")
    return f"{which} of {owner}"


def unfinished(plan: Plan, tracker: FileTracker) -> list[int]:
    """The batches of the plan that are not complete, in order."""
    return [b.number for b in plan.batches
            if batch_progress(b, tracker)["state"] != BatchState.COMPLETED]


def unfinished_of(store: TaskStore, task_id: str, plan: Plan) -> list[int]:
    from file_tracker import FileTracker
    return unfinished(plan, FileTracker.load(store.folder(task_id), task_id))


def continue_command(task_id: str, plan: Plan, number: int) -> str:
    """The command that continues batch `number`: on the disk it started on, if it did."""
    target = plan.target_of(number)
    return f"python main.py batch-continue {task_id} {number}" + (
        f" --local-dir {target}" if target else "")


def next_step(task_id: str, plan: Plan, left: list[int], after: int) -> str | None:
    """What to run next: the first unfinished batch after `after` (else the first of all)."""
    if not left:
        return None
    number = next((n for n in left if n > after), left[0])
    target = plan.target_of(number)
    if target:
        return f"mount the disk of batch {number}, then {continue_command(task_id, plan, number)}"
    return f"swap the disk, then python main.py batch-continue {task_id} {number}"


@dataclass(frozen=True)
class ResumePoint:
    number: int | None               # the batch to continue, None when there is none
    target: str | None
    left: list[int]                  # the batches not complete
    batch_count: int


def resume_point(store: TaskStore, task_id: str) -> ResumePoint:
    """`resume` of a batch task: the unfinished batch whose disk is mounted now (its marker says
    so), preferring the batch started last. Refuses (HFDError) when no such disk is mounted,
    naming the command that works."""
    from file_tracker import FileTracker
    plan = load_task_plan(store, task_id)
    tracker = FileTracker.load(store.folder(task_id), task_id)
    left = unfinished(plan, tracker)
    count = len(plan.batches)
    if not left:
        return ResumePoint(None, None, [], count)
    order = ([plan.current] if plan.current in left else []) + [n for n in left
                                                                 if n != plan.current]
    for number in order:
        target = plan.target_of(number)
        if target and number in held_batches(Path(target), plan):
            return ResumePoint(number, target, left, count)
    task = store.get(task_id)
    here = Path(plan.target_of(plan.current or 0) or task.local_dir)
    held = held_batches(here, plan)
    holds = (f"holds {_held_text(here, plan, held, task_id)}, complete" if held
             else "holds no batch of it")
    current = plan.current or 0         # the batch started last first, if unfinished
    raise HFDError(f"no disk of an unfinished batch of {task_id} is mounted (the disk at {here} "
                   f"{holds}); unfinished: {', '.join(map(str, left))} of {count}",
                   hint=next_step(task_id, plan, left, current - 1 if current in left
                                  else current))


def task_for_plan_file(store: TaskStore, plan: Plan, local_dir: Path,
                       endpoint: str) -> Task:
    """batch-continue plan.json N: this machine's task for that plan, created on first use."""
    task = store.find({"kind": "batch", "plan_id": plan.plan_id})
    if task is not None:
        return task
    identity = batch_identity(plan.repo_id, plan.repo_type, plan.revision, plan.include,
                              plan.exclude, plan.available_space or None, plan.safety_margin,
                              plan.workers)
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
    states = [tracker.state(p) for p in batch.paths]
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


def marker_path(target: Path) -> Path:
    """The marker's file: in the target folder, or in the repo folder of a hub cache snapshot
    (a snapshot holds the repo's files only, as huggingface_hub expects)."""
    from utils import cache_repo_of
    return (cache_repo_of(Path(target)) or Path(target)) / MARKER_NAME


def read_marker(target: Path) -> dict[str, Any] | None:
    """The marker this tool leaves on a batch's disk, or None (no marker, or unreadable)."""
    from utils import read_json
    try:
        marker = read_json(marker_path(target))
    except (HFDError, OSError):
        return None
    return marker if isinstance(marker.get("batches"), list) else None


def write_marker(target: Path, task: Task, plan: Plan, number: int,
                 state: BatchState) -> str:
    """Record on the disk itself which task and batch it holds; returns the disk id."""
    import uuid
    from utils import exclusive_file, now_iso, write_json_atomic
    Path(target).mkdir(parents=True, exist_ok=True)
    # the workers of a --workers plan share one folder: each adds its own entry, none lost
    with exclusive_file(marker_path(target).with_name(MARKER_NAME + ".lock")):
        marker = read_marker(target) or {"disk_id": uuid.uuid4().hex[:12], "batches": []}
        entries = [e for e in marker["batches"]
                   if not (e.get("plan_id") == plan.plan_id and e.get("batch") == number)]
        entries.append({"task_id": task.id, "plan_id": plan.plan_id, "batch": number,
                        "repo_id": plan.repo_id, "commit": plan.commit, "state": state.value,
                        "updated_at": now_iso()})
        marker["batches"] = sorted(entries, key=lambda e: (e.get("plan_id", ""),
                                                           e.get("batch", 0)))
        write_json_atomic(marker_path(target), marker)
    return str(marker["disk_id"])


def marker_has(target: Path, plan: Plan, number: int) -> bool:
    marker = read_marker(target)
    if not marker:
        return False
    return any(e.get("plan_id") == plan.plan_id and e.get("batch") == number
               for e in marker["batches"])


# ---------------------------------------------------------------- running a batch

def run_batch(store: TaskStore, task: Task, number: int, *, target: Path | None,
              endpoint: str, token: str | None, opts: Options, reserve: int,
              log: logging.Logger, stream: TextIO, quiet: bool = False,
              force: bool = False,
              remember: tuple[str, dict[str, Any]] | None = None) -> BatchRun:
    """Download batch N of a batch task onto whatever disk is at the target now.

    A disk whose marker holds other batches of the plan, not N, is refused (HFDError) unless
    `force`: batch N would land beside another batch's files. `remember`: (command, flags
    given), kept by the task for later runs (run_task)."""
    import downloader
    from file_tracker import FileTracker
    from utils import now_iso
    with store.lock(task.id), log_as(task.id):     # the gap warnings name the task too
        plan = load_task_plan(store, task.id)
        batch = plan.batch(number)
        tracker = FileTracker.load(store.folder(task.id), task.id)
        target = Path(target or task.local_dir)
        warnings = []
        held = held_batches(target, plan)
        # a --workers plan's batches go side by side in one folder: no swapped disk to catch
        if held and number not in held and not plan.workers:
            text = (f"{target}: this disk holds {_held_text(target, plan, held, task.id)}; "
                    f"swap the disk or pass --local-dir")
            if not force:
                raise HFDError(text, hint=f"--force writes batch {number} beside it")
            warnings.append(f"{text} (--force: batch {number} goes beside it)")
        warnings += [f"batch {b.number} is not complete ({p['files_done']}/{p['files_total']} "
                     f"files); finish it later with "
                     f"{continue_command(task.id, plan, b.number).removeprefix('python main.py ')}"
                     for b in plan.batches[:number - 1] if not plan.workers
                     for p in [batch_progress(b, tracker)] if p["state"] != BatchState.COMPLETED]
        for w in warnings:
            log.warning(w)
        if plan.workers:        # verify --plan found it missing (no records to mark): fetch it again
            from file_tracker import forget_missing
            if gone := forget_missing(tracker, target, batch.paths):
                log.warning("%d completed files of batch %d are no longer in %s; fetching them "
                            "again", gone, number, target)

        def mark_start() -> None:
            disk_id = write_marker(target, task, plan, number, BatchState.DOWNLOADING)
            plan.state[number] = {**disk_identity(target), "disk_id": disk_id,
                                  "started_at": now_iso(), "completed_at": None}
            plan.current = number
            save_task_plan(store, task.id, plan)

        result = downloader.run_task(store, task, tracker, endpoint=endpoint, token=token,
                                     opts=opts, reserve=reserve, log=log, stream=stream,
                                     quiet=quiet, todo=list(batch.paths), local_dir=target,
                                     before_start=mark_start, remember=remember)
        left = _finish_batch(store, task, plan, batch, tracker, target, result)
        progress = batch_progress(batch, tracker, plan.state.get(number))
    step = (f"once every batch is done, check them all: python main.py verify --plan PLAN "
            f"--local-dir {target}" if plan.workers else next_step(task.id, plan, left, number))
    return BatchRun(store.get(task.id), batch, result, warnings, str(target), progress,
                    len(plan.batches), left, step)


def _finish_batch(store: TaskStore, task: Task, plan: Plan, batch: Batch,
                  tracker: FileTracker, target: Path, result: RunResult) -> list[int]:
    """Record the batch's outcome on the disk and in the plan; the task's state follows.
    Returns the batches not complete."""
    from downloader import bytes_still_needed
    from file_tracker import FileState
    from utils import now_iso
    entry = plan.state.setdefault(batch.number, {"target": str(target)})
    entry.pop("stopped", None)
    if result.stop is not None:
        open_paths = [p for p in batch.paths
                      if tracker.state(p) != FileState.COMPLETED.value]
        needed = sum(tracker.by_path[p].size for p in open_paths)
        entry["stopped"] = {"reason": result.stop.value, "at": now_iso(), "partial_bytes":
                            needed - bytes_still_needed(tracker, target, open_paths)}
    progress = batch_progress(batch, tracker, entry)
    if progress["state"] == BatchState.COMPLETED:
        entry["completed_at"] = now_iso()
        if read_marker(target) is not None or target.exists():
            write_marker(target, task, plan, batch.number, BatchState.COMPLETED)
        if result.status is TaskState.FAILED:
            # failed files of other batches (e.g. marked by verify on a shelved disk) are not
            # this batch's: it is complete
            result.status, result.reason = TaskState.COMPLETED, ""
    save_task_plan(store, task.id, plan)
    left = unfinished(plan, tracker)
    if result.status is not TaskState.COMPLETED:
        return left                     # paused, cancelled or failed: run_task said why
    if left and plan.workers:
        # a worker's task is done when the batches it ran are: the others are other workers'
        mine = [n for n in plan.state if n in left]
        store.update(task.id, status=TaskState.PAUSED if mine else TaskState.COMPLETED,
                     reason=f"batch {batch.number} of {len(plan.batches)} done; the others "
                            f"are other workers' (a --workers plan)")
    elif left:
        step = next_step(task.id, plan, left, batch.number) or ""
        store.update(task.id, status=TaskState.PAUSED,
                     reason=f"batch {batch.number} of {len(plan.batches)} done; next: "
                            + step.split("then python main.py ")[-1])
    elif store.get(task.id).status is not TaskState.COMPLETED:
        store.update(task.id, status=TaskState.COMPLETED, reason="")
    return left


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
    size = (f"of at most {format_size(batch_capacity(task.available_space, task.safety_margin or 0.0))}"
            if task.available_space else f"for {task.extra.get('workers')} workers")
    lines = [f"{task.id}: {task.repo_type} {task.repo_id} @ {str(task.commit)[:12]}, "
             f"{len(rows)} batches {size}"]
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


def verify_plan(plan: Plan, local_dir: Path, *, quick: bool = False,
                workers: int | None = None) -> list[tuple[int, Any]]:
    """verify --plan: every file of the plan checked in `local_dir` (size, and hash unless
    quick), with no task records: the whole result of a cluster run, from any one machine.
    Returns (batch number, file_tracker.CheckResult) per file, in plan order."""
    from concurrent.futures import ThreadPoolExecutor
    import os
    from file_tracker import check_file
    from utils import UnsafePathError, safe_join
    by_path = {f.path: f for f in plan.files}
    todo = [(b.number, by_path[p]) for b in plan.batches for p in b.paths]

    def check(item: tuple[int, Any]) -> tuple[int, Any]:
        number, f = item
        try:
            return number, check_file(safe_join(local_dir, f.path), f, quick=quick)
        except (UnsafePathError, NotADirectoryError) as exc:
            from file_tracker import CheckResult
            return number, CheckResult(f.path, "missing", str(exc))
    with ThreadPoolExecutor(max_workers=workers or max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(check, todo))
