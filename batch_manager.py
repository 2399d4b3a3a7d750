"""Datasets bigger than the disk: the batch workflow on top of the downloader.

A plan (made by batch_planner, pinned to one commit) is stored with its task; each batch is
downloaded onto the disk mounted at the moment, with a marker file saying which batch it holds.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_planner import Batch, batch_capacity, plan_batches, text_table
from utils import HFDError, MetadataError, UsageError, format_size

# ================================================================ the batch workflow (I/O)
#
# A batch task is a task of kind "batch": its plan (pinned to one commit) lives in
# tasks/<id>/batch_plan.json beside the usual file list and status. Batch N is downloaded
# into the target folder of the moment; files of other batches are expected to be absent
# (their disk was swapped out), so they are never reported missing nor fetched again.

PLAN_KIND = "hf-downloader-plan"
MARKER_NAME = ".hf-downloader-batch.json"
PLAN_FILE = "batch_plan.json"            # in the task folder, beside file_tracker's files
BATCH_STATES = ("pending", "downloading", "completed", "failed", "oversize")


@dataclass
class BatchRun:
    task: dict
    batch: Batch
    result: Any                  # downloader.RunResult
    warnings: list[str]
    target: str
    progress: dict[str, Any]
    batch_count: int


def batch_identity(repo_id: str, repo_type: str, revision: str, include: Sequence[str],
                   exclude: Sequence[str], available: int, margin: float) -> dict[str, Any]:
    """What makes two plan-batch/batch-download calls 'the same plan' (the target may vary)."""
    return {"kind": "batch", "repo_id": repo_id, "repo_type": repo_type, "revision": revision,
            "include": list(include), "exclude": list(exclude), "available_space": available,
            "safety_margin": margin}


def new_plan(listing: Any, available: int, margin: float) -> dict[str, Any]:
    """A self-contained plan: the pinned listing and its batches."""
    import uuid
    from utils import SCHEMA_VERSION, now_iso
    capacity = batch_capacity(available, margin)
    batches = plan_batches(listing.files, capacity, margin=margin)
    return {"schema_version": SCHEMA_VERSION, "kind": PLAN_KIND, "plan_id": uuid.uuid4().hex,
            "repo_id": listing.repo_id, "repo_type": listing.repo_type,
            "revision": listing.revision, "commit": listing.commit,
            "available_space": available, "safety_margin": margin, "capacity": capacity,
            "created_at": now_iso(),
            "files": [{"path": f.path, "size": f.size, "blob_id": f.blob_id, "sha256": f.sha256}
                      for f in listing.files],
            "batches": [b.to_dict() for b in batches], "state": {}}


def plan_batches_of(plan: dict[str, Any]) -> list[Batch]:
    return [Batch.from_dict(b) for b in plan["batches"]]


def plan_listing(plan: dict[str, Any]) -> Any:
    """The plan's pinned listing, as dataset_manager.Listing."""
    from dataset_manager import Listing, RemoteFile
    try:
        files = [RemoteFile(f["path"], int(f["size"]), f["blob_id"], f.get("sha256"))
                 for f in plan["files"]]
        return Listing(plan["repo_id"], plan["repo_type"], plan["revision"], plan["commit"], files)
    except (KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"the batch plan has a bad file entry ({exc})") from None


def read_plan_file(path: str) -> dict[str, Any]:
    from utils import read_json
    plan = read_json(Path(path))
    if plan.get("kind") != PLAN_KIND or not isinstance(plan.get("batches"), list):
        raise UsageError(f"{path} is not a batch plan written by 'plan-batch --output'")
    return plan


def write_plan_file(path: str, plan: dict[str, Any]) -> None:
    from utils import write_json_atomic
    write_json_atomic(Path(path), {k: v for k, v in plan.items() if k != "state"}, indent=None)


