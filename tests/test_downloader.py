"""downloader in-process: download_one's attempts against a scripted backend (what each failure
kind leads to), the backend chosen per file, plan_work, TaskTicker, Stopper and RateGate.

No network and no tool is started: the backends here write given bytes into the partial and
raise given failures, one step per attempt.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import fetcher
from dataset_manager import Listing, RemoteFile
from downloader import TaskTicker, WorkList, plan_work
from fetcher import Options, RateGate, Run, Stopper
from file_tracker import FileTracker
from progress import Progress
from task_manager import StopReason, TaskStore
from tools import Aria2Backend, ChildSet
from transfer import Backend, FailureKind, FetchError, Job, Report
from partial import Partial

ENDPOINT = "http://127.0.0.1:1"          # never contacted: the backends are scripted
GOOD = b"the right bytes\n" * 64
WRONG = b"the wrong bytes\n" * 64        # the same size, another hash
LOG = logging.getLogger("test_downloader")


def remote(path: str, data: bytes) -> RemoteFile:
    """An LFS file whose expected sha256 is that of `data`."""
    blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    return RemoteFile(path, len(data), blob, hashlib.sha256(data).hexdigest())


F = remote("sub/model.bin", GOOD)


# ================================================================ a scripted backend

@dataclass
class Step:
    """One attempt: write `data` into the partial (replacing it, or appended), then raise `error`.
    With `block`, first wait until it is set (a stop ends the wait as STOPPED); with `stop_run`,
    the run is stopped while the attempt is under way (a tool killed by Ctrl-C fails as it dies)."""

    data: bytes | None = None
    error: BaseException | None = None
    append: bool = False
    block: threading.Event | None = None
    stop_run: bool = False


class Scripted:
    """A Backend whose attempts follow a script; records what each attempt found on disk."""

    resumable = frozenset({"seq", "parts"})

    def __init__(self, *steps: Step, name: str = "scripted", events: list[str] | None = None,
                 good: bytes = GOOD) -> None:
        self.name = name
        self.steps = list(steps)
        self.events = events if events is not None else []
        self.good = good
        self.seen: list[bytes | None] = []        # the partial's bytes when each attempt began
        self.opened = self.closed = False

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.closed = True

    def fetch(self, job: Job, report: Report, stop: threading.Event) -> str | None:
        assert self.steps, f"{self.name}: one attempt more than the script holds"
        # The final name holds the right bytes or nothing, whatever happened before.
        assert not job.final.exists() or job.final.read_bytes() == self.good
        self.events.append("fetch")
        path = job.partial.path
        self.seen.append(path.read_bytes() if path.exists() else None)
        step = self.steps.pop(0)
        if step.block is not None:
            while not step.block.wait(0.01):
                if stop.is_set():
                    raise FetchError("stopped", FailureKind.STOPPED)
        if step.data is not None:
            with open(path, "ab" if step.append else "wb") as fh:
                fh.write(step.data)
            report(job.partial.bytes_on_disk())
        if step.stop_run:
            stop.set()
        if step.error is not None:
            raise step.error
        return None                                # the caller hashes the partial

    @property
    def calls(self) -> int:
        return len(self.seen)


class RecordingGate(RateGate):
    """Records the gate's use. close_for does not close it: the real gate adds a second of
    margin, too slow for these tests (RateGate has its own tests below)."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def close_for(self, seconds: float, cap: float = 600.0,
                  log: logging.Logger | None = None) -> None:
        self.events.append(f"close {seconds}")

    def wait(self, stop: threading.Event) -> None:
        self.events.append("wait")
        super().wait(stop)


def _check_backend(b: Backend) -> Backend:        # mypy: Scripted satisfies the Protocol
    return b


_check_backend(Scripted())


def listing(files: list[RemoteFile]) -> Listing:
    return Listing("org/repo", "model", "main", "c1" * 20, files)


