"""The per-file metadata of a task, compact on disk and in memory.

file_list.json holds the listing as rows `[filename, expected_size, blob_id, sha256]` (no URL:
it follows from the endpoint, repo, commit and path). file_status.json holds only what is not
the default: the completed files as index runs with their completion times (delta-encoded),
and a details entry for a file only where it has some (a failure, a retry count, a state
other than pending or completed). In memory the states are a byte per file, the completion
times an array, the details a dict for the few files that have them (`StatusTable`).

Files written before this format (a dict per file, a URL each, a full status entry for every
file) still load: their entries are read like details entries.
"""
from __future__ import annotations

import functools
import time
import zlib
from array import array
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from dataset_manager import RemoteFile
from utils import MetadataError, now_iso, read_json, safe_relpath

FILE_LIST = "file_list.json"       # the task's files, written when the listing changes

STATES = ("pending", "downloading", "completed", "failed")      # codes 0..3, in this order
PENDING, DOWNLOADING, COMPLETED, FAILED = range(4)
CODES = {name: code for code, name in enumerate(STATES)}
LIST_COLUMNS = ["filename", "expected_size", "blob_id", "sha256"]
_STAMP = "%Y-%m-%dT%H:%M:%S%z"      # utils.now_iso


class FilesByPath(Mapping[str, RemoteFile]):
    """path -> RemoteFile over the table's index (no second dict of every path)."""

    __slots__ = ("_files", "_index")

    def __init__(self, files: list[RemoteFile], index: dict[str, int]) -> None:
        self._files, self._index = files, index

    def __getitem__(self, path: str) -> RemoteFile:
        return self._files[self._index[path]]

    def __contains__(self, path: object) -> bool:
        return path in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class StatusTable(Mapping[str, dict[str, Any]]):
    """path -> that file's status entry, built on demand from a state byte, a completion time
    and the details that differ from the defaults. Changed only through `store`."""

    def __init__(self, files: list[RemoteFile], created_at: str) -> None:
        self.files = files
        self.index = {f.path: i for i, f in enumerate(files)}
        self.codes = bytearray(len(files))
        self.done_at = array("q", bytes(8 * len(files)))   # epoch seconds; 0: not recorded
        self.details: dict[int, dict[str, Any]] = {}
        self.created_at = created_at

    # ---------------------------------------------------------------- reading

    def __getitem__(self, path: str) -> dict[str, Any]:
        return self.entry(self.index[path])

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def entry(self, i: int) -> dict[str, Any]:
        entry = self._defaults(i, self.codes[i])
        entry["status"] = STATES[self.codes[i]]
        if self.codes[i] == COMPLETED and self.done_at[i]:
            entry["completed_at"] = _iso(self.done_at[i])
        entry.update(self.details.get(i) or ())
        return entry

    def state(self, path: str) -> str:
        return STATES[self.codes[self.index[path]]]

    def done_bytes(self, i: int) -> int:
        details = self.details.get(i)
        if details and "actual_size" in details:
            return int(details["actual_size"] or 0)
        return self.files[i].size

    def _defaults(self, i: int, code: int) -> dict[str, Any]:
        f, done = self.files[i], code == COMPLETED
        return {"status": STATES[code], "actual_size": f.size if done else 0,
                "attempts": 1 if done else 0, "error": None, "created_at": self.created_at,
                "completed_at": None, "expected_hash": f.expected_hash,
                "hash_kind": f.hash_kind}

    # ---------------------------------------------------------------- changing

    def store(self, i: int, entry: dict[str, Any]) -> None:
        """Record a whole entry: its state, its completion time, and what differs from the
        defaults as details (a None that is not a default means absent)."""
        code = CODES[entry["status"]]
        self.codes[i] = code
        self.done_at[i] = 0
        entry = dict(entry)
        if code == COMPLETED:
            entry.pop("started_at", None)          # completed_at says when it ended
            stamp = entry.get("completed_at")
            epoch = _epoch(stamp) if isinstance(stamp, str) else None
            if epoch is not None:
                self.done_at[i] = epoch
                entry.pop("completed_at")
        defaults = self._defaults(i, code)
        details = {k: v for k, v in entry.items()
                   if k != "status" and (v != defaults[k] if k in defaults else v is not None)}
        if details:
            self.details[i] = details
        else:
            self.details.pop(i, None)

    def copy_from(self, other: "StatusTable", j: int, i: int) -> None:
        self.codes[i], self.done_at[i] = other.codes[j], other.done_at[j]
        if j in other.details:
            self.details[i] = other.details[j]

    # ---------------------------------------------------------------- file_status.json

    def to_json(self, *, by_path: bool = False) -> dict[str, Any]:
        """The compact form: completed files as runs [start, count] with their times, the
        details of the others keyed by path (with their state unless pending). `by_path`:
        every file not plainly pending keyed by path, which loads against any listing (written
        while file_list.json changes, so a crash between the two files loses no state)."""
        if by_path:
            files: dict[str, dict[str, Any]] = {}
            for i, code in enumerate(self.codes):
                if code != PENDING or i in self.details:
                    entry = {**(self.details.get(i) or {}), "status": STATES[code]}
                    if code == COMPLETED and self.done_at[i]:
                        entry.setdefault("completed_at", _iso(self.done_at[i]))
                    files[self.files[i].path] = entry
            return {"created_at": self.created_at, "files": files}
        runs: list[list[int]] = []
        times: list[int] = []
        last = 0
        start = self.codes.find(COMPLETED)
        while start != -1:
            end = start
            while end < len(self.codes) and self.codes[end] == COMPLETED:
                times.append(self.done_at[end] - last)
                last = self.done_at[end]
                end += 1
            runs.append([start, end - start])
            start = self.codes.find(COMPLETED, end)
        files = {}
        for i in sorted(set(self.details) | {i for i, c in enumerate(self.codes)
                                               if c in (DOWNLOADING, FAILED)}):
            details = dict(self.details.get(i) or ())
            if self.codes[i] not in (PENDING, COMPLETED):
                details["status"] = STATES[self.codes[i]]
            files[self.files[i].path] = details
        return {"created_at": self.created_at, "list_check": list_check(self.files),
                "completed": runs, "completed_at": times, "files": files}