def load_task_plan(store: Any, task_id: str) -> dict[str, Any]:
    from utils import read_json
    path = store.folder(task_id) / PLAN_FILE
    if not path.exists():
        raise UsageError(f"{task_id} is not a batch task",
                         hint="batch commands take the task that plan-batch or batch-download made")
    plan = read_json(path)
    if not isinstance(plan.get("batches"), list) or not isinstance(plan.get("state", {}), dict):
        raise MetadataError(f"metadata file {path} is not a valid batch plan",
                            hint="run plan-batch again (or restore it from its --output file)")
    plan.setdefault("state", {})
    return plan


def save_task_plan(store: Any, task_id: str, plan: dict[str, Any]) -> None:
    from utils import write_json_atomic
    write_json_atomic(store.folder(task_id) / PLAN_FILE, plan, indent=None)


def open_batch_task(store: Any, identity: dict[str, Any], plan: dict[str, Any], local_dir: Path,
                    endpoint: str) -> dict[str, Any]:
    """Create the task for a new plan: task record, file list and status, batch plan."""
    from file_tracker import FileTracker
    listing = plan_listing(plan)
    task = store.create({**identity, "plan_id": plan["plan_id"], "commit": plan["commit"],
                         "local_dir": str(local_dir), "batch_count": len(plan["batches"]),
                         "files_total": len(listing.files), "bytes_total": listing.total_size})
    FileTracker.create(store.folder(task["id"]), task["id"], listing, endpoint)
    save_task_plan(store, task["id"], plan)
    return task


@dataclass(frozen=True)
class PlanChoice:
    task: dict[str, Any]
    plan: dict[str, Any]
    reused: bool                 # an existing task's plan (pinned at its commit), not a new one


def plan_or_reuse(store: Any, identity: dict[str, Any],
                  list_files: Callable[[], tuple[Any, str]], local_dir: Path,
                  metadata_dir: Path) -> PlanChoice:
    """The batch task of the same repo, filters, space and margin; planned now if new.

    `list_files` returns (dataset_manager.Listing, endpoint); it is called only when a new plan
    is needed, so reusing a plan needs no network."""
    task = store.find(identity)
    if task is not None:
        return PlanChoice(task, load_task_plan(store, task["id"]), True)
    import dataset_manager
    listing, endpoint = list_files()
    plan = new_plan(listing, identity["available_space"], identity["safety_margin"])
    with store.creation_lock():        # another process may have planned it meanwhile
        task = store.find(identity)
        if task is not None:
            return PlanChoice(task, load_task_plan(store, task["id"]), True)
        task = open_batch_task(store, identity, plan, local_dir, endpoint)
    dataset_manager.register(metadata_dir, listing)
    return PlanChoice(task, plan, False)


def resume_point(store: Any, task_id: str) -> tuple[int, str | None]:
    """`resume` of a batch task: the batch that was running, and the target it was going to."""
    plan = load_task_plan(store, task_id)
    number = int(plan.get("current") or 1)
    return number, plan["state"].get(str(number), {}).get("target")


def task_for_plan_file(store: Any, plan: dict[str, Any], local_dir: Path,
                       endpoint: str) -> dict[str, Any]:
    """batch-continue plan.json N: this machine's task for that plan, created on first use."""
    task = store.find({"kind": "batch", "plan_id": plan["plan_id"]})
    if task is not None:
        return task
    identity = batch_identity(plan["repo_id"], plan["repo_type"], plan["revision"], [], [],
                              plan["available_space"], plan["safety_margin"])
    with store.creation_lock():        # one task per plan, even for two starts at once
        task = store.find({"kind": "batch", "plan_id": plan["plan_id"]})
        if task is not None:
            return task
        return open_batch_task(store, identity, {**plan, "state": {}}, local_dir, endpoint)


# ---------------------------------------------------------------- per-batch state