def make_run(tmp_path: Path, tool: Any, *, ranged: Any = None,
             files: list[RemoteFile] | None = None, events: list[str] | None = None,
             **opts: Any) -> Run:
    files = files or [F]
    tracker = FileTracker.create(tmp_path / "task", "task_001", listing(files), ENDPOINT)
    options = Options(**{"retries": 2, "retry_base": 0.001, **opts})
    progress = Progress(len(files), sum(f.size for f in files), 0, 0, io.StringIO(), 60.0,
                        quiet=True)
    return Run(tracker, tmp_path / "out", ENDPOINT, None, options, tool, ranged or tool, progress,
               Stopper(), LOG, gate=RecordingGate(events if events is not None else []))


def final_of(run: Run, f: RemoteFile = F) -> Path:
    return run.local_dir / f.path


def partial_of(run: Run, f: RemoteFile = F) -> Partial:
    return Partial(run.local_dir, f.path, f.expected_hash)


def state(run: Run, f: RemoteFile = F) -> dict[str, Any]:
    return run.tracker.status[f.path]


def put_partial(run: Run, data: bytes, f: RemoteFile = F) -> Partial:
    partial = partial_of(run, f)
    partial.path.parent.mkdir(parents=True, exist_ok=True)
    partial.path.write_bytes(data)
    return partial


# ================================================================ download_one: success

def test_success_promotes_the_partial_and_records_the_file(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD))
    run = make_run(tmp_path, backend)
    fetcher.download_one(run, F)
    assert final_of(run).read_bytes() == GOOD
    assert sorted(p.name for p in final_of(run).parent.iterdir()) == ["model.bin"]
    assert state(run)["status"] == "completed" and state(run)["actual_size"] == len(GOOD)
    assert state(run)["attempts"] == 1 and state(run)["error"] is None
    assert run.failures == [] and run.progress.done_files == 1


def test_a_partial_left_by_an_earlier_run_is_continued(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD[100:], append=True))
    run = make_run(tmp_path, backend)
    put_partial(run, GOOD[:100])
    fetcher.download_one(run, F)
    assert backend.seen == [GOOD[:100]]
    assert final_of(run).read_bytes() == GOOD


def test_a_partial_the_backend_cannot_continue_is_discarded_first(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD))                 # continues "seq" and "parts", not "aria2"
    run = make_run(tmp_path, backend)
    partial = put_partial(run, WRONG[:100])
    partial.control.write_bytes(b"\1" * 64)
    fetcher.download_one(run, F)
    assert backend.seen == [None] and not partial.control.exists()
    assert final_of(run).read_bytes() == GOOD


# ================================================================ download_one: failures

def test_a_transient_failure_is_retried_from_the_partial(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD[:100], FetchError("connection reset")),
                       Step(GOOD[100:], append=True))
    run = make_run(tmp_path, backend)
    fetcher.download_one(run, F)
    assert backend.seen == [None, GOOD[:100]]
    assert final_of(run).read_bytes() == GOOD
    assert state(run)["status"] == "completed" and state(run)["attempts"] == 2
    assert run.failures == []


def test_a_fetch_that_ends_short_is_tried_again_from_where_it_stopped(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD[:10]), Step(GOOD[10:], append=True))
    run = make_run(tmp_path, backend)
    fetcher.download_one(run, F)
    assert backend.seen == [None, GOOD[:10]]
    assert final_of(run).read_bytes() == GOOD


def test_retries_exhausted_fail_the_file_and_keep_the_partial(tmp_path: Path) -> None:
    backend = Scripted(*[Step(GOOD[:50], FetchError("HTTP 503")) for _ in range(3)])
    run = make_run(tmp_path, backend, retries=2)
    fetcher.download_one(run, F)
    assert backend.calls == 3                      # the first try and 2 retries
    assert state(run)["status"] == "failed" and state(run)["error"] == "HTTP 503"
    assert state(run)["attempts"] == 3
    assert run.failures == [(F.path, "HTTP 503")] and run.progress.done_files == 0
    assert not final_of(run).exists()
    assert partial_of(run).path.read_bytes() == GOOD[:50]    # a later run continues it