def list_check(files: list[RemoteFile]) -> str:
    """A check of the listing's paths and order: index runs apply only to the same list."""
    crc = zlib.crc32("\n".join(f.path for f in files).encode("utf-8", "surrogateescape"))
    return f"{len(files)}:{crc:08x}"


@functools.lru_cache(maxsize=256)
def _epoch(stamp: str) -> int | None:
    """Seconds since the epoch of a now_iso() stamp, when it round-trips exactly."""
    try:
        epoch = int(datetime.strptime(stamp, _STAMP).timestamp())
    except ValueError:
        return None
    return epoch if _iso(epoch) == stamp else None


def _iso(epoch: int) -> str:
    return time.strftime(_STAMP, time.localtime(epoch))


def _whole(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"expected a whole number, got {value!r}")
    return value


# ---------------------------------------------------------------- loading

def load_status(path: Path, files: list[RemoteFile]) -> StatusTable:
    """Read file_status.json (compact, or the old full form). Raises MetadataError."""
    data = read_json(path)
    entries = data.get("files")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise MetadataError(f"metadata file {path} has a bad 'files' object")
    for name, entry in entries.items():
        for key in ("actual_size", "attempts"):
            value = entry.get(key, 0)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise MetadataError(f"metadata file {path}: {name!r} has a bad {key!r} "
                                    f"(expected a whole number, got {value!r})")
    created = data.get("created_at")
    if not isinstance(created, str):        # the old form: a stamp in every entry
        first: dict[str, Any] = next(iter(entries.values()), {})
        stamp = first.get("created_at")
        created = stamp if isinstance(stamp, str) else now_iso()
    table = StatusTable(files, created)
    if "completed" in data and data.get("list_check") == list_check(files):
        _apply_runs(table, data, path)
    # else: a status saved for another listing (a crash between the two files): its runs do
    # not apply; the run adopts files found complete on disk after checking them
    for name, entry in entries.items():
        i = table.index.get(name)
        if i is None:
            continue
        full = table.entry(i)
        full.update(entry)
        if full.get("status") in CODES:      # a hand-edited entry with a bad state starts over
            table.store(i, full)
    return table


