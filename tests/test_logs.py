"""What a long run writes (issue 12, points 2, 9 and 10): the log file (a progress line every
interval, the task id on every line of a task, expected errors as one line, nothing from read-only
commands), the terminal (each warning once, through the progress bar's writer; per-file lines only
with -v), and per-file errors in the same plain words whatever the tool."""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

import logs
import main
import progress
from task_manager import TaskStore
from tests.fakehub import Content, FakeHub
from tests.helpers import TOOLS, Cli, error_lines

SIZE = 3_000_000


def log_text(cli: Cli) -> str:
    return (cli.root / "logs" / "download.log").read_text()


def run_lines(text: str) -> list[str]:
    """The log lines of a task's run: from its first line to its outcome line."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if "files to fetch with" in ln)
    end = max(i for i, ln in enumerate(lines) if "bytes fetched in" in ln)
    return lines[start:end + 1]


# ================================================================ 2. the log

def test_the_log_has_a_progress_line_every_interval_and_the_task_on_every_line(cli: Cli,
                                                                               hub: FakeHub):
    hub.add_repo("org/slow", {"a.bin": Content(1_500_000, 4), "b.txt": b"b"})
    hub.bandwidth_per_conn = 500_000
    # 0.01 minutes: a line every 0.6 s of a 3 s download
    r = cli("download", "org/slow", "--tool", "wget", env={"HFDL_LOG_INTERVAL": "0.01"})
    assert r.code == 0, r.text
    lines = run_lines(log_text(cli))
    progress_lines = [ln for ln in lines if " INFO task_001: progress: " in ln]
    assert len(progress_lines) >= 2, lines
    assert "running: wget" in "\n".join(lines)          # a tool's line names the task too
    assert "task_001: done: a.bin (1.43 MiB)" in "\n".join(lines)
    untagged = [ln for ln in lines if not re.match(r"\S+ \S+ \d+ [A-Z]+ task_001: ", ln)]
    assert untagged == []
    assert all(ln.count("task_001:") == 1 for ln in lines), lines     # one mechanism, once


def test_log_interval_is_a_setting_shown_by_config(cli: Cli):
    js = json.loads(cli("config", "--json").out)
    assert js["log_interval"] == {"value": 1.0, "source": "default"}
    js = json.loads(cli("config", "--json", env={"HFDL_LOG_INTERVAL": "5"}).out)
    assert js["log_interval"] == {"value": 5.0, "source": "env HFDL_LOG_INTERVAL"}
    r = cli("config", env={"HFDL_LOG_INTERVAL": "soon"})
    assert r.code == 2 and "HFDL_LOG_INTERVAL" in error_lines(r)[0]


def test_expected_errors_are_one_line_in_the_log(cli: Cli, hub: FakeHub):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    assert cli("download", "no-such/repo").code != 0
    assert cli("resume", "task_042").code != 0
    assert cli("download", "gpt2", "--tool", "python").code == 0
    with TaskStore(cli.metadata).lock("task_001"):          # as a running download holds it
        r = cli("resume", "task_001")
    assert r.code == 6, r.text
    text = log_text(cli)
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if " ERROR " in ln]
    assert len(errors) == 3, errors
    assert "no-such/repo" in errors[0] and "task_042" in errors[1]
    assert "task_001" in errors[2] and "(exit 6)" in errors[2]


def test_a_bug_leaves_its_traceback_in_the_log_even_from_a_read_only_command(
        tmp_path: Path, monkeypatch, capsys) -> None:
    import commands

    def broken(args, cfg):
        raise RuntimeError("a bug")

    monkeypatch.setitem(commands.HANDLERS, "status", broken)
    assert main.main(["--logs-dir", str(tmp_path / "logs"), "status"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("RuntimeError") == 1, err
    assert "Traceback" in (tmp_path / "logs" / "download.log").read_text()


READ_ONLY = [("status",), ("list-tasks",), ("config",), ("task-detail", "task_001"),
             ("list-datasets",), ("batch-status", "task_001")]


def test_read_only_commands_write_nothing_to_the_log(cli: Cli, hub: FakeHub):
    for argv in READ_ONLY:                       # no log yet: none is created, not even its folder
        cli(*argv)
    assert not (cli.root / "logs").exists()
    hub.add_repo("gpt2", {"config.json": b"{}"})
    assert cli("download", "gpt2", "--tool", "python").code == 0
    before = log_text(cli)
    for argv in READ_ONLY:
        cli(*argv)
        cli(*argv, "-v")
    assert log_text(cli) == before


# ================================================================ 9. the terminal

def test_a_warning_prints_once_in_lower_case(cli: Cli, hub: FakeHub):
    hub.add_repo("evil", {"good.txt": b"fine", "../evil.txt": b"owned"})
    r = cli("download", "evil", "--tool", "python")
    assert r.code == 0, r.text
    assert len([ln for ln in r.err.splitlines() if "evil.txt" in ln]) == 1, r.err
    assert "warning: skipped '../evil.txt'" in r.err and "WARNING" not in r.err


def test_a_batch_gap_warning_prints_once(cli: Cli, hub: FakeHub, tmp_path: Path):
    hub.add_repo("org/ds", {f"s{i}.bin": Content(1_000_000, i) for i in range(4)},
                 repo_type="dataset")
    r = cli("plan-batch", "org/ds", "--dataset", "--available-space", "2500K", "--local-dir",
            str(tmp_path / "disk"))
    assert r.code == 0, r.text
    r = cli("batch-continue", "task_001", "2", "--tool", "python")
    assert r.code == 0, r.text
    assert r.err.count("batch 1 is not complete") == 1, r.err
    assert "warning: batch 1 is not complete" in r.err
    assert " WARNING task_001: batch 1 is not complete" in log_text(cli)


def test_per_file_lines_only_with_v_failures_always(cli: Cli, hub: FakeHub):
    files = {f"f{i:04d}.txt": f"file {i}\n".encode() for i in range(200)}
    files["bad.bin"] = Content(100_000, 1)
    hub.add_repo("org/many", files)
    hub.add_fault("status", "bad.bin", count=None, status=503)
    r = cli("download", "org/many", "--tool", "python", "--retries", "1")
    assert r.code == 3, r.text
    assert "done:" not in r.err and "attempt 1" not in r.err
    failed = [ln for ln in r.err.splitlines() if "bad.bin" in ln]
    assert failed == ["warning: failed: bad.bin: server error 503 (attempt 2)"], r.err
    # cron: the announcement, progress lines, the failure and the hint; no line per file
    assert len(r.err.splitlines()) < 15, r.err
    r = cli("resume", "task_001", "--tool", "python", "--retries", "1", "-v")
    assert "bad.bin: attempt 3 failed: server error 503; trying again" in r.err
    assert "warning: failed: bad.bin: server error 503 (attempt 4)" in r.err
    hub.clear_faults()
    r = cli("resume", "task_001", "--tool", "python", "-v")
    assert r.code == 0 and "done: bad.bin (97.66 KiB)" in r.err, r.text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_warnings_and_info_lines_go_above_the_bar(tmp_path: Path, monkeypatch) -> None:
    """On a terminal a warning (or a -v line) is written above the live bar, which is drawn
    again below it, instead of being glued to the bar's line."""
    screen = _Tty()
    monkeypatch.setattr("sys.stderr", screen)
    logs.setup_logging(tmp_path / "logs", verbose=1, quiet=False)
    bar = progress.Progress(2, 2000, 0, 0, screen, interval=5.0)
    bar.tick()
    logging.getLogger("hfdl").warning("the disk is 95%s full", "%")
    logging.getLogger("hfdl").info("done: a.bin (1000 B)")
    bar.close()
    text = screen.getvalue()
    # each line is written on the cleared bar line (`\r...\r`), and the bar drawn again below
    for line in ("warning: the disk is 95% full", "done: a.bin (1000 B)"):
        assert f"\r{line}\n\r  0%|" in text, repr(text)
    assert text.count("the disk is 95% full") == 1


