"""What a run shows while it works: bytes and files done, speed and ETA, as a tqdm bar on a
terminal or a plain line every few seconds otherwise (cron, CI); `write` puts any other line
(a warning, a per-file line with -v) above the bar; and, for other terminals, a small status
file rewritten every few seconds (live_status reads it).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TextIO

from utils import format_duration, format_size, write_json_atomic


BAR_FORMAT = "{percentage:3.0f}%|{bar}| {desc}"


def write(line: str, stream: TextIO) -> None:
    """One line for the user (a warning, a per-file line) that never breaks a live bar: tqdm
    writes it above the bar. Without tqdm imported there is no bar: a plain line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        print(line, file=stream, flush=True)
    else:
        tqdm_module.tqdm.write(line, file=stream)
        stream.flush()


class Progress:
    """Bytes and files done, speed, ETA: a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, total_files: int, total_bytes: int, done_files: int, done_bytes: int,
                 stream: TextIO, interval: float, quiet: bool = False,
                 kept: dict[str, int] | None = None) -> None:
        self.total_files, self.total_bytes = total_files, total_bytes
        self.done_files, self.base_bytes = done_files, done_bytes
        self.active: dict[str, int] = {}
        # partial bytes of files not in flight (waiting, or stopped): done bytes of the task,
        # never fetched again, so a stop never makes the numbers go backwards
        self.kept: dict[str, int] = dict(kept or {})
        self.sizes: dict[str, int] = {}
        self.fetched = 0
        self.last_byte_at: float | None = None      # wall clock (time.time) of the last byte
        self._lock = threading.Lock()
        self.stream, self.interval, self.quiet = stream, interval, quiet
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque(maxlen=40)
        self._last_line = time.monotonic()
        self.bar = None
        if not quiet and stream.isatty():
            from tqdm import tqdm
            # A terminal that reports no width (a bare pty) still gets an 80-column bar.
            # Asked of the terminal itself: COLUMNS in the environment says nothing about it.
            try:
                sized = os.get_terminal_size(stream.fileno()).columns > 0
            except (OSError, ValueError, AttributeError):
                sized = False
            # tqdm's own scaling says "MB" for MiB: the bar shows our numbers (format_size,
            # as the plain lines and `status` do) in its description instead.
            self.bar = tqdm(total=total_bytes, initial=done_bytes, bar_format=BAR_FORMAT,
                            file=stream, dynamic_ncols=sized,
                            ncols=None if sized else 80, nrows=None if sized else 24,
                            leave=True)

    def update(self, path: str, have: int) -> None:
        with self._lock:
            before = self.active.get(path, 0)
            if have > before:
                self.fetched += have - before
                self.last_byte_at = time.time()
            self.active[path] = have

    def file_done(self, path: str, size: int, ok: bool, message: str) -> None:
        with self._lock:
            self.active.pop(path, None)
            self.sizes.pop(path, None)
            if ok:
                self.done_files += 1
                self.base_bytes += size
        if message and not self.quiet:
            write(message, self.stream)

    def file_started(self, path: str, have: int, size: int = 0) -> None:
        """Bytes already in the partial count as done, not as fetched by this run."""
        with self._lock:
            self.kept.pop(path, None)
            self.active[path] = have
            self.sizes[path] = size

    def file_dropped(self, path: str, kept: int = 0) -> None:
        """A file left for the next run: the `kept` bytes of its partial stay done bytes."""
        with self._lock:
            self.active.pop(path, None)
            self.sizes.pop(path, None)
            if kept:
                self.kept[path] = kept

    def bytes_done(self) -> int:
        with self._lock:
            return self._done_locked()

    def _done_locked(self) -> int:
        return self.base_bytes + sum(self.kept.values()) + sum(self.active.values())

    def snapshot(self) -> dict[str, Any]:
        """What another terminal sees of this run (live_status publishes it)."""
        with self._lock:
            return {"bytes_on_disk": self._done_locked(), "bytes_total": self.total_bytes,
                    "files_done": self.done_files, "files_total": self.total_files,
                    "bytes_fetched": self.fetched, "last_byte_ts": self.last_byte_at,
                    "in_flight": [{"path": p, "bytes": have, "size": self.sizes.get(p, 0)}
                                  for p, have in sorted(self.active.items())]}

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        done = self.bytes_done()
        self._samples.append((now, self.fetched))
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = min(done, self.total_bytes)
            self.bar.set_description_str(self.figures(done, self.speed()), refresh=False)
            self.bar.refresh()
            return
        if force or now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(final=force), file=self.stream, flush=True)

    def speed(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, final: bool = False) -> str:
        done, speed = self.bytes_done(), self.speed()
        if final:       # the average over the run, not the last few seconds
            elapsed = time.monotonic() - self.started
            speed = self.fetched / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        return (f"progress: {format_size(done)} / {format_size(self.total_bytes)} ({pct:.1f}%), "
                + self.figures(done, speed, sizes=False))

    def figures(self, done: int, speed: float, sizes: bool = True) -> str:
        """Bytes (in format_size units: MiB as MiB), files, speed and ETA, for bar and lines."""
        eta = (self.total_bytes - done) / speed if speed > 0 else None
        head = f"{format_size(done)} / {format_size(self.total_bytes)}, " if sizes else ""
        return (f"{head}{self.done_files}/{self.total_files} files, {format_size(speed)}/s, "
                f"ETA {format_duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the status file

LIVE_NAME = "live.json"
SCHEMA_VERSION = 1


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