def _apply_runs(table: StatusTable, data: dict[str, Any], path: Path) -> None:
    runs, times = data.get("completed"), data.get("completed_at")
    try:
        if not isinstance(runs, list) or not isinstance(times, list):
            raise TypeError("'completed' and 'completed_at' must be lists")
        t = 0
        k = 0
        for start, count in runs:
            _whole(start), _whole(count)
            if start + count > len(table.codes):
                raise ValueError(f"run {start}+{count} is past the end of the list")
            for i in range(start, start + count):
                table.codes[i] = COMPLETED
                if k < len(times):
                    t += int(times[k])
                    table.done_at[i] = max(0, t)
                k += 1
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"metadata file {path} has a bad 'completed' list ({exc})") from None


# ---------------------------------------------------------------- file_list.json

def list_json(files: list[RemoteFile]) -> dict[str, Any]:
    return {"columns": LIST_COLUMNS,
            "files": [[f.path, f.size, f.blob_id, f.sha256] for f in files]}


def read_list_entries(entries: list[Any]) -> list[RemoteFile]:
    """Rows of the compact form, or the old dicts (whose URL is not needed)."""
    files = []
    for e in entries:
        if isinstance(e, list):
            if len(e) != 4:
                raise ValueError(f"a row of {len(e)} columns, expected {len(LIST_COLUMNS)}")
            path, size, blob_id, sha256 = e
        else:
            path, size, blob_id, sha256 = (e["filename"], e["expected_size"], e["blob_id"],
                                           e.get("sha256"))
        if not isinstance(blob_id, str) or not (sha256 is None or isinstance(sha256, str)):
            raise TypeError(f"bad hashes for {path!r}")
        files.append(RemoteFile(safe_relpath(path), _whole(size), blob_id, sha256))
    return files


# ---------------------------------------------------------------- file_list.json

def read_file_list(folder: Path) -> list[RemoteFile]:
    """The files of a task's file_list.json, in their order (a batch plan indexes into it)."""
    return read_list(folder)[0]


def read_list(folder: Path) -> tuple[list[RemoteFile], dict[str, Any]]:
    """file_list.json: the task's files (names checked again: the file may be hand-edited)."""
    path = folder / FILE_LIST
    try:
        listing = read_json(path)
    except MetadataError as exc:
        raise MetadataError(str(exc), hint=_LIST_HINT) from None
    entries = listing.get("files")
    if not isinstance(entries, list):
        raise MetadataError(f"metadata file {path} has no 'files' list", hint=_LIST_HINT)
    try:
        files = read_list_entries(entries)
    except (KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"metadata file {path} has a bad entry ({exc})",
                            hint=_LIST_HINT) from None
    meta = {k: listing.get(k) for k in ("repo_id", "repo_type", "commit")}
    if listing.get("removed"):
        try:
            meta["removed"] = [{"filename": safe_relpath(e["filename"]),
                                "expected_size": _whole(e["expected_size"]),
                                "blob_id": e["blob_id"], "sha256": e.get("sha256")}
                               for e in listing["removed"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"metadata file {path} has a bad 'removed' entry ({exc})",
                                hint=_LIST_HINT) from None
    return files, meta


_LIST_HINT = ("this file holds the Hub's listing and cannot be rebuilt: remove the task with "
              "'python main.py clean --all TASK' and download again (the files on disk are "
              "checked, not fetched again)")