def test_a_bad_partial_is_discarded_before_the_retry(tmp_path: Path) -> None:
    backend = Scripted(Step(error=FetchError("HTTP 416", FailureKind.BAD_PARTIAL)), Step(GOOD))
    run = make_run(tmp_path, backend)
    put_partial(run, WRONG[:50])
    fetcher.download_one(run, F)
    assert backend.seen == [WRONG[:50], None]
    assert final_of(run).read_bytes() == GOOD


def test_a_hash_mismatch_is_a_bad_partial_and_never_reaches_the_final_name(
        tmp_path: Path) -> None:
    backend = Scripted(Step(WRONG), Step(GOOD))
    run = make_run(tmp_path, backend)
    fetcher.download_one(run, F)
    assert backend.seen == [None, None]            # the wrong bytes were discarded, not continued
    assert final_of(run).read_bytes() == GOOD
    assert state(run)["status"] == "completed" and state(run)["attempts"] == 2


def test_a_hash_mismatch_on_the_last_try_fails_the_file_without_its_bytes(
        tmp_path: Path) -> None:
    backend = Scripted(Step(WRONG))
    run = make_run(tmp_path, backend, retries=0)
    fetcher.download_one(run, F)
    assert state(run)["status"] == "failed"
    assert state(run)["error"].startswith("sha256 mismatch")
    assert not final_of(run).exists() and not partial_of(run).path.exists()
    assert [p for p, _ in run.failures] == [F.path]


@pytest.mark.parametrize("retry_after,closed_for", [(0.05, "close 0.05"), (None, "close 5.0")])
def test_rate_limited_closes_the_gate_before_the_retry(tmp_path: Path, retry_after: float | None,
                                                      closed_for: str) -> None:
    events: list[str] = []
    backend = Scripted(Step(error=FetchError("rate limited (429)", FailureKind.RATE_LIMITED,
                                             retry_after=retry_after)),
                       Step(GOOD), events=events)
    run = make_run(tmp_path, backend, events=events)
    fetcher.download_one(run, F)
    assert events == ["wait", "fetch", closed_for, "wait", "fetch"]
    assert final_of(run).read_bytes() == GOOD


@pytest.mark.parametrize("error", [
    FetchError("write failed: No space left on device", FailureKind.DISK_FULL),
    OSError(errno.ENOSPC, "No space left on device"),       # raised outside the backend's writes
])
def test_a_full_disk_stops_the_run_and_keeps_the_partial(tmp_path: Path,
                                                         error: BaseException) -> None:
    backend = Scripted(Step(GOOD[:100], error), Step(GOOD))
    run = make_run(tmp_path, backend, retries=5)
    fetcher.download_one(run, F)
    assert backend.calls == 1
    assert run.stopper.reason is StopReason.DISK_FULL and run.stopper.event.is_set()
    assert "No space left on device" in run.stopper.detail
    assert state(run)["status"] == "pending" and state(run)["attempts"] == 0
    assert partial_of(run).path.read_bytes() == GOOD[:100]
    assert run.failures == [] and not final_of(run).exists()


def test_a_disk_quota_stops_the_run_like_a_full_disk(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD[:100], OSError(errno.EDQUOT, "Disk quota exceeded")))
    run = make_run(tmp_path, backend, retries=5)
    fetcher.download_one(run, F)
    assert run.stopper.reason is StopReason.DISK_FULL
    assert state(run)["status"] == "pending"
    assert partial_of(run).path.read_bytes() == GOOD[:100]


@pytest.mark.parametrize("kind", [FailureKind.NOT_FOUND, FailureKind.DENIED])
def test_not_found_and_denied_give_up_without_retrying(tmp_path: Path, kind: FailureKind) -> None:
    backend = Scripted(Step(error=FetchError(f"refused: {kind.value}", kind)), Step(GOOD))
    run = make_run(tmp_path, backend, retries=5)
    fetcher.download_one(run, F)
    assert backend.calls == 1
    assert state(run)["status"] == "failed" and state(run)["attempts"] == 1
    assert run.failures == [(F.path, f"refused: {kind.value}")]
    assert not final_of(run).exists() and run.stopper.reason is None


