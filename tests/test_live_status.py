"""A running task seen from another terminal (issue 12 points 1 and 8): `status`/`list-tasks`
show the bytes on disk with partials, speed, ETA, last byte and the files in flight from the
run's status file, without the task lock; `status --watch`; progress never goes backwards on a
stop, in the last progress line, the summary and batch-status."""
from __future__ import annotations

import io
import json
import re
import signal
import time
from pathlib import Path

import pytest

from live_status import read_live, watch, watch_args
from progress import LivePublisher, Progress, live_path
from tests.fakehub import Content
from tests.helpers import size_of, wait_for
from utils import UsageError

BIG = {"big.bin": Content(6_000_000, 7), "small.txt": b"s" * 2000}
BIG_BYTES = sum(map(size_of, BIG.values()))


# ---------------------------------------------------------------- the publisher, in process

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress() -> Progress:
    p = Progress(3, 3000, 1, 1000, io.StringIO(), 60.0, quiet=True, kept={"c": 300})
    p.file_started("b", 200, 1000)
    return p


def test_publisher_writes_every_two_seconds_with_speed_over_a_minute(tmp_path: Path) -> None:
    clock, progress = Clock(), _progress()
    pub = LivePublisher(tmp_path / "live.json", progress.snapshot, pid=42, clock=clock,
                        wall=lambda: 1_000_000.0)
    assert pub.tick()                                # the first tick writes at once
    data = json.loads((tmp_path / "live.json").read_text())
    assert data["bytes_on_disk"] == 1000 + 300 + 200       # done + kept partial + in flight
    assert data["in_flight"] == [{"path": "b", "bytes": 200, "size": 1000}]
    assert data["speed_bps"] == 0 and data["eta_seconds"] is None and data["pid"] == 42
    writes = 0
    for _ in range(40):                              # 10 s of 0.25 s ticks, 100 bytes/s
        clock.now += 0.25
        progress.update("b", progress.active["b"] + 25)
        writes += pub.tick()
    assert writes == 5
    data = json.loads((tmp_path / "live.json").read_text())
    assert data["speed_bps"] == pytest.approx(100, rel=0.01)
    assert data["eta_seconds"] == pytest.approx((3000 - 2500) / 100, rel=0.02)
    assert data["last_byte_at"] is not None
    clock.now += 120                                 # a stall: a minute later speed is 0
    pub.tick()
    clock.now += 2
    pub.tick(force=True)
    assert json.loads((tmp_path / "live.json").read_text())["speed_bps"] == 0
    pub.close()
    assert not (tmp_path / "live.json").exists()


def test_reader_ignores_stale_foreign_and_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "live.json"
    assert read_live(path) is None
    path.write_text("{half")
    assert read_live(path) is None
    path.write_text(json.dumps({"pid": 7, "updated_ts": 1000.0, "bytes_on_disk": 5}))
    assert read_live(path, pid=7, now=1010.0)["bytes_on_disk"] == 5
    assert read_live(path, pid=8, now=1010.0) is None           # another run's leftover
    assert read_live(path, pid=7, now=1100.0) is None           # not rewritten for 100 s


def test_a_stopped_file_keeps_its_bytes_in_the_progress() -> None:
    p = Progress(2, 2000, 0, 0, io.StringIO(), 60.0, quiet=True)
    p.file_started("a", 0, 1000)
    p.update("a", 600)
    p.file_dropped("a", 600)
    assert p.bytes_done() == 600 and p.snapshot()["in_flight"] == []


def test_watch_redraws_on_a_terminal_and_prints_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True
    frames = iter([("a\nb\n", "line 1", True), ("c\nd\n", "line 2", True),
                   ("e\n", "line 3", False)])
    plain = io.StringIO()
    watch(lambda: next(frames), 2, plain, sleep=lambda s: None)
    assert plain.getvalue() == "line 1\nline 2\nline 3\n"
    frames = iter([("a\nb\n", "1", True), ("c\nd\n", "2", False)])
    tty = Tty()
    watch(lambda: next(frames), 2, tty, sleep=lambda s: None)
    assert tty.getvalue() == "a\nb\n\x1b[2F\x1b[Jc\nd\n"


def test_watch_arguments() -> None:
    assert watch_args(None, "task_001") == (None, "task_001")
    assert watch_args("2", "task_001") == (2.0, "task_001")
    assert watch_args("task_001", None) == (2.0, "task_001")       # status --watch task_001
    with pytest.raises(UsageError):
        watch_args("0", "task_001")


# ---------------------------------------------------------------- a real run, another terminal

def _running_download(cli, hub, *args: str):
    hub.add_repo("org/model", BIG)
    hub.bandwidth_per_conn = 400_000
    proc = cli.popen("download", "org/model", "--tool", "python", "-j", "2", *args)
    live = live_path(cli.metadata / "tasks" / "task_001")
    assert wait_for(lambda: _on_disk(live) > 1_000_000, 30), proc.stderr.read()
    return proc


def _on_disk(live: Path) -> int:
    try:
        return json.loads(live.read_text())["bytes_on_disk"]
    except (OSError, ValueError):
        return 0