def batch_progress(batch: Batch, tracker: Any) -> dict[str, Any]:
    """Files and bytes done of one batch, and its state from its files' states."""
    states = [tracker.status[p]["status"] for p in batch.paths]
    done = sum(1 for s in states if s == "completed")
    done_bytes = sum(tracker.by_path[p].size for p, s in zip(batch.paths, states) if s == "completed")
    if done == len(states):
        state = "completed"
    elif "failed" in states:
        state = "failed"
    elif done or "downloading" in states:
        state = "downloading"
    else:
        state = "oversize" if batch.oversize else "pending"
    return {"state": state, "files_done": done, "files_total": len(states),
            "bytes_done": done_bytes, "bytes_total": batch.total_bytes}


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


def write_marker(target: Path, task: dict[str, Any], plan: dict[str, Any], number: int,
                 state: str) -> str:
    """Record on the disk itself which task and batch it holds; returns the disk id."""
    import uuid
    from utils import now_iso, write_json_atomic
    marker = read_marker(target) or {"disk_id": uuid.uuid4().hex[:12], "batches": []}
    entries = [e for e in marker["batches"]
               if not (e.get("plan_id") == plan["plan_id"] and e.get("batch") == number)]
    entries.append({"task_id": task["id"], "plan_id": plan["plan_id"], "batch": number,
                    "repo_id": plan["repo_id"], "commit": plan["commit"], "state": state,
                    "updated_at": now_iso()})
    marker["batches"] = sorted(entries, key=lambda e: (e.get("plan_id", ""), e.get("batch", 0)))
    Path(target).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(target) / MARKER_NAME, marker)
    return marker["disk_id"]


def marker_has(target: Path, plan: dict[str, Any], number: int) -> bool:
    marker = read_marker(target)
    if not marker:
        return False
    return any(e.get("plan_id") == plan["plan_id"] and e.get("batch") == number
               for e in marker["batches"])


def get_batch(plan: dict[str, Any], number: int) -> Batch:
    batches = plan_batches_of(plan)
    if not 1 <= number <= len(batches):
        raise UsageError(f"no batch {number}: the plan has batches 1 to {len(batches)}")
    return batches[number - 1]


# ---------------------------------------------------------------- running a batch

def run_batch(store: Any, task: dict[str, Any], number: int, *, target: Path | None,
              endpoint: str, token: str | None, opts: Any, reserve: int, log: Any,
              stream: Any, quiet: bool = False) -> BatchRun:
    """Download batch N of a batch task onto whatever disk is at the target now."""
    import downloader
    from file_tracker import FileTracker
    from utils import now_iso
    with store.lock(task["id"]):
        plan = load_task_plan(store, task["id"])
        batch = get_batch(plan, number)
        tracker = FileTracker.load(store.folder(task["id"]), task["id"])
        target = Path(target or task["local_dir"])
        warnings = [f"batch {b.number} is not complete ({p['files_done']}/{p['files_total']} "
                    f"files); finish it later with batch-continue {task['id']} {b.number}"
                    for b in plan_batches_of(plan)[:number - 1]
                    for p in [batch_progress(b, tracker)] if p["state"] != "completed"]
        for w in warnings:
            log.warning(w)

        def mark_start() -> None:
            disk_id = write_marker(target, task, plan, number, "downloading")
            plan["state"][str(number)] = {**disk_identity(target), "disk_id": disk_id,
                                          "started_at": now_iso(), "completed_at": None}
            plan["current"] = number
            save_task_plan(store, task["id"], plan)

        result = downloader.run_task(store, task, tracker, endpoint=endpoint, token=token,
                                     opts=opts, reserve=reserve, log=log, stream=stream,
                                     quiet=quiet, todo=list(batch.paths), local_dir=target,
                                     before_start=mark_start)
        _finish_batch(store, task, plan, batch, tracker, target, result)
        progress = batch_progress(batch, tracker)
    return BatchRun(store.get(task["id"]), batch, result, warnings, str(target), progress,
                    len(plan["batches"]))


