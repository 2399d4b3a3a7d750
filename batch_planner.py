"""Batch planning, pure: split a listing into batches that each fit on one disk, analyse a
listing (sizes per folder, extension and size class, disks needed), and format both as text.

No I/O and no printing (format_* return strings), so the planner is tested and reused on its
own; batch_manager runs the plans.
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
from typing import Any, Protocol

from utils import HFDError, MetadataError, UsageError, format_size

# ================================================================ pure planning (no I/O)

DEFAULT_SAFETY_MARGIN = 0.9   # fill each disk to at most this fraction (plan-batch and analyze)
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


def _fits(prefix: Sequence[int], cap: int, count: int) -> bool:
    """Whether the files split into at most `count` order-keeping runs of <= cap bytes each."""
    i, n, used = 0, len(prefix) - 1, 0
    while i < n:
        j = bisect.bisect_right(prefix, prefix[i] + cap) - 1
        used += 1
        if j == i or used > count:
            return False
        i = j
    return True


def _smallest_cap(prefix: Sequence[int], count: int, low: int) -> int:
    """The smallest largest-batch any split into `count` order-keeping runs can have."""
    high = max(low, prefix[-1])
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if _fits(prefix, mid, count) else (mid + 1, high)
    return low


def _balanced_cuts(prefix: Sequence[int], count: int, cap: int) -> list[int]:
    """Cut points (file indexes) of `count` non-empty runs, each <= cap bytes, each cut as near
    as it may be to the ideal k x total / count."""
    n, total = len(prefix) - 1, prefix[-1]
    lowest = [0] * count        # lowest[k]: the earliest start from which count - k runs do
    start = n
    for k in range(count - 1, 0, -1):
        start = bisect.bisect_left(prefix, prefix[start] - cap)
        lowest[k] = start
    cuts = [0]
    for k in range(1, count):
        hi = min(bisect.bisect_right(prefix, prefix[cuts[-1]] + cap) - 1, n - (count - k))
        lo = max(lowest[k], cuts[-1] + 1)
        target = total * k / count
        j = min(max(bisect.bisect_left(prefix, target), lo), hi)
        if j - 1 >= lo and target - prefix[j - 1] < prefix[j] - target:
            j -= 1
        cuts.append(j)
    return cuts + [n]


def plan_workers(files: Iterable[SizedFile], workers: int,
                 capacity: int | None = None) -> list[Batch]:
    """Split a listing into batches of about equal bytes, for `workers` machines at once.

    Batches are contiguous runs of the listing (repo order within and across batches); every
    file lands in exactly one. The largest batch is as small as any order-keeping split into
    that many batches allows (at most total / count + the largest file), and each cut is then
    placed as near as it may be to an equal share. Folders are not kept whole: a worker's
    batch is a slice of the repo, not a disk's worth of folders.

    count is `workers`, or the number of files when there are fewer. With `capacity` (one
    disk), every batch also fits it: when `workers` batches cannot, the count grows to the
    next multiple of `workers` that can (N workers, k rounds each); a file bigger than the
    capacity is refused (UsageError)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be a whole number from 1, got {workers!r}")
    paths, sizes = _columns(files)
    if not paths:
        return []
    prefix = list(itertools.accumulate(sizes, initial=0))
    largest = max(sizes)
    count = min(workers, len(paths))
    if capacity is not None:
        if capacity < 1:
            raise UsageError(f"batch capacity must be more than 0 bytes, got {capacity}")
        if largest > capacity:
            big = paths[sizes.index(largest)]
            raise UsageError(f"{big!r} ({format_size(largest)}) is bigger than one disk's "
                             f"capacity ({format_size(capacity)}): no batch of a --workers "
                             f"plan can hold it",
                             hint="give a bigger --available-space, or plan without it")
        needed = _min_batches_from(prefix, capacity)[0]
        count = min(len(paths), max(count, -(-needed // workers) * workers))
    cap = _smallest_cap(prefix, count, max(largest, -(-prefix[-1] // count)))
    cuts = _balanced_cuts(prefix, count, cap)
    return [Batch(k + 1, tuple(paths[a:b]), prefix[b] - prefix[a])
            for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]


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


def _disk_estimate(files: Sequence[SizedFile], total: int, available: int,
                   margin: float) -> dict[str, Any]:
    """The disks plan-batch would use: the same capacity (available x margin), the same plan."""
    capacity = batch_capacity(available, margin)
    plan = plan_batches(files, capacity, margin=margin)
    too_big = [{"path": f.path, "size": f.size} for f in files if f.size > capacity]
    too_big_bytes = sum(f.size for f in files if f.size > capacity)
    return {
        "available_bytes": available,
        "safety_margin": margin,
        "capacity": capacity,
        "disks_min": math.ceil(total / capacity),  # as if files could be cut anywhere
        "disks_min_fitting": math.ceil((total - too_big_bytes) / capacity),
        "disks_planned": sum(1 for b in plan if not b.oversize),
        "batch_count": len(plan),                  # plan-batch's batches, oversize ones too
        "oversize_count": len(too_big),
        "oversize_bytes": too_big_bytes,
        "oversize_files": too_big,
    }


def analyze_files(files: Iterable[SizedFile], *, available_space: int | None = None,
                  safety_margin: float = DEFAULT_SAFETY_MARGIN, top_n: int = 10) -> dict[str, Any]:
    """JSON-ready statistics of a listing: totals, folders, extensions, largest, histogram.

    With `available_space`, under "disks", counted as plan-batch counts them (a batch holds at
    most capacity = available x safety_margin bytes): `disks_min` = ceil(total / capacity) (as
    if files could be cut), `disks_min_fitting` = the same for the files that fit in one batch,
    `disks_planned` = the regular batches plan_batches makes, `batch_count` = all its batches,
    and the files bigger than one batch (each needs a larger disk of its own).
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
        analysis["disks"] = _disk_estimate(files, total, available_space, safety_margin)
    return analysis


# ---------------------------------------------------------------- formatting

def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
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
    return ["", title, *text_table([label, "files", "size", "share"], rows, {1, 2, 3})]


def _disk_lines(disks: dict[str, Any]) -> list[str]:
    at_least = _count(disks["disks_min"], "disk")
    fitting = _count(disks["disks_min_fitting"], "disk")
    margin = disks.get("safety_margin", 1.0)
    lines = ["", f"Disks of {format_size(disks['available_bytes'])} free, filled to "
                 f"{margin:g} ({format_size(disks.get('capacity', disks['available_bytes']))} "
                 "per disk)",
             f"  all files:                  {at_least} at least "
             "(total / capacity, rounded up, as if files could be cut)",
             f"  files that fit on one disk: {fitting} at least; "
             f"the batch plan (margin {margin:g}) takes {disks['disks_planned']:,}"]
    if disks["oversize_count"]:
        lines.append(f"  files bigger than one disk: {disks['oversize_count']:,} "
                     f"({format_size(disks['oversize_bytes'])}), each needs a larger disk:")
        rows = [[_shorten(f["path"], 60), format_size(f["size"])]
                for f in disks["oversize_files"]]
        lines += ["    " + line for line in text_table(["path", "size"], rows, {1})]
    if "batch_count" in disks:
        lines.append(f"  plan-batch with --safety-margin {margin:g} makes "
                     f"{_count(disks['batch_count'], 'batch', 'batches')}")
    return lines


def format_analysis(analysis: dict[str, Any]) -> str:
    """The analyze_files result as aligned text tables."""
    total = analysis["total_bytes"]
    lines = [f"{analysis['file_count']:,} files, {format_size(total)} ({total:,} bytes)"]
    lines += _tally_lines("Top-level folders", analysis["folders"], "folder", total)
    lines += _tally_lines("Extensions", analysis["extensions"], "extension", total)
    rows = [[_shorten(f["path"], 60), format_size(f["size"])] for f in analysis["largest"]]
    lines += ["", "Largest files", *text_table(["path", "size"], rows, {1})]
    rows = [[h["label"], f"{h['files']:,}", format_size(h["bytes"]), _share(h["bytes"], total)]
            for h in analysis["histogram"]]
    lines += ["", "Size histogram", *text_table(["size", "files", "bytes", "share"], rows, {1, 2, 3})]
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
    lines = text_table(headers, [_plan_row(b, capacity) for b in batches], {0, 1, 2, 3})
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