def test_a_stopped_attempt_leaves_the_file_pending_with_its_partial(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD[:100], FetchError("stopped", FailureKind.STOPPED)), Step(GOOD))
    run = make_run(tmp_path, backend)
    fetcher.download_one(run, F)
    assert backend.calls == 1
    assert state(run)["status"] == "pending" and state(run)["attempts"] == 0
    assert partial_of(run).path.read_bytes() == GOOD[:100] and run.failures == []


def test_a_failure_while_the_run_stops_is_no_failed_attempt(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD[:100], FetchError("aria2c exited with status 7"), stop_run=True),
                       Step(GOOD))
    run = make_run(tmp_path, backend)
    fetcher.download_one(run, F)
    assert backend.calls == 1
    assert state(run)["status"] == "pending" and state(run)["attempts"] == 0
    assert state(run)["error"] is None and run.failures == []
    assert partial_of(run).path.read_bytes() == GOOD[:100]


def test_a_run_already_stopped_does_not_fetch(tmp_path: Path) -> None:
    backend = Scripted()
    run = make_run(tmp_path, backend)
    run.stopper.stop("interrupted")
    fetcher.download_one(run, F)
    assert backend.calls == 0 and state(run)["status"] == "pending"


def test_a_stop_during_the_backoff_ends_the_wait(tmp_path: Path) -> None:
    backend = Scripted(Step(GOOD[:100], FetchError("HTTP 500")), Step(GOOD))
    run = make_run(tmp_path, backend, retries=5, retry_base=30.0)
    timer = threading.Timer(0.05, run.stopper.stop, ("terminated",))
    started = time.monotonic()
    timer.start()
    try:
        fetcher.download_one(run, F)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2.0
    assert backend.calls == 1 and run.stopper.reason is StopReason.TERMINATED
    assert state(run)["status"] == "pending" and state(run)["attempts"] == 1
    assert partial_of(run).path.read_bytes() == GOOD[:100]


# ================================================================ the backend for each file

def test_files_above_max_single_get_go_to_the_python_backend(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aria = Aria2Backend(ChildSet(), stall_timeout=1.0, jobs=1)
    monkeypatch.setattr(aria, "daemon", lambda: pytest.fail("aria2c was started"))
    python = Scripted(Step(GOOD), name="python")
    run = make_run(tmp_path, aria, ranged=python, max_single_get=100)
    fetcher.download_one(run, F)
    assert python.calls == 1 and final_of(run).read_bytes() == GOOD


def test_backend_for(tmp_path: Path) -> None:
    tool, python = Scripted(name="aria2c"), Scripted(name="python")
    small, big = remote("small.txt", b"x" * 10), remote("big.bin", b"y" * 200)
    run = make_run(tmp_path, tool, ranged=python, files=[small, big], max_single_get=100)
    assert run.backend_for(fetcher.make_job(run, small)) is tool
    assert run.backend_for(fetcher.make_job(run, big)) is python
    # A partial already fetched in ranged parts can only be continued in ranges.
    job = fetcher.make_job(run, small)
    job.partial.prepare()
    job.partial.part_map.write_text("{}")
    assert run.backend_for(job) is python
    only_python = make_run(tmp_path / "p", python, files=[big], max_single_get=100)
    assert only_python.backend_for(fetcher.make_job(only_python, big)) is python


@pytest.mark.parametrize("sizes,opened", [((200, 300), False), ((200, 10), True)])
def test_run_downloads_starts_the_tool_only_for_files_it_can_fetch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, int],
        opened: bool) -> None:
    data = {f"f{i}.bin": bytes([65 + i]) * size for i, size in enumerate(sizes)}
    files = [remote(p, d) for p, d in data.items()]
    small = [d for d in data.values() if len(d) <= 100]
    tool = Scripted(*[Step(d) for d in small], name="aria2c")
    python = Scripted(*[Step(d) for d in data.values() if len(d) > 100], name="python")
    monkeypatch.setitem(fetcher.BACKENDS, "aria2c", lambda o, c: tool)
    monkeypatch.setitem(fetcher.BACKENDS, "python", lambda o, c: python)
    tracker = FileTracker.create(tmp_path / "task", "task_001", listing(files), ENDPOINT)
    result = fetcher.run_downloads(
        tracker, list(data), local_dir=tmp_path / "out", endpoint=ENDPOINT, token=None,
        opts=Options(jobs=1, retries=0, max_single_get=100), tool="aria2c", stopper=Stopper(),
        log=LOG, stream=io.StringIO(), quiet=True)
    assert result.files_done == 2 and result.failures == []
    assert tool.opened is opened and tool.calls == len(small)
    assert python.calls == 2 - len(small)
    assert tool.closed and python.closed
    for path, d in data.items():
        assert (tmp_path / "out" / path).read_bytes() == d


