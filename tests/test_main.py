"""In-process tests of main.py and the policy it hands to the managers: settings, logging,
the endpoint choice, cancel, and the stop-reason-to-exit-status table."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pytest

import config
import downloader
import fetcher
import commands
import logs
import main
import system_monitor
import task_manager
from task_manager import StopReason, TaskState, TaskStore
from tests.helpers import main_state_restored
from utils import ExitStatus, HFDError


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Own folders and environment; main's logging handlers and SIGTERM handler undone after."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("HFDL_", "HF_")) or name in ("METADATA_DIR", "DOWNLOADS_DIR",
                                                        "LOGS_DIR"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with main_state_restored():
        yield


def folders(tmp_path: Path) -> list[str]:
    """Data folders under tmp_path (accepted after the command)."""
    return ["--metadata-dir", str(tmp_path / "metadata"), "--downloads-dir",
            str(tmp_path / "downloads"), "--logs-dir", str(tmp_path / "logs")]


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# ---------------------------------------------------------------- logging

def test_system_monitor_warnings_reach_the_log_file(tmp_path: Path, capsys) -> None:
    path = logs.setup_logging(tmp_path / "logs", verbose=0, quiet=False)
    assert path is not None
    system_monitor.log.warning("disk guard could not measure %s: %s", "/x", "gone")
    for handler in logging.getLogger("hfdl").handlers:
        handler.flush()
    assert "WARNING disk guard could not measure /x: gone" in path.read_text()
    assert "warning: disk guard could not measure /x: gone" in capsys.readouterr().err


# ---------------------------------------------------------------- settings

def test_bad_retry_delay_is_a_usage_error(hub, tmp_path: Path, monkeypatch, capsys) -> None:
    # Before: read with float() in main while downloading, reported as a bug (exit 70).
    hub.add_repo("gpt2", {"config.json": b"{}"})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HFDL_RETRY_BASE_DELAY", "abc")
    code = main.main(["download", "gpt2", "--tool", "python", *folders(tmp_path)])
    err = capsys.readouterr().err
    assert code == ExitStatus.USAGE, err
    lines = error_lines(err)
    assert len(lines) == 1 and "HFDL_RETRY_BASE_DELAY" in lines[0], err
    assert not (tmp_path / "downloads").exists()


@pytest.mark.parametrize("name,value", [("HFDL_PROGRESS_INTERVAL", "0"),
                                        ("HFDL_PROGRESS_INTERVAL", "soon"),
                                        ("HFDL_RETRY_BASE_DELAY", "-1")])
def test_bad_interval_is_a_usage_error(tmp_path: Path, monkeypatch, capsys, name: str,
                                       value: str) -> None:
    monkeypatch.setenv(name, value)
    assert main.main(["list-tasks", *folders(tmp_path)]) == ExitStatus.USAGE
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and name in lines[0]


def test_config_json_shows_retry_delay_and_progress_interval(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    monkeypatch.setenv("HFDL_PROGRESS_INTERVAL", "0.5")
    assert main.main(["config", "--json", *folders(tmp_path)]) == ExitStatus.OK
    js = json.loads(capsys.readouterr().out)
    assert js["retry_base_delay"] == {"value": 1.0, "source": "default"}
    assert js["progress_interval"] == {"value": 0.5, "source": "env HFDL_PROGRESS_INTERVAL"}
    assert main.main(["config", *folders(tmp_path)]) == ExitStatus.OK
    text = capsys.readouterr().out
    assert "retry_base_delay" in text and "[env HFDL_PROGRESS_INTERVAL]" in text


def test_options_come_from_the_config() -> None:
    cfg = config.Config({}, environ={"HFDL_RETRY_BASE_DELAY": "0.25",
                                     "HFDL_PROGRESS_INTERVAL": "2", "HFDL_TOOL": "wget"})
    opts = downloader.options_from_config(cfg, connections=3, jobs=4, retries=1,
                                          stall_timeout=9.0)
    assert (opts.retry_base, opts.progress_interval, opts.tool) == (0.25, 2.0, "wget")
    assert (opts.connections, opts.jobs, opts.retries, opts.stall_timeout) == (3, 4, 1, 9.0)


# ---------------------------------------------------------------- endpoint choice

class _Check:
    def __init__(self, error: str | None) -> None:
        self.error = error


def test_resolve_endpoint_switches_to_the_mirror_with_a_note() -> None:
    cfg = config.Config({}, environ={"HFDL_MIRROR_CANDIDATES": "http://a,http://b"})
    calls = []

    def probe(candidates: list[str], timeout: float):
        calls.append(candidates)
        return "http://b", [_Check("refused"), _Check(None)]

    endpoint, note = config.resolve_endpoint(cfg, probe=probe)
    assert endpoint == "http://b" and note and "http://a did not answer (refused)" in note
    assert cfg.source("endpoint") == "auto-detected" and calls == [["http://a", "http://b"]]
    # once chosen, it is the configured one: no second probe
    assert config.resolve_endpoint(cfg, "http://task", probe=probe) == ("http://b", None)
    assert len(calls) == 1


def test_resolve_endpoint_prefers_configured_then_task_then_no_probe() -> None:
    def probe(candidates: list[str], timeout: float):
        raise AssertionError("no probe expected")

    configured = config.Config({}, environ={"HF_ENDPOINT": "http://set"})
    assert config.resolve_endpoint(configured, "http://task", probe=probe) == ("http://set", None)
    default = config.Config({}, environ={})
    assert config.resolve_endpoint(default, "http://task", probe=probe) == ("http://task", None)
    no_mirror = config.Config({}, environ={"HFDL_NO_MIRROR": "1"})
    assert config.resolve_endpoint(no_mirror, probe=probe) == (config.DEFAULT_ENDPOINT, None)


# ---------------------------------------------------------------- tasks and cancel

def _task(store: TaskStore, **fields) -> str:
    return store.create({"kind": "download", "repo_id": "gpt2", "local_dir": "/data/gpt2", **fields}).id


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_cancel_an_idle_task_marks_it_cancelled(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "metadata")
    tid = _task(store)
    outcome = task_manager.cancel(store, "1", 5.0)
    assert outcome == task_manager.CancelOutcome(tid, False, None)
    assert store.get(tid).status == "cancelled"
    assert store.get(tid).reason == "cancelled by the user"


def test_cancel_a_completed_task_is_refused(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "metadata")
    tid = _task(store)
    store.update(tid, status="completed")
    with pytest.raises(HFDError, match="already completed"):
        task_manager.cancel(store, tid, 5.0)


def test_cancel_waits_for_the_running_process(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "metadata")
    tid = _task(store)
    clock, asked = FakeClock(), []
    with contextlib.ExitStack() as running:
        running.enter_context(store.lock(tid))

        def sleep(seconds: float) -> None:
            clock.sleep(seconds)
            assert store.cancel_requested(tid)
            if clock.sleeps == 3:
                running.close()          # the run saw the flag and let go of its lock

        outcome = task_manager.cancel(store, tid, 30.0, clock=clock, sleep=sleep,
                                      on_asked=lambda t, pid: asked.append((t, pid)))
    assert outcome == task_manager.CancelOutcome(tid, True, os.getpid())
    assert asked == [(tid, os.getpid())] and clock.sleeps == 3


def test_cancel_gives_up_after_the_wait(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "metadata")
    tid = _task(store)
    clock = FakeClock()
    with store.lock(tid):
        with pytest.raises(HFDError, match=r"still running after 2 s") as err:
            task_manager.cancel(store, tid, 2.0, clock=clock, sleep=clock.sleep)
    assert f"PID {os.getpid()}" in str(err.value.hint)
    assert 10 <= clock.sleeps <= 11            # 2 s in steps of 0.2 s, no real time spent


def test_live_says_a_dead_run_was_interrupted(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "metadata")
    tid = _task(store)
    task = store.update(tid, status="running")
    assert store.live(task).status == "paused"
    assert store.live(task).reason == "interrupted (the process died)"
    with store.lock(tid):
        assert store.live(task).status == "running"


def test_status_renders_without_calling_list_tasks(tmp_path: Path, capsys) -> None:
    store = TaskStore(tmp_path / "metadata")
    tid = _task(store, repo_type="model", bytes_total=10, bytes_done=5)
    store.update(tid, status="running")
    assert main.main(["status", *folders(tmp_path)]) == ExitStatus.OK
    listed = capsys.readouterr().out
    assert main.main(["list-tasks", *folders(tmp_path)]) == ExitStatus.OK
    assert capsys.readouterr().out == listed
    assert f"{tid}  paused " in listed and "50.0%" in listed
    assert main.main(["status", tid, "--json", *folders(tmp_path)]) == ExitStatus.OK
    row = json.loads(capsys.readouterr().out)
    assert row["status"] == "paused" and row["running_pid"] is None


# ---------------------------------------------------------------- stop reasons

def test_stopper_keeps_the_first_reason() -> None:
    stopper = fetcher.Stopper()
    stopper.stop(StopReason.DISK_FULL, "1 MiB free")
    stopper.stop(StopReason.INTERRUPTED)
    assert stopper.reason is StopReason.DISK_FULL and stopper.detail == "1 MiB free"
    assert stopper.event.is_set()


@pytest.mark.parametrize("stop,status,code", [
    (StopReason.DISK_FULL, "paused", ExitStatus.DISK_FULL),
    (StopReason.INTERRUPTED, "paused", ExitStatus.INTERRUPTED),
    (StopReason.TERMINATED, "paused", ExitStatus.TERMINATED),
    (StopReason.CANCELLED, "cancelled", ExitStatus.CANCELLED),
    (None, "completed", ExitStatus.OK),
    (None, "failed", ExitStatus.FILES_FAILED),
])
def test_exit_status_follows_the_stop_reason(stop, status, code, capsys) -> None:
    # A reason text that would mislead any parsing of it: the table looks at `stop` only.
    result = fetcher.RunResult(status=TaskState(status), reason="interrupted: nothing to see", stop=stop,
                                  detail="2 MiB free")
    assert commands.report_exit("task_007", result) == code
    err = capsys.readouterr().err
    if stop is StopReason.DISK_FULL:
        assert "error: stopped before the disk filled up (2 MiB free)" in err
        assert "resume task_007" in err
