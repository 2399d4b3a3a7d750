"""The stored batch plan: the Plan dataclass and its JSON, in the task folder (batch_plan.json,
compact: the listing by reference to file_list.json, batches as index ranges) and in the
self-contained `plan-batch --output` file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch_planner import Batch, batch_capacity, plan_batches, plan_workers
from task_manager import TaskStore
from utils import SCHEMA_VERSION, HFDError, MetadataError, UsageError

if TYPE_CHECKING:
    from dataset_manager import Listing, RemoteFile

PLAN_KIND = "hf-downloader-plan"
PLAN_FILE = "batch_plan.json"            # in the task folder, beside file_tracker's files

_PLAN_ORDER = ("schema_version", "kind", "plan_id", "repo_id", "repo_type", "revision", "commit",
               "available_space", "safety_margin", "capacity", "workers", "endpoint", "include",
               "exclude", "created_at", "files", "batches", "state", "current")


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
    # plan-batch --workers N: batches of about equal bytes, meant to run at once side by side
    # (one shared folder, or a disk per worker); available_space 0 when no disk size was given
    workers: int | None = None
    endpoint: str | None = None           # where it was listed: batch-continue PLAN's default
    include: tuple[str, ...] = ()         # the filters it was listed with (a record: the
    exclude: tuple[str, ...] = ()         # files are the listing's, already filtered)
    created_at: str | None = None
    schema_version: int = SCHEMA_VERSION
    json_keys: tuple[str, ...] = field(default=(), repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # stored in the task folder without its own copy of the listing (file_list.json holds it)
    # and with batches as index ranges into it: a 20k-file plan costs kilobytes, not megabytes
    compact: bool = field(default=False, repr=False)

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
                       batches=batches, workers=_typed(data, "workers", int, None),
                       endpoint=_typed(data, "endpoint", str, None),
                       include=tuple(_typed(data, "include", list, [])),
                       exclude=tuple(_typed(data, "exclude", list, [])),
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
            "workers": self.workers, "endpoint": self.endpoint, "include": list(self.include),
            "exclude": list(self.exclude),
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

    def to_task_json(self) -> dict[str, Any]:
        """batch_plan.json: to_json(), or when compact, the listing by reference (file_list.json
        of the task) and each batch's files as [start, stop) ranges of indexes into it."""
        data = self.to_json()
        if not self.compact:
            return data
        index = {f.path: i for i, f in enumerate(self.files)}
        compact: dict[str, Any] = {}
        for key, value in data.items():
            if key == "files":
                compact["listing"] = LISTING_REF
                compact["file_count"] = len(self.files)
            elif key == "batches":
                compact[key] = [{"number": b.number,
                                 "ranges": _ranges([index[p] for p in b.paths]),
                                 "total_bytes": b.total_bytes, "oversize": b.oversize,
                                 "needed_space": b.needed_space} for b in self.batches]
            else:
                compact[key] = value
        return compact

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


def new_plan(listing: Listing, available: int | None, margin: float, *,
             workers: int | None = None, endpoint: str | None = None,
             include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Plan:
    """A self-contained plan: the pinned listing, where and how it was listed, its batches
    (`workers`: N of about equal bytes, each within `available` when given)."""
    import uuid
    from utils import now_iso
    capacity = batch_capacity(available, margin) if available is not None else None
    if workers is not None:
        batches = plan_workers(listing.files, workers, capacity)
        capacity = capacity or max((b.total_bytes for b in batches), default=0) or 1
    elif capacity is None:
        raise UsageError("say how to split: --available-space SIZE (one disk), --workers N "
                         "(machines at once), or both")
    else:
        batches = plan_batches(listing.files, capacity, margin=margin)
    return Plan(plan_id=uuid.uuid4().hex, repo_id=listing.repo_id, repo_type=listing.repo_type,
                revision=listing.revision, commit=listing.commit, available_space=available or 0,
                safety_margin=margin, capacity=capacity, created_at=now_iso(),
                files=list(listing.files), batches=batches, workers=workers, endpoint=endpoint,
                include=tuple(include), exclude=tuple(exclude))


_TASK_PLAN_HINT = "run plan-batch again (or restore it from its --output file)"
LISTING_REF = "file_list.json"       # a compact batch_plan.json's listing: the task's file list


def _ranges(indexes: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9, 10] -> [[3, 6], [9, 11]]: runs of consecutive indexes, in the given order."""
    runs: list[list[int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _expand(data: dict[str, Any], folder: Path, source: Path) -> dict[str, Any]:
    """A compact batch_plan.json as the full form: the listing read from the task's
    file_list.json, and each batch's paths from its ranges."""
    from file_store import read_file_list
    files = read_file_list(folder)
    try:
        if data.get("file_count") != len(files):
            raise ValueError(f"it indexes {data.get('file_count')!r} files, {LISTING_REF} "
                             f"lists {len(files)}")
        batches = []
        for b in _typed(data, "batches", list):
            paths = []
            for start, stop in _typed(b, "ranges", list):
                if not (isinstance(start, int) and isinstance(stop, int)
                        and 0 <= start < stop <= len(files)):
                    raise ValueError(f"batch {b.get('number')!r} has a bad range "
                                     f"{[start, stop]!r}")
                paths += [f.path for f in files[start:stop]]
            batches.append({**{k: v for k, v in b.items() if k != "ranges"}, "paths": paths})
    except (KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"metadata file {source} is not a valid batch plan ({exc})",
                            hint=_TASK_PLAN_HINT) from None
    full: dict[str, Any] = {}
    for key, value in data.items():
        if key == "listing":
            full["files"] = [{"path": f.path, "size": f.size, "blob_id": f.blob_id,
                              "sha256": f.sha256} for f in files]
        elif key == "batches":
            full[key] = batches
        elif key != "file_count":
            full[key] = value
    return full



def read_plan_file(path: str) -> Plan:
    from utils import read_json
    try:
        data = read_json(Path(path))
    except MetadataError as exc:        # a file the user named: not the tool's own metadata
        if not Path(path).exists():     # (exit 1, as before: the statuses are stable)
            raise HFDError(f"plan file {path} not found",
                           hint="give the file 'plan-batch --output' wrote") from None
        raise HFDError(f"{path} is not a batch plan written by 'plan-batch --output' "
                       f"({str(exc).split(' is ', 1)[-1]})",
                       hint="write it again with 'plan-batch --output'") from None
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
    data = read_json(path)
    compact = isinstance(data, dict) and data.get("listing") == LISTING_REF and "files" not in data
    if compact:
        data = _expand(data, store.folder(task_id), path)
    plan = Plan.from_json(data, path, hint=_TASK_PLAN_HINT)
    plan.compact = compact
    return plan


def save_task_plan(store: TaskStore, task_id: str, plan: Plan) -> None:
    """batch_plan.json in the form it was read in (compact for the plans made now)."""
    from utils import write_json_atomic
    write_json_atomic(store.folder(task_id) / PLAN_FILE, plan.to_task_json(), indent=None)