# ================================================================ plan_work

CONTENT = {"a.bin": b"a" * 300, "b.bin": b"b" * 200, "c.bin": b"c" * 100, "d.bin": b"d" * 50}
FILES = [remote(p, d) for p, d in CONTENT.items()]


def _planned(tmp_path: Path) -> tuple[FileTracker, Path]:
    """a: complete on disk but recorded pending; b: recorded complete, gone from the disk;
    c: wrong bytes of the right size at its final name; d: failed, nothing on disk."""
    tracker = FileTracker.create(tmp_path / "task", "task_001", listing(FILES), ENDPOINT)
    local = tmp_path / "out"
    local.mkdir()
    (local / "a.bin").write_bytes(CONTENT["a.bin"])
    tracker.complete("b.bin", 200)
    (local / "c.bin").write_bytes(b"x" * 100)
    tracker.attempt_failed("d.bin", "HTTP 500", final=True)
    return tracker, local


def test_plan_work_adopts_files_on_disk_and_refetches_vanished_ones(tmp_path: Path) -> None:
    tracker, local = _planned(tmp_path)
    assert plan_work(tracker, local, None) == WorkList(["b.bin", "c.bin", "d.bin"], 1, 1)
    assert tracker.status["a.bin"]["status"] == "completed"
    assert tracker.status["b.bin"]["status"] == "pending"
    assert tracker.status["b.bin"]["error"] == "missing on disk"
    assert tracker.status["c.bin"]["status"] == "pending"
    assert (local / "c.bin").read_bytes() == b"x" * 100     # left for the download to replace
    assert tracker.status["d.bin"]["status"] == "failed"      # run_task gives it fresh tries


def test_plan_work_for_a_batch_keeps_to_its_files(tmp_path: Path) -> None:
    tracker, local = _planned(tmp_path)
    # b's absence is expected (a batch's other files live on other disks); c is not asked for.
    assert plan_work(tracker, local, ["a.bin", "b.bin", "d.bin"]) == WorkList(["d.bin"], 1, 0)
    assert tracker.status["a.bin"]["status"] == "completed"
    assert tracker.status["b.bin"]["status"] == "completed"
    assert tracker.status["c.bin"]["status"] == "pending"


# ================================================================ TaskTicker

