"""A running task seen from another terminal: the run publishes a small status file
(metadata/tasks/<id>/live.json: bytes on disk with partials, speed over the last minute, ETA,
time of the last byte, files in flight), rewritten atomically every few seconds; `status` and
`list-tasks` read it without taking the task lock, and `status --watch` shows it again and again.
"""
from __future__ import annotations

import contextlib
import io
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TextIO

from utils import MetadataError, UsageError, read_json, write_json_atomic

LIVE_NAME = "live.json"
SCHEMA_VERSION = 1
MAX_AGE = 30.0          # older than this, the file is a leftover (the run publishes every 2 s)
CLEAR = "\x1b[{n}F\x1b[J"       # up n lines to their start, then clear to the end of the screen


def live_path(task_folder: Path) -> Path:
    return Path(task_folder) / LIVE_NAME


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


class LivePublisher:
    """Rewrites the status file at most every `every` seconds from the run's main loop.

    `snapshot` is progress.Progress.snapshot (bytes of the run's scope); `base_bytes` and
    `base_files` are the task's completed files outside that scope (other batches), so the
    file speaks of the whole task while the speed and the ETA speak of this run."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]], *, pid: int,
                 base_bytes: int = 0, base_files: int = 0, task_bytes: int = 0,
                 task_files: int = 0, every: float = 2.0, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.path, self.snapshot, self.pid = Path(path), snapshot, pid
        self.base_bytes, self.base_files = base_bytes, base_files
        self.task_bytes, self.task_files = task_bytes, task_files
        self.every, self.window, self.clock, self.wall = every, window, clock, wall
        self._samples: deque[tuple[float, int]] = deque()
        self._last: float | None = None
        self.writes = 0

    def speed(self) -> float:
        """Bytes per second over the last `window` seconds (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def tick(self, force: bool = False) -> bool:
        """Sample the progress; write the file when `every` seconds passed. True if written."""
        now, snap = self.clock(), self.snapshot()
        self._samples.append((now, snap["bytes_fetched"]))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        if not force and self._last is not None and now - self._last < self.every:
            return False
        self._last = now
        # a status file that cannot be written (disk full) must not stop the download: the
        # reader then shows the recorded counters, and the disk guard deals with the disk
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, self.payload(snap), indent=None)
            self.writes += 1
            return True
        return False

    def payload(self, snap: dict[str, Any]) -> dict[str, Any]:
        speed = self.speed()
        left = snap["bytes_total"] - snap["bytes_on_disk"]
        wall = self.wall()
        return {"schema_version": SCHEMA_VERSION, "pid": self.pid,
                "updated_at": _iso(wall), "updated_ts": wall,
                "bytes_on_disk": self.base_bytes + snap["bytes_on_disk"],
                "bytes_total": max(self.task_bytes, self.base_bytes + snap["bytes_total"]),
                "files_done": self.base_files + snap["files_done"],
                "files_total": max(self.task_files, self.base_files + snap["files_total"]),
                "speed_bps": round(speed, 1),
                "eta_seconds": round(left / speed, 1) if speed > 0 and left > 0 else None,
                "last_byte_at": _iso(snap["last_byte_ts"]), "in_flight": snap["in_flight"]}

    def close(self) -> None:
        """The run is over: the recorded counters speak from now on."""
        with contextlib.suppress(OSError):
            self.path.unlink()


def read_live(path: Path, *, pid: int | None = None, now: float | None = None,
              max_age: float = MAX_AGE) -> dict[str, Any] | None:
    """The status file if it is fresh (and written by `pid` when given), else None. The caller
    checks the task is locked (TaskStore.is_locked) first: a leftover file is never shown."""
    try:
        data = read_json(path)
    except (MetadataError, OSError):
        return None
    stamp = data.get("updated_ts")
    if not isinstance(stamp, (int, float)) or (pid is not None and data.get("pid") != pid):
        return None
    if (time.time() if now is None else now) - stamp > max_age:
        return None
    return data


# ---------------------------------------------------------------- status --watch

def watch_args(watch: str | None, task: str | None) -> tuple[float | None, str | None]:
    """(seconds, task) of `status [TASK] --watch [SECONDS]`; `status --watch task_001` reads
    as the task with the default interval (argparse gives the task to --watch)."""
    if watch is None:
        return None, task
    try:
        every = float(watch)
    except ValueError:
        if task is None:
            return 2.0, watch
        every = -1.0
    if not 0.1 <= every <= 86400:
        raise UsageError(f"--watch: expected a number of seconds from 0.1 to 86400, got {watch!r}",
                         hint="python main.py status task_001 --watch 5")
    return every, task


def capture(show: Callable[[], None]) -> str:
    """What `show` prints on stdout, as text (a frame of `status --watch`)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        show()
    return buffer.getvalue()


def watch(frame: Callable[[], tuple[str, str, bool]], every: float, stream: TextIO, *,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Show `frame()` every `every` seconds until it says the task stopped running: redrawn in
    place on a terminal (the full text), one line per interval otherwise (cron, a pipe).
    `frame` returns (full text, one line, still running)."""
    tty, shown = stream.isatty(), 0
    while True:
        text, line, running = frame()
        if tty:
            if shown:
                stream.write(CLEAR.format(n=shown))
            stream.write(text)
            shown = text.count("\n")
        else:
            stream.write(line.rstrip("\n") + "\n")
        stream.flush()
        if not running:
            return
        sleep(every)