# ================================================================ 10. per-file errors

CASES = {
    # fault -> (add_fault arguments, the message)
    "reset": (dict(kind="reset", after_bytes=1000),
              re.compile(rf"connection closed by the server after \d+ of {SIZE} bytes")),
    "503": (dict(kind="status", status=503), re.compile(r"server error 503")),
    "expired": (dict(kind="expire"),
                re.compile(re.escape("the CDN link expired (403); asking for a new one"))),
    "stall": (dict(kind="stall", after_bytes=1000, seconds=30), re.compile(r"no data for 1 s")),
}
NOT_WANTED = ("aria2c error", "No URI", "wget exited", "urllib3", "HTTPConnectionPool",
              "ConnectionResetError", "Read timed out", "HTTP/1.1")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failed_file_says_why_in_plain_words(cli: Cli, hub: FakeHub, tool: str, case: str):
    wanted = CASES[case][1]
    hub.add_repo("org/m", {"model.safetensors": Content(SIZE, 1), "config.json": b"{}"})
    params = dict(CASES[case][0])
    hub.add_fault(params.pop("kind"), "model.safetensors", count=None, **params)
    r = cli("download", "org/m", "--tool", tool, "--retries", "1", "--stall-timeout", "1")
    assert r.code == 3, r.text
    detail = json.loads(cli("task-detail", "task_001", "--json").out)
    recorded = {f["filename"]: f["error"] for f in detail["files"]}["model.safetensors"]
    assert wanted.fullmatch(recorded), recorded
    assert f"failed: model.safetensors: {recorded}" in r.out       # the summary
    attempts = [ln for ln in log_text(cli).splitlines() if "attempt" in ln]
    assert len(attempts) == 2 and all(wanted.search(ln) for ln in attempts), attempts
    for text in (r.text, log_text(cli)):
        assert not any(bad in text for bad in NOT_WANTED), text