def test_status_of_a_running_task_shows_partials_speed_eta_and_files_in_flight(cli, hub):
    proc = _running_download(cli, hub)
    try:
        st = json.loads(cli("status", "task_001", "--json").out)
        assert st["status"] == "running" and st["live"] is True
        assert st["bytes_on_disk"] > 1_000_000 > st["bytes_done"]     # the partial counts
        assert st["speed_bps"] > 0 and st["eta_seconds"] > 0 and st["last_byte_at"]
        assert [f["path"] for f in st["in_flight"]] == ["big.bin"]
        assert st["in_flight"][0]["size"] == 6_000_000
        text = cli("status", "task_001").out
        assert re.search(r"bytes: +\d.* on disk, partial files included", text), text
        assert "ETA" in text and "big.bin" in text and "in flight: 1 files" in text
        rows = json.loads(cli("list-tasks", "--json").out)
        assert rows[0]["bytes_on_disk"] > 1_000_000 and rows[0]["speed_bps"] > 0
        table = cli("list-tasks").out
        assert "on disk" in table and "ETA" in table
        # the reader never takes the lock, and never writes anything
        assert not list((cli.metadata / "tasks" / "task_001").glob("*.lock"))
    finally:
        hub.bandwidth_per_conn = None
        assert proc.wait(60) == 0
    assert not live_path(cli.metadata / "tasks" / "task_001").exists()
    st = json.loads(cli("status", "task_001", "--json").out)
    assert st["live"] is False and st["bytes_on_disk"] == BIG_BYTES and st["speed_bps"] is None


def test_a_leftover_status_file_of_a_dead_run_is_not_shown(cli, hub):
    proc = _running_download(cli, hub)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = json.loads(cli("status", "task_001", "--json").out)
    assert st["status"] == "paused" and st["live"] is False and st["in_flight"] == []


def test_status_watch_prints_a_line_per_interval_and_ends_with_the_task(cli, hub):
    proc = _running_download(cli, hub)
    watcher = cli.popen("status", "task_001", "--watch", "0.5")
    time.sleep(2)
    hub.bandwidth_per_conn = None
    assert proc.wait(60) == 0
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) >= 3, out
    assert "running" in lines[0] and "/s, ETA" in lines[0] and "in flight" in lines[0]
    assert "completed" in lines[-1]


def test_status_watch_ctrl_c_is_130(cli, hub):
    proc = _running_download(cli, hub)
    try:
        watcher = cli.popen("status", "--watch", "task_001")
        assert wait_for(lambda: watcher.poll() is None, 2)
        time.sleep(1.5)
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=15)
        assert watcher.returncode == 130 and "Traceback" not in err
        assert "task_001 running" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_status_watch_of_a_task_not_running_prints_once(cli, hub):
    hub.add_repo("small", {"a.txt": b"a"})
    assert cli("download", "small").code == 0
    r = cli("status", "task_001", "--watch")
    assert r.code == 0 and len(r.out.splitlines()) == 1 and "completed" in r.out
    r = cli("status", "--watch", "1")              # every task: none runs, one line
    assert r.code == 0 and r.out.count("\n") == 1 and "no task running" in r.out
    r = cli("status", "task_001", "--watch", "--json")     # a JSON document per line
    assert r.code == 0 and json.loads(r.out)["status"] == "completed"
    r = cli("status", "task_001", "--watch", "0")
    assert r.code == 2 and r.err.startswith("error: --watch")


# ---------------------------------------------------------------- point 8: never backwards

def _done_figures(text: str) -> list[int]:
    units = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    return [int(float(n) * units[u]) for n, u in re.findall(
        r"progress: ([\d.]+) (B|KiB|MiB|GiB) /", text)]


@pytest.mark.parametrize("how", ["sigint", "sigterm", "cancel"])
def test_a_stop_keeps_the_bytes_in_the_last_line_and_the_summary(cli, hub, how):
    proc = _running_download(cli, hub, "--json")
    kept_before = _on_disk(live_path(cli.metadata / "tasks" / "task_001"))
    if how == "cancel":
        assert cli("cancel", "task_001").code == 0
    else:
        proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    figures = _done_figures(err)
    assert figures and figures == sorted(figures), err       # never goes backwards
    summary = json.loads(out)
    assert summary["status"] != "completed"
    assert summary["bytes_done"] >= kept_before > 1_000_000       # the partial is kept
    # the last line says the same, rounded to two decimals of MiB
    assert abs(figures[-1] - summary["bytes_done"]) <= 0.006 * 1024**2, (figures, summary)


def test_an_interrupted_batch_is_paused_with_its_bytes(cli, hub):
    hub.add_repo("org/model", BIG)
    hub.bandwidth_per_conn = 400_000
    disk = cli.root / "disk1"
    proc = cli.popen("batch-download", "org/model", "--available-space", "100MB",
                     "--local-dir", str(disk), "--tool", "python")
    assert wait_for(lambda: sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
                    > 1_000_000, 30), proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    rows = json.loads(cli("batch-status", "task_001", "--json").out)
    row = rows[0] if isinstance(rows, list) else rows["batches"][0]
    assert row["state"] == "paused" and row["stopped"] == "interrupted"
    assert row["bytes_done"] > 1_000_000
    text = cli("batch-status", "task_001").out
    assert "paused (interrupted)" in text and "pending" not in text
    hub.bandwidth_per_conn = None
    r = cli("batch-continue", "task_001", "1", "--local-dir", str(disk))
    assert r.code == 0, r.text
    row = json.loads(cli("batch-status", "task_001", "--json").out)
    row = row[0] if isinstance(row, list) else row["batches"][0]
    assert row["state"] == "completed" and row["stopped"] == ""
