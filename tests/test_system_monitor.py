"""Tests for system_monitor: real tmpfs mounts, real sockets on 127.0.0.1, no mocks."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import system_monitor as sm
from tests.helpers import tmpfs
from utils import DiskSpaceError, ExitStatus, HFDError

MiB = 2**20
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


# ---------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the CI environment must not carry our 127.0.0.1 requests elsewhere."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def _handler(status: int, delay: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay)
            # A proxy gets the absolute URL in the request line, a server just the path.
            api = urlsplit(self.path).path == "/api/models"
            body = b"[]" if api else b"not found"
            self.send_response(status if api else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass
    return Handler


@contextlib.contextmanager
def http_server(status: int = 200, delay: float = 0.0) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(status, delay))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def alive() -> Iterator[str]:
    with http_server() as url:
        yield url


@pytest.fixture
def closed() -> Iterator[str]:
    """A port bound but not listening: connections are refused, and nobody can take the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def silent() -> Iterator[str]:
    """Listening but never answering: the kernel accepts the connection, nobody reads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------- disk

def test_disk_usage_matches_statvfs(tmp_path: Path) -> None:
    u = sm.disk_usage(tmp_path)
    st = os.statvfs(tmp_path)
    assert u.path == str(tmp_path)
    assert u.total == st.f_blocks * st.f_frsize
    assert abs(u.free - st.f_bavail * st.f_frsize) < 64 * MiB   # others may write meanwhile
    assert 0 <= u.used <= u.total and 0.0 <= u.percent_used <= 100.0
    assert u.device == os.stat(tmp_path).st_dev
    assert str(tmp_path).startswith(u.mount_point)


def test_disk_usage_of_missing_folder_measures_ancestor(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "yet" / "there"
    u = sm.disk_usage(missing)
    assert u.path == str(tmp_path)
    assert not missing.exists()
    assert u.total == sm.disk_usage(tmp_path).total


def test_disk_usage_on_tmpfs_is_exact(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(b"x" * MiB)
        u = sm.disk_usage(mnt / "sub" / "dir")
        st = os.statvfs(mnt)
        assert (u.total, u.free) == (4 * MiB, st.f_bavail * st.f_frsize)
        assert u.used == MiB and u.free == 3 * MiB
        assert u.mount_point == str(mnt)
        assert u.device == os.stat(mnt).st_dev != os.stat(tmp_path).st_dev


# ---------------------------------------------------------------- write

def test_check_writable(tmp_path: Path) -> None:
    assert sm.check_writable(tmp_path) is None
    assert sm.check_writable(tmp_path / "new" / "sub") is None
    assert (tmp_path / "new" / "sub").is_dir()
    assert list((tmp_path / "new" / "sub").iterdir()) == []   # the probe is gone


def test_check_writable_read_only_mount(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        assert sm.check_writable(ro) == "read-only file system"
        assert sm.check_writable(ro / "sub") == "read-only file system"


def test_check_writable_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert sm.check_writable(tmp_path / "file") == "the path is a file, not a folder"
    assert sm.check_writable(tmp_path / "file" / "sub")


def test_check_writable_without_creating(tmp_path: Path) -> None:
    assert sm.check_writable(tmp_path / "new" / "sub", create=False) is None
    assert list(tmp_path.iterdir()) == []                      # no folder, no probe left
    (tmp_path / "file").write_text("x")
    assert sm.check_writable(tmp_path / "file", create=False) == "the path is a file, not a folder"
    assert sm.check_writable(tmp_path / "file" / "sub", create=False) == \
        "a part of the path is a file, not a folder"
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        assert sm.check_writable(ro / "sub", create=False) == "read-only file system"
        assert sm.is_read_only(ro / "sub") and not sm.is_read_only(tmp_path)


def test_chmod_does_not_stop_root(tmp_path: Path) -> None:
    """Why the read-only check uses a ro mount: mode bits do not stop root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        expected = None if os.geteuid() == 0 else "permission denied"
        assert sm.check_writable(folder) == expected
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- preflight