def _finish_batch(store: Any, task: dict[str, Any], plan: dict[str, Any], batch: Batch,
                  tracker: Any, target: Path, result: Any) -> None:
    """Record the batch's outcome on the disk and in the plan; the task's state follows."""
    from utils import now_iso
    progress = batch_progress(batch, tracker)
    entry = plan["state"].setdefault(str(batch.number), {"target": str(target)})
    if progress["state"] == "completed":
        entry["completed_at"] = now_iso()
        if read_marker(target) is not None or target.exists():
            write_marker(target, task, plan, batch.number, "completed")
    save_task_plan(store, task["id"], plan)
    if result.status != "completed":
        return                          # paused, cancelled or failed: run_task said why
    batches = plan_batches_of(plan)
    left = [b.number for b in batches if batch_progress(b, tracker)["state"] != "completed"]
    if left:
        store.update(task["id"], status="paused",
                     reason=f"batch {batch.number} of {len(batches)} done; next: batch-continue "
                            f"{task['id']} {left[0]}")


def batch_rows(store: Any, task: dict[str, Any]) -> list[dict[str, Any]]:
    """batch-status: one row per batch, with where it went and whether that disk is here now."""
    from file_tracker import FileTracker
    plan = load_task_plan(store, task["id"])
    tracker = FileTracker.load(store.folder(task["id"]), task["id"])
    rows = []
    for b in plan_batches_of(plan):
        where = plan["state"].get(str(b.number), {})
        target = where.get("target")
        rows.append({"batch": b.number, **batch_progress(b, tracker), "oversize": b.oversize,
                     "needed_space": b.needed_space, "first_path": b.first_path,
                     "last_path": b.last_path, "target": target,
                     "disk_id": where.get("disk_id"), "device": where.get("device"),
                     "mount_point": where.get("mount_point"),
                     "started_at": where.get("started_at"),
                     "completed_at": where.get("completed_at"),
                     "disk_present": bool(target) and marker_has(Path(target), plan, b.number)})
    return rows


def format_batch_rows(task: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"{task['id']}: {task.get('repo_type')} {task.get('repo_id')} @ "
             f"{str(task.get('commit'))[:12]}, {len(rows)} batches of at most "
             f"{format_size(batch_capacity(task['available_space'], task['safety_margin']))}"]
    table = []
    for r in rows:
        state = r["state"] + (f" (needs a {format_size(r['needed_space'])} disk)"
                              if r["oversize"] and r["state"] != "completed" else "")
        where = "-"
        if r["target"]:
            where = (f"{r['target']} [disk {r['disk_id'] or '?'} on {r['mount_point']}]"
                     f"{' (mounted now)' if r['disk_present'] else ''}")
        table.append([str(r["batch"]), state, f"{r['files_done']}/{r['files_total']}",
                      f"{format_size(r['bytes_done'])} / {format_size(r['bytes_total'])}", where])
    lines += text_table(["BATCH", "STATE", "FILES", "BYTES", "WHERE"], table, {0, 2, 3})
    return "\n".join(lines)


def batch_on_disk(store: Any, task: dict[str, Any], number: int | None,
                  local_dir: Path | None) -> tuple[list[str], Path]:
    """verify --batch N: the batch's files and its folder; the disk's marker must name it."""
    if task.get("kind") != "batch":
        raise UsageError(f"{task['id']} is not a batch task; verify it without --batch")
    if not number:
        raise UsageError(f"{task['id']} is a batch task: say which batch to check",
                         hint=f"python main.py verify {task['id']} --batch N (batch-status "
                              f"shows the batches)")
    plan = load_task_plan(store, task["id"])
    batch = get_batch(plan, number)
    folder = Path(local_dir or plan["state"].get(str(number), {}).get("target")
                  or task["local_dir"])
    if not marker_has(folder, plan, number):
        holds = ", ".join(f"batch {e.get('batch')} of {e.get('task_id')}"
                          for e in (read_marker(folder) or {}).get("batches", []))
        raise HFDError(f"the disk at {folder} does not hold batch {number} of {task['id']} "
                       f"(it holds {holds or 'no batch of this tool'})",
                       hint="mount the disk of that batch there, or give its folder with "
                            "--local-dir")
    return list(batch.paths), folder
