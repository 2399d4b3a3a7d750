"""Datasets bigger than the disk: plan them in batches (one batch = one disk) and download them.

The first part of this module is pure: no I/O and no printing (format_* return strings), so
the planner can be tested and reused on its own. The batch workflow comes after it.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

from utils import HFDError, MetadataError, UsageError, format_size

# ================================================================ pure planning (no I/O)

DEFAULT_MIN_FILL = 0.5   # close a batch early for a folder only once it is this full
ROOT_FOLDER = "(root)"
NO_EXTENSION = "(none)"
_MIB, _GIB = 2**20, 2**30
# (lower bound in bytes, label); each bucket runs up to the next lower bound.
SIZE_BUCKETS: tuple[tuple[int, str], ...] = (
    (0, "< 1 MiB"),
    (_MIB, "1 MiB - 10 MiB"),
    (10 * _MIB, "10 MiB - 100 MiB"),
    (100 * _MIB, "100 MiB - 1 GiB"),
    (_GIB, "1 GiB - 10 GiB"),
    (10 * _GIB, "10 GiB - 100 GiB"),
    (100 * _GIB, ">= 100 GiB"),
)


class SizedFile(Protocol):
    """Anything with a repo path and a size in bytes, such as an entry of the Hub listing."""

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class Batch:
    """One disk's worth of files in repo order; an oversize batch holds one too-big file."""

    number: int                 # 1-based, in download order
    paths: tuple[str, ...]
    total_bytes: int
    oversize: bool = False
    needed_space: int = 0       # oversize only: the disk size it needs, ceil(size / margin)

    def __post_init__(self) -> None:
        if self.number < 1 or not self.paths or self.total_bytes < 0:
            raise ValueError(f"invalid batch: number {self.number}, {len(self.paths)} paths, "
                             f"{self.total_bytes} bytes")
        if self.oversize and (len(self.paths) != 1 or self.needed_space < self.total_bytes):
            raise ValueError(f"invalid oversize batch {self.number}: one file and a needed "
                             f"space of at least its size expected")

    @property
    def file_count(self) -> int:
        return len(self.paths)

    @property
    def first_path(self) -> str:
        return self.paths[0]

    @property
    def last_path(self) -> str:
        return self.paths[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "paths": list(self.paths),
                "total_bytes": self.total_bytes, "oversize": self.oversize,
                "needed_space": self.needed_space}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        """Rebuild a batch saved by to_dict; a malformed record is a MetadataError."""
        try:
            paths = data["paths"]
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise TypeError("paths must be a list of strings")
            return cls(number=int(data["number"]), paths=tuple(paths),
                       total_bytes=int(data["total_bytes"]),
                       oversize=bool(data.get("oversize", False)),
                       needed_space=int(data.get("needed_space", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"malformed batch record: {exc}") from exc


# ---------------------------------------------------------------- capacity

def _exact_margin(margin: float) -> Fraction:
    """Validate a safety margin and read it as written (0.9 is 9/10, not the nearest float)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 1:
        raise UsageError(f"safety margin must be more than 0 and at most 1, got {margin!r}",
                         hint="use a fraction of the free space, e.g. 0.9 keeps 10% free")
    return Fraction(repr(float(margin)))


def batch_capacity(available: int, margin: float) -> int:
    """Bytes one batch may hold: floor(available x margin)."""
    exact = _exact_margin(margin)
    if available <= 0:
        raise UsageError(f"available space must be more than 0 bytes, got {available}",
                         hint="free some space or download to another disk")
    capacity = math.floor(available * exact)
    if capacity < 1:
        raise UsageError(f"{available} bytes with a safety margin of {margin} leave no room "
                         "for a batch")
    return capacity


def needed_disk_space(size: int, margin: float = 1.0) -> int:
    """The smallest free space whose batch_capacity at this margin holds `size` bytes."""
    return math.ceil(size / _exact_margin(margin))


def _check_plan_args(capacity: int, margin: float, min_fill: float,
                     extra_batches: int | None) -> None:
    _exact_margin(margin)
    if capacity <= 0:
        raise UsageError(f"batch capacity must be more than 0 bytes, got {capacity}")
    if not 0 <= min_fill <= 1:
        raise UsageError(f"minimum fill must be between 0 and 1, got {min_fill!r}")
    if extra_batches is not None and extra_batches < 0:
        raise UsageError(f"extra batches must be 0 or more, got {extra_batches}")


# ---------------------------------------------------------------- planning

def _columns(files: Iterable[SizedFile]) -> tuple[list[str], list[int]]:
    paths: list[str] = []
    sizes: list[int] = []
    for f in files:
        if f.size < 0:
            raise HFDError(f"the file listing gives {f.path!r} a negative size ({f.size})")
        paths.append(f.path)
        sizes.append(int(f.size))
    return paths, sizes


def _folder_runs(paths: Sequence[str], skip: Sequence[bool]) -> dict[int, list[int]]:
    """Index -> ends (exclusive) of the folder runs that start there, shallowest first.

    A run is a maximal stretch of consecutive files under one folder; a depth-first listing
    has exactly one per folder, another order may cut a folder into several. Skipped
    (oversize) files are transparent: they neither start nor break a run.
    """
    runs: dict[int, list[int]] = {}
    names: list[str] = []                 # the open folders, one per depth
    slots: list[tuple[int, int]] = []     # (start index, position in runs[start])
    for i, path in enumerate(paths):
        if skip[i]:
            continue
        parts = path.split("/")[:-1]
        depth, limit = 0, min(len(names), len(parts))
        while depth < limit and names[depth] == parts[depth]:
            depth += 1
        for start, pos in slots[depth:]:
            runs[start][pos] = i
        del names[depth:], slots[depth:]
        for name in parts[depth:]:
            ends = runs.setdefault(i, [])
            slots.append((i, len(ends)))
            ends.append(-1)
            names.append(name)
    for start, pos in slots:
        runs[start][pos] = len(paths)
    return runs


class _Builder:
    """Accumulates the current batch and numbers batches as they close."""

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.batches: list[Batch] = []
        self.paths: list[str] = []
        self.total = 0
        self.pending: list[tuple[str, int]] = []   # oversize files met while a batch is open
        self.regular_count = 0

    def add(self, path: str, size: int) -> None:
        self.paths.append(path)
        self.total += size

    def add_oversize(self, path: str, size: int) -> None:
        # Its batch goes right after the one holding the regular file listed before it.
        if self.paths:
            self.pending.append((path, size))
        else:
            self._emit_oversize(path, size)

    def close(self) -> None:
        if self.paths:
            self.batches.append(Batch(len(self.batches) + 1, tuple(self.paths), self.total))
            self.paths, self.total = [], 0
            self.regular_count += 1
        for path, size in self.pending:
            self._emit_oversize(path, size)
        self.pending.clear()

    def _emit_oversize(self, path: str, size: int) -> None:
        self.batches.append(Batch(len(self.batches) + 1, (path,), size, oversize=True,
                                  needed_space=needed_disk_space(size, self.margin)))


def _min_batches_from(prefix: Sequence[int], capacity: int) -> list[int]:
    """fewest[i]: the fewest order-keeping batches for the regular bytes from file i on.

    Filling each batch as far as it goes is optimal for a fixed order, so this is the
    greedy count, found for every i at once with two pointers (prefix holds regular bytes).
    """
    n = len(prefix) - 1
    reach = [0] * n            # reach[i]: where a batch starting at i and filled greedily ends
    j = 0
    for i in range(n):
        j = max(j, i + 1)
        while j < n and prefix[j + 1] - prefix[i] <= capacity:
            j += 1
        reach[i] = j
    fewest = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        fewest[i] = 1 + fewest[reach[i]]
    return fewest


def _pick_group(ends: Sequence[int], prefix: Sequence[int], start: int, room: int,
                capacity: int, may_close: bool) -> int:
    """End of the shallowest folder run to place whole, or start + 1 to place one file."""
    for end in ends:
        size = prefix[end] - prefix[start]
        if size <= room or (may_close and size <= capacity):
            return end
    return start + 1


def plan_batches(files: Iterable[SizedFile], capacity: int, *, margin: float = 1.0,
                 min_fill: float = DEFAULT_MIN_FILL,
                 extra_batches: int | None = 0) -> list[Batch]:
    """Split a repo listing (in repo order) into batches of at most `capacity` bytes each.

    Every file lands in exactly one batch. Batches are contiguous runs of the listing in
    repo order, except that each file bigger than `capacity` is pulled out into an oversize
    batch of its own (needed_space = ceil(size / margin)), numbered right after the batch
    that holds the nearest regular file listed before it (or first, if there is none).

    Folders stay together where they can. A folder group is a maximal run of consecutive
    files under one folder, at any depth (a depth-first listing has one per folder); its
    size counts regular files only. At each regular file, the groups starting there are
    tried from the shallowest to the deepest, and the first one that passes is placed whole:
      - it fits in the room left in the current batch: it joins the current batch; or
      - it fits in an empty batch, the current batch is at least `min_fill` x capacity full,
        and closing it early still lets the plan end within the fewest regular batches any
        order-keeping plan needs (plus `extra_batches`; None: no limit): the current batch
        is closed and the group starts a new one.
    When no group passes, the single file is placed greedily: in the current batch if it
    fits, else it starts a new one. A folder bigger than a disk (train shards 0..N) is thus
    laid out in order over consecutive batches, each holding one contiguous slice, and its
    subfolders are again kept whole where they can.

    Guarantees: with extra_batches=0 the plan has the fewest regular batches possible
    without reordering (keeping folders whole never costs a disk). A regular batch followed
    by another regular batch is at least `min_fill` full, or it and the first file of that
    next batch together exceed `capacity`; so when no regular file is bigger than
    (1 - min_fill) x capacity, every regular batch but the last is at least `min_fill` full.
    min_fill=1 gives plain greedy filling. Time is linear in the number of path components.
    """
    _check_plan_args(capacity, margin, min_fill, extra_batches)
    paths, sizes = _columns(files)
    over = [size > capacity for size in sizes]
    regular = (0 if big else size for size, big in zip(sizes, over, strict=True))
    prefix = list(itertools.accumulate(regular, initial=0))
    runs = _folder_runs(paths, over)
    fewest = _min_batches_from(prefix, capacity)
    budget = None if extra_batches is None else fewest[0] + extra_batches
    builder, threshold, i = _Builder(margin), min_fill * capacity, 0
    while i < len(paths):
        if over[i]:
            builder.add_oversize(paths[i], sizes[i])
            i += 1
            continue
        may_close = builder.total >= threshold and (
            budget is None or builder.regular_count + 1 + fewest[i] <= budget)
        room = capacity - builder.total
        end = _pick_group(runs.get(i, ()), prefix, i, room, capacity, may_close)
        if prefix[end] - prefix[i] > room:
            builder.close()
        for j in range(i, end):
            (builder.add_oversize if over[j] else builder.add)(paths[j], sizes[j])
        i = end
    builder.close()
    return builder.batches


def plan_summary(batches: Sequence[Batch], capacity: int | None = None) -> dict[str, Any]:
    """A JSON-ready overview of a plan (without the full path lists)."""
    regular = [b for b in batches if not b.oversize]
    summary: dict[str, Any] = {
        "batch_count": len(batches),
        "regular_batch_count": len(regular),
        "oversize_batch_count": len(batches) - len(regular),
        "file_count": sum(b.file_count for b in batches),
        "total_bytes": sum(b.total_bytes for b in batches),
    }
    if capacity is not None:
        summary["capacity"] = capacity
    summary["batches"] = [
        {"number": b.number, "file_count": b.file_count, "total_bytes": b.total_bytes,
         "first_path": b.first_path, "last_path": b.last_path, "oversize": b.oversize,
         "needed_space": b.needed_space}
        for b in batches]
    return summary


# ---------------------------------------------------------------- analysis

def _top_folder(path: str) -> str:
    head, sep, _ = path.partition("/")
    return head if sep else ROOT_FOLDER


def _extension(path: str) -> str:
    """'x.tar.gz' -> '.gz', 'A.PARQUET' -> '.parquet', 'LICENSE' and '.gitattributes' -> (none)."""
    return posixpath.splitext(posixpath.basename(path))[1].lower() or NO_EXTENSION


def _tally(files: Sequence[SizedFile], key: Callable[[str], str], label: str) -> list[dict]:
    """Count and bytes per key, biggest first (ties by name)."""
    counts: dict[str, list[int]] = {}
    for f in files:
        entry = counts.setdefault(key(f.path), [0, 0])
        entry[0] += 1
        entry[1] += f.size
    order = sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0]))
    return [{label: name, "files": n, "bytes": b} for name, (n, b) in order]


def _histogram(files: Sequence[SizedFile]) -> list[dict]:
    bounds = [low for low, _ in SIZE_BUCKETS]
    counts, totals = [0] * len(bounds), [0] * len(bounds)
    for f in files:
        k = bisect.bisect_right(bounds, f.size) - 1
        counts[k] += 1
        totals[k] += f.size
    uppers = bounds[1:] + [None]
    return [{"label": label, "min_bytes": low, "max_bytes": up, "files": n, "bytes": b}
            for (low, label), up, n, b in zip(SIZE_BUCKETS, uppers, counts, totals, strict=True)]


def _disk_estimate(files: Sequence[SizedFile], total: int, available: int) -> dict[str, Any]:
    plan = plan_batches(files, available)          # margin 1.0: the whole free space
    too_big = [{"path": f.path, "size": f.size} for f in files if f.size > available]
    too_big_bytes = sum(f.size for f in files if f.size > available)
    return {
        "available_bytes": available,
        "disks_min": math.ceil(total / available),  # as if files could be cut anywhere
        "disks_min_fitting": math.ceil((total - too_big_bytes) / available),
        "disks_planned": sum(1 for b in plan if not b.oversize),
        "oversize_count": len(too_big),
        "oversize_bytes": too_big_bytes,
        "oversize_files": too_big,
    }


def analyze_files(files: Iterable[SizedFile], *, available_space: int | None = None,
                  top_n: int = 10) -> dict[str, Any]:
    """JSON-ready statistics of a listing: totals, folders, extensions, largest, histogram.

    With `available_space`, under "disks": `disks_min` = ceil(total / available) (as if files
    could be cut), `disks_min_fitting` = the same for the files that fit on one disk,
    `disks_planned` = the regular batches plan_batches makes at margin 1.0, and the files
    bigger than one disk (each needs a larger disk of its own).
    """
    if available_space is not None and available_space <= 0:
        raise UsageError(f"available space must be more than 0 bytes, got {available_space}")
    files = list(files)
    total = sum(f.size for f in files)
    analysis: dict[str, Any] = {
        "file_count": len(files),
        "total_bytes": total,
        "folders": _tally(files, _top_folder, "folder"),
        "extensions": _tally(files, _extension, "extension"),
        "largest": [{"path": f.path, "size": f.size}
                    for f in heapq.nlargest(max(top_n, 0), files, key=lambda f: f.size)],
        "histogram": _histogram(files),
    }
    if available_space is not None:
        analysis["disks"] = _disk_estimate(files, total, available_space)
    return analysis


# ---------------------------------------------------------------- formatting

def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned text columns; columns in `right` are right-aligned (numbers)."""
    widths = [max([len(h), *(len(r[c]) for r in rows)]) for c, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                         for c, (cell, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _shorten(path: str, width: int = 44) -> str:
    """Cut the middle of a long path, keeping its start and (longer) its file name."""
    if len(path) <= width:
        return path
    head = (width - 3) // 3
    return path[:head] + "..." + path[len(path) - (width - 3 - head):]


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}%" if total else "-"


def _tally_lines(title: str, entries: list[dict], label: str, total: int) -> list[str]:
    rows = [[e[label], f"{e['files']:,}", format_size(e["bytes"]), _share(e["bytes"], total)]
            for e in entries]
    return ["", title, *_table([label, "files", "size", "share"], rows, {1, 2, 3})]


def _disk_lines(disks: dict[str, Any]) -> list[str]:
    at_least = _count(disks["disks_min"], "disk")
    fitting = _count(disks["disks_min_fitting"], "disk")
    lines = ["", f"Disks of {format_size(disks['available_bytes'])} free",
             f"  all files:                  {at_least} at least "
             "(total / free space, rounded up, as if files could be cut)",
             f"  files that fit on one disk: {fitting} at least; "
             f"the batch plan (margin 1.0) takes {disks['disks_planned']:,}"]
    if disks["oversize_count"]:
        lines.append(f"  files bigger than one disk: {disks['oversize_count']:,} "
                     f"({format_size(disks['oversize_bytes'])}), each needs a larger disk:")
        rows = [[_shorten(f["path"], 60), format_size(f["size"])]
                for f in disks["oversize_files"]]
        lines += ["    " + line for line in _table(["path", "size"], rows, {1})]
    return lines


def format_analysis(analysis: dict[str, Any]) -> str:
    """The analyze_files result as aligned text tables."""
    total = analysis["total_bytes"]
    lines = [f"{analysis['file_count']:,} files, {format_size(total)} ({total:,} bytes)"]
    lines += _tally_lines("Top-level folders", analysis["folders"], "folder", total)
    lines += _tally_lines("Extensions", analysis["extensions"], "extension", total)
    rows = [[_shorten(f["path"], 60), format_size(f["size"])] for f in analysis["largest"]]
    lines += ["", "Largest files", *_table(["path", "size"], rows, {1})]
    rows = [[h["label"], f"{h['files']:,}", format_size(h["bytes"]), _share(h["bytes"], total)]
            for h in analysis["histogram"]]
    lines += ["", "Size histogram", *_table(["size", "files", "bytes", "share"], rows, {1, 2, 3})]
    if "disks" in analysis:
        lines += _disk_lines(analysis["disks"])
    return "\n".join(lines)


def _plan_row(batch: Batch, capacity: int) -> list[str]:
    note = f"OVERSIZE: needs a {format_size(batch.needed_space)} disk" if batch.oversize else ""
    fill = "-" if batch.oversize else _share(batch.total_bytes, capacity)
    return [str(batch.number), f"{batch.file_count:,}", format_size(batch.total_bytes), fill,
            _shorten(batch.first_path), _shorten(batch.last_path), note]


def format_plan(batches: Sequence[Batch], capacity: int) -> str:
    """A batch plan as an aligned table with a totals footer."""
    if not batches:
        return f"no files to plan (capacity {format_size(capacity)} per batch)"
    headers = ["batch", "files", "size", "fill", "first path", "last path", ""]
    lines = _table(headers, [_plan_row(b, capacity) for b in batches], {0, 1, 2, 3})
    summary = plan_summary(batches)
    oversize = summary["oversize_batch_count"]
    kinds = f"{summary['regular_batch_count']} regular"
    kinds += f", {oversize} oversize" if oversize else ""
    lines.append(f"{_count(len(batches), 'batch', 'batches')} ({kinds}), "
                 f"{_count(summary['file_count'], 'file')}, "
                 f"{format_size(summary['total_bytes'])}; "
                 f"capacity {format_size(capacity)} ({capacity:,} bytes) per batch")
    if oversize:
        lines.append("oversize batches hold one file bigger than the capacity: "
                     "each needs a disk of at least the size shown")
    return "\n".join(lines)


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
    lines += _table(["BATCH", "STATE", "FILES", "BYTES", "WHERE"], table, {0, 2, 3})
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
