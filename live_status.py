"""A running task seen from another terminal: the run publishes a small status file
(progress.LivePublisher: metadata/tasks/<id>/live.json, bytes on disk with partials, speed over
the last minute, ETA, time of the last byte, files in flight) every few seconds; `status` and
`list-tasks` read it here without taking the task lock, and `status --watch` shows it again and
again.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from progress import live_path
from task_manager import Task, TaskStore
from utils import MetadataError, UsageError, now_iso, read_json

MAX_AGE = 30.0          # older than this, the file is a leftover (the run publishes every 2 s)
CLEAR = "\x1b[{n}F\x1b[J"       # up n lines to their start, then clear to the end of the screen


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


# ---------------------------------------------------------------- the reader side

View = tuple[Task, int | None, dict[str, Any] | None]      # task, PID running it, live


def live_of(store: TaskStore, task_id: str, pid: int | None) -> dict[str, Any] | None:
    """The running process's status file, read without the task lock; None unless the task
    is locked by `pid` and the file is fresh (a leftover of a dead run is never shown)."""
    return read_live(live_path(store.folder(task_id)), pid=pid) if pid else None


def view(store: TaskStore, task: Task) -> View:
    task = store.live(task)
    pid = store.owner_pid(task.id) if store.is_locked(task.id) else None
    return task, pid, live_of(store, task.id, pid)


def task_views(store: TaskStore, status: str | None) -> list[View]:
    """Each task (in the given state) with the PID running it and its live status, if any."""
    views = [view(store, t) for t in store.all().values()]
    return [v for v in views if not status or v[0].status.value == status]


def task_table(views: list[View], as_json: bool) -> None:
    """`list-tasks` and `status` without a task: the table (render.task_list) of `views`."""
    import render
    render.task_list([t for t, _p, _l in views], as_json, {t.id: p for t, p, _l in views},
                     {t.id: live for t, _p, live in views})


def status_frame(store: TaskStore, task_id: str | None, as_json: bool) -> tuple[str, str, bool]:
    """One look at a task (or all): (what `status` prints, one line of it, still running)."""
    import render
    if task_id:
        views = [view(store, store.get(task_id))]
        text = capture(lambda: render.status(views[0][0], views[0][1], as_json, views[0][2]))
    else:
        views = task_views(store, None)
        text = capture(lambda: task_table(views, as_json))
    shown = views if task_id else [v for v in views if v[1]]     # all tasks: the running ones
    line = "; ".join(render.status_line(t, lv) for t, _p, lv in shown)
    line = (json.dumps(json.loads(text), ensure_ascii=False) if as_json
            else f"{now_iso()} {line or 'no task running'}")
    return text, line, any(pid for _t, pid, _l in views)


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