class RecordingStore(TaskStore):
    """A real store for the cancel flag; update() is recorded instead of written to tasks.json."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.updates: list[dict[str, Any]] = []

    def update(self, task_id: str, **fields: Any) -> dict[str, Any]:
        assert task_id == "task_001"
        self.updates.append(fields)
        return fields


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ticker_publishes_changed_counters_at_most_every_n_seconds(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "metadata")
    tracker = FileTracker.create(tmp_path / "task", "task_001", listing(FILES), ENDPOINT)
    clock, stopper = Clock(), Stopper()
    tick = TaskTicker(store, "task_001", tracker, stopper, every=5.0, clock=clock)
    tracker.complete("a.bin", 300)
    clock.now = 104.9
    tick()
    assert store.updates == []                         # changed, but too soon
    clock.now = 105.0
    tick()
    assert store.updates == [tracker.summary()] and store.updates[0]["files_done"] == 1
    tracker.complete("b.bin", 200)
    clock.now = 109.0
    tick()
    assert len(store.updates) == 1
    clock.now = 110.0
    tick()
    assert store.updates[-1]["files_done"] == 2 and store.updates[-1]["bytes_done"] == 500
    clock.now = 120.0
    tick()
    assert len(store.updates) == 2                     # nothing changed: nothing written
    assert stopper.reason is None


def test_ticker_stops_the_run_on_a_cancel_request(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "metadata")
    tracker = FileTracker.create(tmp_path / "task", "task_001", listing(FILES), ENDPOINT)
    stopper = Stopper()
    tick = TaskTicker(store, "task_001", tracker, stopper, every=5.0, clock=Clock())
    tick()
    assert not stopper.event.is_set()
    store.request_cancel("task_001")
    tick()                                             # at once, not every 5 s
    assert stopper.reason is StopReason.CANCELLED and stopper.event.is_set()
    assert store.updates == []


class FullDiskStore(RecordingStore):
    def update(self, task_id: str, **fields: Any) -> dict[str, Any]:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_publishing_counters_stops_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    files = FILES[:2]
    # a.bin completes at once; b.bin waits, so the run is still going when the ticker
    # publishes a.bin's completion.
    python = Scripted(Step(CONTENT["a.bin"]), Step(CONTENT["b.bin"], block=release),
                      name="python")
    monkeypatch.setitem(fetcher.BACKENDS, "python", lambda o, c: python)
    tracker = FileTracker.create(tmp_path / "task", "task_001", listing(files), ENDPOINT)
    stopper = Stopper()
    tick = TaskTicker(FullDiskStore(tmp_path / "metadata"), "task_001", tracker, stopper,
                      every=0.0, clock=Clock())
    try:
        fetcher.run_downloads(
            tracker, [f.path for f in files], local_dir=tmp_path / "out", endpoint=ENDPOINT,
            token=None, opts=Options(jobs=1, retries=0), tool="python", stopper=stopper, log=LOG,
            stream=io.StringIO(), quiet=True, on_tick=tick)
    finally:
        release.set()
    assert stopper.reason is StopReason.DISK_FULL


# ================================================================ Stopper and RateGate

def test_stopper_keeps_the_first_reason() -> None:
    stopper = Stopper()
    assert stopper.reason is None and not stopper.event.is_set()
    stopper.stop("cancelled")
    stopper.stop(StopReason.DISK_FULL, "1 MiB free")
    assert stopper.reason is StopReason.CANCELLED and stopper.detail == ""
    assert stopper.event.is_set()
    with pytest.raises(ValueError):
        Stopper().stop("tired")                        # a misspelt reason is refused


def _timed_wait(gate: RateGate, stop: threading.Event) -> float:
    """How long gate.wait took; a wait that never ends fails the test instead of hanging it."""
    took: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        gate.wait(stop)
        took.append(time.monotonic() - started)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(3.0)
    assert took, "gate.wait did not return"
    return took[0]


def test_an_open_gate_does_not_wait() -> None:
    assert _timed_wait(RateGate(), threading.Event()) < 0.05


def test_a_closed_gate_holds_every_worker_until_the_stop() -> None:
    gate, stop = RateGate(), threading.Event()
    gate.close_for(0.0)                                # closed for (at least) a second of margin
    waited: list[float] = []
    workers = [threading.Thread(target=lambda: waited.append(_timed_wait(gate, stop)))
               for _ in range(2)]
    for w in workers:
        w.start()
    time.sleep(0.15)
    assert waited == []                                # both still held
    stop.set()
    for w in workers:
        w.join(1.0)
    assert len(waited) == 2 and all(0.1 < t < 0.5 for t in waited)


def test_a_closed_gate_opens_when_its_time_is_up() -> None:
    gate = RateGate()
    gate.close_for(-0.85)      # the gate adds a second of margin: this closes it for 0.15 s
    assert 0.1 < _timed_wait(gate, threading.Event()) < 0.6


def test_a_set_stop_passes_a_closed_gate_at_once() -> None:
    gate, stop = RateGate(), threading.Event()
    gate.close_for(60.0)
    stop.set()
    assert _timed_wait(gate, stop) < 0.05