def test_preflight_not_enough_space(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mnt:
        with pytest.raises(DiskSpaceError) as info:
            sm.preflight(mnt, needed=3 * MiB, reserve=2 * MiB)
        msg = str(info.value)
        assert msg == (f"not enough space in {mnt}: 3.00 MiB needed, 4.00 MiB free "
                       f"(2.00 MiB kept in reserve)")
        hint = info.value.hint or ""
        assert "--local-dir" in hint and "batch-download" in hint
        assert info.value.exit_status == ExitStatus.DISK_FULL


def test_preflight_ok(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mnt:
        u = sm.preflight(mnt / "dl", needed=1 * MiB, reserve=1 * MiB)
        assert u.free == 4 * MiB and (mnt / "dl").is_dir()


def test_preflight_read_only(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(HFDError) as info:
            sm.preflight(ro, needed=MiB, reserve=MiB)
        assert type(info.value) is HFDError
        assert "read-only file system" in str(info.value)
        assert "--local-dir" in (info.value.hint or "")


def test_preflight_read_only_beats_not_enough_space(tmp_path: Path) -> None:
    """Freeing space cannot fix a read-only disk: say that first, and create nothing."""
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(HFDError) as info:
            sm.preflight(ro / "dl", needed=100 * MiB, reserve=MiB)
        assert type(info.value) is HFDError
        assert str(info.value) == f"cannot write to {ro / 'dl'}: read-only file system"


# ---------------------------------------------------------------- guard

def test_disk_guard_fires_once_when_free_drops_below_reserve(tmp_path: Path) -> None:
    interval, reserve = 0.2, 2 * MiB
    fired: list[tuple[float, sm.DiskUsage]] = []
    with tmpfs(tmp_path / "mnt") as mnt:
        on_low = lambda u: fired.append((time.monotonic(), u))  # noqa: E731
        with sm.DiskGuard(mnt, reserve, interval, on_low) as g:
            time.sleep(interval)          # calm measurements first
            assert g.last is not None and not fired
            with open(mnt / "filler", "wb") as f:
                while os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize >= reserve:
                    f.write(b"x" * 64 * 1024)
                    f.flush()
            crossed = time.monotonic()
            deadline = crossed + 2 * interval + 0.5
            while not fired and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(2 * interval)      # it must not fire a second time
        assert len(fired) == 1, "on_low not called within ~2 intervals"
        assert fired[0][0] - crossed <= 2 * interval + 0.1
        assert fired[0][1].free < reserve and g.triggered and g.last == fired[0][1]


def test_disk_guard_stops_promptly(tmp_path: Path) -> None:
    guard = sm.DiskGuard(tmp_path, 0, interval=60.0, on_low=lambda u: None).start()
    time.sleep(0.1)
    start = time.monotonic()
    guard.stop()
    assert time.monotonic() - start < 0.5          # an Event wait, not a 60 s sleep
    assert guard.last is not None and not guard.triggered


def test_disk_guard_keeps_going_after_errors(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / ("x" * 300)                   # ENAMETOOLONG: measuring raises every time
    with sm.DiskGuard(bad, 0, interval=0.05, on_low=lambda u: None) as guard:
        time.sleep(0.3)
        assert guard._thread is not None and guard._thread.is_alive()
        assert guard.last is None and "too long" in (guard.last_error or "").lower()
    warnings = [r for r in caplog.records if "could not measure" in r.getMessage()]
    assert len(warnings) == 1                      # logged once, not every interval


# ---------------------------------------------------------------- endpoint

def test_check_endpoint_alive(alive: str) -> None:
    c = sm.check_endpoint(alive)
    assert c.ok and c.status == 200 and c.error is None and c.proxy is None
    assert c.seconds is not None and 0 <= c.seconds < 5


def test_check_endpoint_any_http_answer_is_reachable() -> None:
    with http_server(status=401) as url:
        c = sm.check_endpoint(url)
    assert c.ok and c.status == 401


def test_check_endpoint_closed(closed: str) -> None:
    c = sm.check_endpoint(closed, timeout=2)
    assert not c.ok and c.status is None and c.seconds is None
    assert c.error == "connection refused"


def test_check_endpoint_timeout(silent: str) -> None:
    start = time.monotonic()
    c = sm.check_endpoint(silent, timeout=0.5)
    assert not c.ok and c.error == "timed out after 0.5s"
    assert time.monotonic() - start < 2


def test_check_endpoint_reports_proxy_masked(monkeypatch: pytest.MonkeyPatch, alive: str) -> None:
    # The "proxy" is a local server answering 502, as a proxy does when the host is unreachable.
    with http_server(status=502) as proxy:
        proxy_url = proxy.replace("http://", "http://user:s3cret@")
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        c = sm.check_endpoint(alive)
        assert c.proxy == proxy.replace("http://", "http://user:****@")
        assert not c.ok and c.status == 502 and "proxy" in (c.error or "")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        c = sm.check_endpoint(alive)
        assert c.ok and c.proxy is None


def test_mask_proxy() -> None:
    assert sm.mask_proxy("http://u:p@h:3128") == "http://u:****@h:3128"
    assert sm.mask_proxy("u:p@h:3128") == "u:****@h:3128"
    assert sm.mask_proxy("http://u:p@ss@h:3128/x@y") == "http://u:****@h:3128/x@y"
    assert sm.mask_proxy("http://h:3128") == "http://h:3128"


def test_pick_endpoint_skips_closed(closed: str, alive: str) -> None:
    start = time.monotonic()
    url, checks = sm.pick_endpoint([closed, alive], timeout=2.0)
    assert url == alive
    assert time.monotonic() - start < 2.0 + 1
    assert [c.ok for c in checks] == [False, True]


def test_pick_endpoint_silent_first_costs_at_most_timeout(silent: str, alive: str) -> None:
    start = time.monotonic()
    url, checks = sm.pick_endpoint([silent, alive], timeout=1.0)
    assert url == alive and time.monotonic() - start < 1.0 + 1
    assert checks[0].error == "timed out after 1s"


def test_pick_endpoint_prefers_earlier() -> None:
    with http_server(delay=0.3) as slow, http_server() as fast:
        url, checks = sm.pick_endpoint([slow, fast], timeout=3.0)
    assert url == slow and len(checks) == 1


def test_pick_endpoint_none(closed: str) -> None:
    url, checks = sm.pick_endpoint([closed, closed], timeout=1.0)
    assert url is None and len(checks) == 2 and not any(c.ok for c in checks)


# ---------------------------------------------------------------- report

def test_resources() -> None:
    r = sm.resources()
    assert r.cpu_count >= 1 and len(r.load_avg) == 3
    assert 0 < r.memory_available <= r.memory_total


def test_check_system(tmp_path: Path, alive: str) -> None:
    report = sm.check_system(tmp_path / "dl", reserve=0, endpoint=alive, warn_percent=101)
    assert [c.name for c in report.checks] == ["disk", "write", "endpoint", "resources"]
    by_name = {c.name: c for c in report.checks}
    assert by_name["disk"].status == "ok" and by_name["write"].status == "ok"
    assert by_name["endpoint"].status == "ok" and "direct" in by_name["endpoint"].message
    assert by_name["disk"].data["free"] > 0
    data = json.loads(json.dumps(report.to_json()))
    assert data["checks"][0]["name"] == "disk" and data["ok"] is report.ok
    table = sm.format_report(report)
    assert len(table.splitlines()) == 4
    assert table.splitlines()[0].startswith("disk       OK  ")


def test_check_system_huge_size_fails(tmp_path: Path, closed: str) -> None:
    report = sm.check_system(tmp_path, size=10**18, reserve=MiB, endpoint=closed, timeout=1)
    disk = report.checks[0]
    assert disk.status == "fail" and "needed" in disk.message and "reserve" in disk.message
    assert report.checks[2].status == "fail" and "connection refused" in report.checks[2].message
    assert not report.ok and report.worst == "fail"
    assert "FAIL" in sm.format_report(report)


def test_check_system_warn_threshold_is_not_rounded(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "16m") as mnt:                # 4096 pages of 4 KiB
        (mnt / "f").write_bytes(b"x" * 3685 * 4096)            # 89.97% used, shown as 90.0
        report = sm.check_system(mnt, reserve=0, warn_percent=90)
        assert report.checks[0].data["percent_used"] == 90.0
        assert report.checks[0].status == "ok"                 # not yet at 90%
        (mnt / "g").write_bytes(b"x" * 2 * 4096)               # 90.01%
        assert sm.check_system(mnt, reserve=0, warn_percent=90).checks[0].status == "warn"


def test_check_system_does_not_create_the_folder(tmp_path: Path) -> None:
    report = sm.check_system(tmp_path / "not" / "yet", reserve=0)
    assert report.checks[1].status == "ok" and "will be created" in report.checks[1].message
    assert not (tmp_path / "not").exists()


def test_check_system_warns_when_nearly_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(b"x" * 3 * MiB)
        report = sm.check_system(mnt, reserve=0, warn_percent=70)
    assert [c.name for c in report.checks] == ["disk", "write", "resources"]
    assert report.checks[0].status == "warn" and report.checks[0].data["percent_used"] == 75.0
    assert report.ok and report.worst == "warn"


# ---------------------------------------------------------------- issue 12 point 12

def _html_handler() -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:              # any web server: 200 and a page, whatever the path
            body = b"<!doctype html><html><body>It works!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass
    return Handler


def test_check_system_says_whether_the_size_fits(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        fits = sm.check_system(mnt, size=4 * MiB, reserve=MiB).checks[0]
        assert fits.status == "ok" and fits.data["fits"] is True
        assert fits.message.startswith("4.00 MiB needed: fits, 16.00 MiB free of 16.00 MiB"), \
            fits.message
        no = sm.check_system(mnt, size=16 * MiB, reserve=MiB).checks[0]
        assert no.status == "fail" and no.data["fits"] is False
        assert no.message.startswith("16.00 MiB needed: does not fit: 16.00 MiB free "
                                     "(1.00 MiB kept in reserve)"), no.message
        plain = sm.check_system(mnt, reserve=MiB).checks[0]       # no --size: no verdict
        assert plain.message.startswith("16.00 MiB free of 16.00 MiB"), plain.message


def test_endpoint_check_wants_a_hub_answer_not_any_web_server(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _html_handler())
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert sm.check_endpoint(url).ok                          # reachable, yes
        c = sm.check_endpoint(url, hub_answer=True)
        assert not c.ok and c.hub is False and c.status == 200
        assert "not a Hugging Face Hub endpoint" in (c.error or "")
        report = sm.check_system(tmp_path, reserve=0, endpoint=url, timeout=2)
        endpoint = {c.name: c for c in report.checks}["endpoint"]
        assert endpoint.status == "fail" and not report.ok
        assert endpoint.message.startswith(f"{url}: not a Hugging Face Hub endpoint (HTTP 200, "
                                           f"text/html"), endpoint.message
    finally:
        server.shutdown()
        server.server_close()
    with http_server() as hub_like:                               # /api/models answers JSON
        c = sm.check_endpoint(hub_like, hub_answer=True)
        assert c.ok and c.hub is True
    with http_server(status=401) as private:                      # a JSON refusal is a Hub too
        assert sm.check_endpoint(private, hub_answer=True).ok


def test_the_mount_table_read_without_psutil_is_psutils() -> None:
    """/proc/self/mounts read directly (psutil is not imported at start-up), with the octal
    escapes of names with spaces decoded as psutil does."""
    import psutil
    assert sm._mount_points() == [m.mountpoint for m in psutil.disk_partitions(all=True)]
