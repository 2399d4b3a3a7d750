"""Hub API calls: timeouts, retries with backoff, the capped Retry-After, signals (issue 10,
points 12 and 13), and two downloads of one repo started together (point 11)."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fakehub import Content
from tests.helpers import assert_same_tree, error_lines, wait_for


class Silent(str):
    """The URL of a server that accepts and never answers; `held`: connections accepted."""

    held: list[socket.socket]


@pytest.fixture
def silent_server() -> Iterator[Silent]:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    url = Silent(f"http://127.0.0.1:{srv.getsockname()[1]}")
    url.held = held
    yield url
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_api_call_to_a_silent_server_times_out_with_one_line(cli, silent_server):
    started = time.monotonic()
    r = cli("download", "gpt2", "--endpoint", silent_server, env={"HFDL_API_TIMEOUT": "0.5"},
            timeout=30)
    assert r.code == 1, r.text
    assert time.monotonic() - started < 15
    line = error_lines(r)[0]
    assert f"cannot reach {silent_server}" in line and "no answer within 0.5 s" in line
    assert "--endpoint" in r.err


def test_sigterm_during_a_hanging_api_call_exits_143(cli, silent_server):
    proc = cli.popen("download", "gpt2", "--endpoint", silent_server,
                     env={"HFDL_API_TIMEOUT": "60"})
    # python has started (its handlers are set) and is waiting for the answer
    assert wait_for(lambda: bool(silent_server.held), 30)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert "Traceback" not in err


def test_ctrl_c_during_a_hanging_api_call_exits_130(cli, silent_server):
    proc = cli.popen("download", "gpt2", "--endpoint", silent_server,
                     env={"HFDL_API_TIMEOUT": "60"})
    assert wait_for(lambda: bool(silent_server.held), 30)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_api_503_twice_then_ok_is_retried(cli, hub):
    files = {"config.json": b"{}", "w.bin": Content(200_000, 1)}
    hub.add_repo("gpt2", files)
    hub.add_fault("status", "/api/models/gpt2/*", count=2, status=503, where="api")
    r = cli("download", "gpt2", "--tool", "python")
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "gpt2", files)
    assert [rec.status for rec in hub.records(path_contains="/api/models/gpt2/revision")] == \
        [503, 503, 200]


def test_api_503_forever_fails_with_one_line(cli, hub):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    hub.add_fault("status", "/api/models/gpt2/*", count=None, status=503, where="api")
    r = cli("download", "gpt2")
    assert r.code == 1, r.text
    assert "answered an error for model gpt2: HTTP 503 (4 tries)" in error_lines(r)[0]
    assert hub.count(path_contains="/api/models/gpt2/revision") == 4


def test_api_tree_page_429_waits_retry_after_and_succeeds(cli, hub):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    hub.add_fault("429", "/api/models/gpt2/tree/*", count=1, retry_after=1, where="api")
    started = time.monotonic()
    r = cli("download", "gpt2")
    assert r.code == 0, r.text
    assert time.monotonic() - started >= 1.0
    tree = [rec for rec in hub.records(path_contains="/api/models/gpt2/tree")]
    assert [rec.status for rec in tree] == [429, 200]
    assert tree[1].time - tree[0].time >= 0.9
    assert "rate limited by the Hub: waiting 1 s" in r.err


def test_api_retry_after_is_capped(cli, hub):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    hub.add_fault("429", "/api/models/gpt2/revision/*", count=1, retry_after=99999999,
                  where="api")
    r = cli("download", "gpt2", env={"HFDL_MAX_RETRY_WAIT": "1"}, timeout=30)
    assert r.code == 0, r.text
    assert r.err.count("rate limited by the Hub: waiting 1 s (Retry-After asked 99999999 s; "
                       "capped)") == 1, r.err


@pytest.mark.parametrize("tool", ["python", "wget", "aria2c"])
def test_file_retry_after_is_capped(cli, hub, tool):
    files = {"config.json": b"{}", "w.bin": Content(100_000, 2)}
    hub.add_repo("gpt2", files)
    # aria2c does not show response headers: it asks again with a HEAD (hence count 2)
    hub.add_fault("429", "w.bin", count=2, retry_after=99999999, methods=("GET", "HEAD"))
    started = time.monotonic()
    r = cli("download", "gpt2", "--tool", tool, env={"HFDL_MAX_RETRY_WAIT": "1"}, timeout=60)
    assert r.code == 0, r.text
    assert time.monotonic() - started < 30
    assert_same_tree(cli.downloads / "gpt2", files)
    assert "rate limited by the Hub: waiting 1 s (Retry-After asked 99999999 s; capped)" in r.err


def test_api_settings_in_config(cli):
    js = json.loads(cli("config", "--json", env={"HFDL_API_TIMEOUT": "5,30"}).out)
    assert js["api_timeout"] == {"value": "5,30", "source": "env HFDL_API_TIMEOUT"}
    assert js["max_retry_wait"]["value"] == 600
    r = cli("config", env={"HFDL_API_TIMEOUT": "soon"})
    assert r.code == 2 and "HFDL_API_TIMEOUT" in error_lines(r)[0]


def test_twenty_downloads_of_one_repo_started_together_make_one_task(cli, hub, monkeypatch):
    """All 20 processes are held at the tree listing and released at once, so they reach
    find-or-create together; the files come slowly, so the first is still running."""
    from tests import fakehub
    files = {"a.bin": Content(150_000, 1), "b.bin": Content(150_000, 2), "c.txt": b"c" * 999}
    hub.add_repo("org/m", files)
    hub.bandwidth_per_conn = 150_000          # about a second per file
    release = threading.Event()
    waiting: list[int] = []
    tree = fakehub._Handler._tree

    def held_tree(self, *a, **kw):
        waiting.append(1)          # the request is logged only once answered
        release.wait(60)
        return tree(self, *a, **kw)

    monkeypatch.setattr(fakehub._Handler, "_tree", held_tree)
    procs = [cli.popen("download", "org/m", "--tool", "python", "-q") for _ in range(20)]
    try:
        assert wait_for(lambda: len(waiting) >= 20, 60)
    finally:
        release.set()
    codes = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        codes.append(p.returncode)
        if p.returncode == 6:
            assert "is being run by another process" in err, err
    assert set(codes) <= {0, 6} and codes.count(0) >= 1, codes
    tasks = json.loads((cli.metadata / "tasks.json").read_text())["tasks"]
    assert list(tasks) == ["task_001"] and tasks["task_001"]["status"] == "completed"
    assert_same_tree(cli.downloads / "org--m", files)


@pytest.mark.parametrize("args,needle", [
    (["download", "gpt2", "--stall-timeout", "inf"], "--stall-timeout"),
    (["download", "gpt2", "--stall-timeout", "1e300"], "--stall-timeout"),
    (["download", "gpt2", "--stall-timeout", "nan"], "--stall-timeout"),
    (["download", "gpt2", "--revision", ""], "--revision"),
    (["download", "gpt2", "--revision", "  "], "--revision"),
    (["cancel", "task_001", "--wait", "inf"], "--wait"),
])
def test_bad_numbers_and_empty_revision_are_usage_errors(cli, args, needle):
    r = cli(*args)
    assert r.code == 2, r.text
    assert needle in error_lines(r)[0]


def test_rate_gate_caps_the_wait_and_says_so_once(caplog):
    import logging

    from fetcher import RateGate
    gate, log = RateGate(), logging.getLogger("hfdl.test")
    with caplog.at_level(logging.WARNING, logger="hfdl.test"):
        started = time.monotonic()
        for _ in range(4):                   # four workers hit the same 429
            gate.close_for(99999999, 0.2, log)
        gate.wait(threading.Event())
    assert time.monotonic() - started < 3
    assert [r.getMessage() for r in caplog.records] == [
        "rate limited by the Hub: waiting 0.2 s (Retry-After asked 99999999 s; capped)"]
