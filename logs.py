"""The tool's log: a private (0600) rotated DEBUG file per data folder with the task on each
line and no signed link in it, and stderr lines in the tool's own style that never break the
progress bar. main.py sets it up once per command.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path

from utils import strip_query

log = logging.getLogger("hfdl")


class _NoQuery(logging.Formatter):
    """Lines whose URLs carry no query string: signed links must not be readable in a log."""

    def format(self, record: logging.LogRecord) -> str:
        return strip_query(super().format(record))


class _NoTraceback(_NoQuery):
    """Console lines without the traceback (that goes to the log file, or --debug), in the
    style of the lines we print ourselves: `warning: ...`, `error: ...`; INFO lines (-v) bare."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(logging.makeLogRecord({**record.__dict__, "exc_info": None,
                                                     "exc_text": None}))
        if record.levelno >= logging.WARNING or record.levelno < logging.INFO:
            return f"{record.levelname.lower()}: {text}"
        return text


# extra= of a record for the log file only: its console line is printed another way
FILE_ONLY = {"file_only": True}
# Commands that only read: they write nothing to the log (not even create it).
READ_ONLY = frozenset({"status", "list-tasks", "config", "task-detail", "list-datasets",
                       "batch-status"})


class _Console(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr through the progress bar's writer: a warning never breaks the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return
        import progress
        try:
            progress.write(self.format(record), self.stream)
        except Exception:
            self.handleError(record)


def _private_open(path: str, flags: int) -> int:
    """Log files are ours alone (0600), also one a run before this rule made readable."""
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        pass
    return fd


class _PrivateLog(logging.handlers.RotatingFileHandler):
    """The rotated log, every file of it created 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=_private_open)


def setup_logging(logs_dir: Path, verbose: int, quiet: bool, to_file: bool = True) -> Path | None:
    """WARNING (minus 10 per -v) on stderr, and unless `to_file` is off (read-only commands)
    a rotated DEBUG log file per data folder, each line of a task naming it."""
    log.setLevel(logging.DEBUG)
    for old in list(log.handlers):       # main() run again in one process: no stale handlers
        log.removeHandler(old)
        old.close()
    console = _Console(sys.stderr)
    console.setLevel(logging.ERROR if quiet else max(logging.DEBUG, logging.WARNING - 10 * verbose))
    console.setFormatter(_NoTraceback("%(message)s"))
    log.addHandler(console)
    logging.raiseExceptions = False      # a full disk must not print "--- Logging error ---"
    return open_log_file(logs_dir) if to_file else None


class _Queued(logging.handlers.QueueHandler):
    """The log file written by a thread of its own: a download worker only queues its line, it
    never waits on the file's lock, write, flush and rollover check while 31 others queue up
    behind it (3,000 small files at -j 32: 489 s of the workers' time summed went to waiting
    for that lock). A warning or error is written before its caller goes on (flush), and
    close() writes what is queued, then closes the file."""

    def __init__(self, target: logging.Handler) -> None:
        import queue
        lines: queue.SimpleQueue[logging.LogRecord | threading.Event | None] = queue.SimpleQueue()
        super().__init__(lines)           # type: ignore[arg-type]
        self.target, self.lines = target, lines
        self.writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self.writer.start()

    def _write(self) -> None:
        while (item := self.lines.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            else:
                self.target.handle(item)

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        """Return once every line queued so far is in the file."""
        if self.writer.is_alive():
            written = threading.Event()
            self.lines.put(written)
            written.wait(5.0)

    def close(self) -> None:
        if self.writer.is_alive():
            self.lines.put(None)
            self.writer.join(5.0)
        self.target.close()
        super().close()


def open_log_file(logs_dir: Path) -> Path | None:
    """Add the log file (logs_dir/download.log) to the handlers; None when it cannot be written."""
    from task_manager import TaskTag
    path = Path(logs_dir) / "download.log"
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = _PrivateLog(path, maxBytes=10 << 20, backupCount=5, encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the log at %s (%s); logging to stderr only", path, exc.strerror)
        return None
    handler.setFormatter(_NoQuery("%(asctime)s %(process)d %(levelname)s %(task)s%(message)s"))
    queued = _Queued(handler)
    queued.addFilter(TaskTag())          # in the thread that logs: the task is that thread's
    log.addHandler(queued)
    return path
