"""End to end at the system level: check-system, the disk preflight, a disk that fills up during a
download (the guard and a real ENOSPC), read-only targets, unreachable endpoints, mirror
auto-detection and HTTP proxies.

Real tmpfs mounts (the tests run as root, CI too), real aria2c/wget, `python main.py` as a
subprocess, and nothing but 127.0.0.1 on the network.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fakehub import Content, FakeHub, content_sha256
from tests.helpers import (
    TOOLS,
    Cli,
    Result,
    assert_same_tree,
    error_lines,
    sha256_file,
    size_of,
    tmpfs,
    tool_processes,
    tree_files,
    wait_for,
)
from utils import format_size

MiB = 2**20
# A partial and its sidecars: .hfdl/partial/NAME[.VERSION].incomplete[.aria2|.parts|.log]
PARTIAL_RE = re.compile(r"^\.hfdl/partial/(?P<final>.+?)(?:\.[0-9a-f]{8,64})?\.incomplete"
                        r"(?:\.aria2|\.parts|\.log)?$")


# ================================================================ helpers

@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(name, size, read_only=False): a real tmpfs under tmp_path, unmounted at teardown."""
    with contextlib.ExitStack() as mounted:
        def make(name: str, size: str, *, read_only: bool = False) -> Path:
            return mounted.enter_context(tmpfs(tmp_path / name, size, read_only=read_only,
                                               mode="0755"))

        yield make


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Background processes of a test: ended (by their own pid) at teardown if still running."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


FILLER = r"""
import errno, os, sys
path, leave = sys.argv[1], int(sys.argv[2])     # leave 0: write until the disk is full
folder, chunk = os.path.dirname(path), b"\xa5" * (256 << 10)
with open(path, "ab", buffering=0) as f:
    while True:
        st = os.statvfs(folder)
        room = st.f_bavail * st.f_frsize - leave
        if leave and room <= 0:
            break
        try:
            f.write(chunk if not leave else chunk[:max(4096, min(len(chunk), room))])
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            break
"""


def fill(path: Path, leave_free: int = 0) -> int:
    """Another process eats the disk until `leave_free` bytes are free (0: until ENOSPC)."""
    res = subprocess.run([sys.executable, "-c", FILLER, str(path), str(leave_free)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    return path.stat().st_size


def bytes_on_disk(path: Path) -> int:
    st = path.stat()
    return min(st.st_size, st.st_blocks * 512)


def partials(folder: Path) -> dict[str, int]:
    """Repo path -> bytes on disk of its partial (one renamed meanwhile is skipped)."""
    found = {}
    for rel, p in tree_files(folder).items() if folder.exists() else ():
        if rel.endswith(".incomplete"):
            with contextlib.suppress(FileNotFoundError):
                found[PARTIAL_RE.match(rel)["final"]] = bytes_on_disk(p)
    return found


def partial_bytes(folder: Path) -> int:
    return sum(partials(folder).values())


def complete_files(folder: Path, files: dict) -> set[str]:
    """The files at their final names; each must be a repo file with its exact size and sha256.
    Sidecars (.incomplete, .aria2, .parts, .log) are allowed; anything else is a defect."""
    done = set()
    for rel, p in tree_files(folder).items():
        partial = PARTIAL_RE.match(rel)
        if partial:
            assert partial["final"] in files, f"stray partial {rel}"
            continue
        assert rel in files, f"unexpected file {rel}"
        assert p.stat().st_size == size_of(files[rel]), f"{rel} at its final name has a wrong size"
        assert sha256_file(p) == content_sha256(files[rel]), f"{rel} at its final name has wrong bytes"
        done.add(rel)
    return done


def metadata_ok(metadata: Path) -> None:
    """Every JSON file parses and no temp file of the atomic writer is left behind."""
    found = list(metadata.rglob("*.json"))
    assert found, f"no metadata in {metadata}"
    for p in found:
        json.loads(p.read_text())
    assert not [p for p in metadata.rglob("*.tmp")], list(metadata.rglob("*.tmp"))


def wait_for_partials(proc: subprocess.Popen, target: Path, nbytes: int) -> None:
    """Until a running download has `nbytes` of partials on disk; else fail with its output."""
    if not wait_for(lambda: partial_bytes(target) >= nbytes or proc.poll() is not None, 30) \
            or proc.poll() is not None:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the download did not get going (exit {proc.returncode}):\n{out}{err}")


def status_of(cli: Cli, task: str = "task_001") -> dict:
    r = cli("status", task, "--json")
    assert r.code == 0, r.text
    return json.loads(r.out)


def closed_port() -> socket.socket:
    """A bound, non-listening socket: connections to its port are refused, nobody can take it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


_SPACE_RE = re.compile(r"not enough space in (?P<path>\S+): (?P<needed>[\d.]+ \w+) needed, "
                       r"(?P<free>[\d.]+ \w+) free \((?P<reserve>[\d.]+ \w+) kept in reserve\)")


def assert_space_refusal(r: Result, *, needed: int, free: int, reserve: int) -> None:
    """Exit 4 with one error line whose numbers are the right ones."""
    assert r.code == 4, r.text
    line = error_lines(r)[0]
    m = _SPACE_RE.search(line)
    assert m, line
    assert (m["needed"], m["free"], m["reserve"]) == \
        (format_size(needed), format_size(free), format_size(reserve)), line
    assert "hint:" in r.err


# ================================================================ check-system

def check_system(cli: Cli, *args: str, env: dict | None = None) -> tuple[Result, dict]:
    r = cli("check-system", *args, "--json", env=env)
    assert r.code in (0, 1), r.text
    report = json.loads(r.out)
    assert report["ok"] is (r.code == 0), r.out
    return r, {c["name"]: c for c in report["checks"]}


def test_check_system_table_and_json(cli, hub, mount):
    disk = mount("disk", "16M")
    r = cli("check-system", "--path", str(disk))
    assert r.code == 0, r.text
    rows = {ln.split()[0]: ln.split()[1] for ln in r.out.splitlines()}
    assert rows == {"disk": "OK", "write": "OK", "endpoint": "OK", "resources": rows["resources"]}
    assert rows["resources"] in ("OK", "WARN")      # low memory is a warning, never a failure
    assert f"16.00 MiB free of 16.00 MiB (0% used) on {disk}" in r.out
    assert f"{hub.url} answered" in r.out and "direct" in r.out
    _, checks = check_system(cli, "--path", str(disk))
    assert list(checks) == ["disk", "write", "endpoint", "resources"]
    d = checks["disk"]["data"]
    assert (d["total"], d["free"], d["mount_point"], d["reserve"], d["size"]) == \
        (16 * MiB, 16 * MiB, str(disk), MiB, 0)
    assert checks["endpoint"]["status"] == "ok" and checks["endpoint"]["data"]["url"] == hub.url
    assert checks["write"]["status"] == "ok" and os.listdir(disk) == []   # the probe is gone
    # a folder still to be created is judged where it would be made, and a check makes nothing
    r = cli("check-system", "--path", str(disk / "new" / "dl"))
    assert r.code == 0 and f"{disk / 'new' / 'dl'} is writable (it will be created)" in r.out, r.out
    assert os.listdir(disk) == []


def test_check_system_size_against_reserve(cli, hub, mount):
    disk = mount("disk", "16M")
    # free 16 MiB - size == reserve 1 MiB is still fine; one byte more is not
    r, checks = check_system(cli, "--path", str(disk), "--size", str(15 * MiB))
    assert r.code == 0 and checks["disk"]["status"] == "ok", r.out
    r = cli("check-system", "--path", str(disk), "--size", str(15 * MiB + 1))
    assert r.code == 1, r.text
    assert re.search(r"^disk\s+FAIL\s+15\.00 MiB needed: does not fit: 16\.00 MiB free \(1\.00 MiB kept in "
                     r"reserve\)", r.out, re.MULTILINE), r.out
    assert "Traceback" not in r.text
    # the reserve: flag, environment, default 1G
    r, checks = check_system(cli, "--path", str(disk), "--reserve", "17M")
    assert r.code == 1 and checks["disk"]["status"] == "fail"
    assert checks["disk"]["data"]["reserve"] == 17 * MiB and "17.00 MiB kept in reserve" in \
        checks["disk"]["message"]
    r, checks = check_system(cli, "--path", str(disk), env={"HFDL_DISK_RESERVE": "16M"})
    assert r.code == 0 and checks["disk"]["data"]["reserve"] == 16 * MiB
    r, checks = check_system(cli, "--path", str(disk), env={"HFDL_DISK_RESERVE": "16777217"})
    assert r.code == 1 and checks["disk"]["status"] == "fail"
    del cli.env["HFDL_DISK_RESERVE"]
    r, checks = check_system(cli, "--path", str(disk))
    assert r.code == 1 and checks["disk"]["data"]["reserve"] == 2**30
    assert "1.00 GiB kept in reserve" in checks["disk"]["message"]


@pytest.mark.parametrize("text,value", [("1073741824", 1073741824), ("1G", 2**30),
                                        ("500GiB", 500 * 2**30), ("10T", 10 * 2**40)])
def test_check_system_size_units(cli, hub, mount, text, value):
    disk = mount("disk", "4M")
    r, checks = check_system(cli, "--path", str(disk), "--size", text)
    assert r.code == 1 and checks["disk"]["status"] == "fail"     # none fits in 4 MiB
    assert checks["disk"]["data"]["size"] == value
    assert f"{format_size(value)} needed" in checks["disk"]["message"]


@pytest.mark.parametrize("bad", ["lots", "12Q", "-5G"])
def test_check_system_bad_size_is_a_usage_error(cli, hub, bad):
    r = cli("check-system", f"--size={bad}")
    assert r.code == 2, r.text
    assert f"invalid size {bad!r}" in error_lines(r)[0]
    assert r.out == ""


def test_check_system_warns_when_nearly_full(cli, hub, mount):
    disk = mount("disk", "16M")
    fill(disk / "filler", leave_free=3 * MiB // 2)           # 14.5 of 16 MiB used: 90.6%
    r = cli("check-system", "--path", str(disk))
    assert r.code == 0, r.text                               # a warning is not a failure
    assert re.search(r"^disk\s+WARN\s+1\.50 MiB free of 16\.00 MiB \(91% used\) on \S+: nearly "
                     r"full", r.out, re.MULTILINE), r.out
    _, checks = check_system(cli, "--path", str(disk))
    assert checks["disk"]["status"] == "warn" and checks["disk"]["data"]["percent_used"] == 90.6
    _, checks = check_system(cli, "--path", str(disk), "--disk-warn-percent", "95")
    assert checks["disk"]["status"] == "ok"
    _, checks = check_system(cli, "--path", str(disk), env={"HFDL_DISK_WARN_PERCENT": "95"})
    assert checks["disk"]["status"] == "ok"
    (disk / "filler").unlink()
    fill(disk / "filler", leave_free=8 * MiB)                # exactly 50% used
    _, checks = check_system(cli, "--path", str(disk))
    assert checks["disk"]["status"] == "ok"
    _, checks = check_system(cli, "--path", str(disk), "--disk-warn-percent", "50")
    assert checks["disk"]["status"] == "warn"
    _, checks = check_system(cli, "--path", str(disk), env={"HFDL_DISK_WARN_PERCENT": "50"})
    assert checks["disk"]["status"] == "warn"
    (disk / "filler").unlink()
    fill(disk / "filler", leave_free=410 * 4096)             # 3686 of 4096 pages: 89.99% used
    _, checks = check_system(cli, "--path", str(disk))
    assert checks["disk"]["status"] == "ok", checks["disk"]    # shown as 90.0, yet below 90
    r = cli("check-system", "--path", str(disk), "--disk-warn-percent", "150")
    assert r.code == 2 and "invalid percentage '150'" in error_lines(r)[0]


def test_check_system_read_only_path(cli, hub, mount):
    ro = mount("ro", "4M", read_only=True)
    r = cli("check-system", "--path", str(ro))
    assert r.code == 1, r.text
    assert re.search(rf"^write\s+FAIL\s+cannot write to {re.escape(str(ro))}: read-only file "
                     r"system$", r.out, re.MULTILINE), r.out
    assert "Traceback" not in r.text
    _, checks = check_system(cli, "--path", str(ro / "not" / "yet"))    # a folder to be created
    assert checks["write"]["status"] == "fail" and checks["write"]["data"]["error"] == \
        "read-only file system"


def test_check_system_endpoint(cli, hub, tmp_path):
    r = cli("check-system", "--path", str(tmp_path), "--endpoint", "http://127.0.0.1:9")
    assert r.code == 1, r.text
    assert re.search(r"^endpoint\s+FAIL\s+http://127\.0\.0\.1:9 unreachable: connection refused "
                     r"\(direct\)$", r.out, re.MULTILINE), r.out
    assert "Traceback" not in r.text
    _, checks = check_system(cli, "--path", str(tmp_path))            # HF_ENDPOINT: the fake hub
    assert checks["endpoint"]["status"] == "ok" and checks["endpoint"]["data"]["url"] == hub.url


# ================================================================ preflight

def three_files() -> dict:
    return {"a.bin": Content(3 * MiB, 11), "b.bin": Content(3 * MiB, 12),
            "c.bin": Content(3 * MiB, 13), "config.json": b'{"n": 3}'}


def test_download_refused_before_anything_is_created(cli, hub, mount):
    files = three_files()
    hub.add_repo("org/big", files)
    disk = mount("disk", "8M")
    target = disk / "big"
    total = sum(map(size_of, files.values()))
    r = cli("download", "org/big", "--local-dir", str(target))
    assert_space_refusal(r, needed=total, free=8 * MiB, reserve=MiB)
    assert str(target) in r.err
    assert os.listdir(disk) == []
    assert json.loads(cli("list-tasks", "--json").out) == []
    assert hub.count(path_contains="/resolve/") == 0
    # a subset that fits: 6 MiB + 8 bytes <= 8 MiB free - 1 MiB reserve
    r = cli("download", "org/big", "--local-dir", str(target), "--include", "a.bin", "b.bin",
            "*.json", "--tool", "python")
    assert r.code == 0, r.text
    assert_same_tree(target, {k: v for k, v in files.items() if k != "c.bin"})


def test_complete_files_are_not_counted_as_needed(cli, hub, mount):
    files = {"a.bin": Content(3 * MiB, 21), "b.bin": Content(3 * MiB, 22)}
    hub.add_repo("org/two", files)
    disk = mount("disk", "8256k")     # 8 MiB + 64 KiB for hf download's small records
    target = disk / "two"
    r = cli("download", "org/two", "--local-dir", str(target), "--include", "a.bin")
    assert r.code == 0, r.text
    # 6 MiB in all would not fit in 5 MiB free - 1 MiB reserve; only b.bin (3 MiB) is needed
    hub.reset_log()
    r = cli("download", "org/two", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert_same_tree(target, files)
    assert hub.file_downloads("a.bin") == 0 and hub.file_downloads("b.bin") == 1
    # the same task after the branch gained a file: only the new file counts
    hub.add_commit("org/two", {"c.bin": Content(1 * MiB, 23)})
    files["c.bin"] = Content(1 * MiB, 23)
    r = cli("download", "org/two", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert_same_tree(target, files)
    # and one that does not fit is refused with the right numbers, the task left as it was
    hub.add_commit("org/two", {"d.bin": Content(2 * MiB, 24)})
    free = free_bytes(disk)
    r = cli("download", "org/two", "--local-dir", str(target), "--tool", "python")
    assert_space_refusal(r, needed=2 * MiB, free=free, reserve=MiB)
    assert "d.bin" not in partials(target) and not (target / "d.bin").exists()
    # the task moved to the new commit: it must not claim to be complete without d.bin
    st = status_of(cli, "task_002")
    assert (st["files_total"], st["bytes_total"]) == (4, 9 * MiB), st
    assert st["status"] != "completed" and st["running_pid"] is None, st


def test_resume_refused_when_the_rest_does_not_fit(cli, hub, mount, procs):
    files = three_files()
    hub.add_repo("org/big", files)
    hub.bandwidth_per_conn = 400_000
    disk = mount("disk", "16M")
    target = disk / "big"
    proc = cli.popen("download", "org/big", "--local-dir", str(target), "--tool", "python",
                     "-j", "3")
    procs.append(proc)
    wait_for_partials(proc, target, 900_000)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 143
    assert status_of(cli)["status"] == "paused"
    done = complete_files(target, files)
    kept = partials(target)
    assert kept
    needed = sum(size_of(d) - kept.get(n, 0) for n, d in files.items() if n not in done)
    fill(disk / "filler", leave_free=needed + MiB - 64 * 1024)
    free = free_bytes(disk)
    assert free - MiB < needed
    hub.bandwidth_per_conn = None
    r = cli("resume", "task_001", "--tool", "python")
    assert_space_refusal(r, needed=needed, free=free, reserve=MiB)
    st = status_of(cli)
    assert st["status"] == "paused" and st["running_pid"] is None
    assert partials(target) == kept
    (disk / "filler").unlink()
    r = cli("resume", "task_001", "--tool", "python")
    assert r.code == 0, r.text
    assert_same_tree(target, files)


# ================================================================ the disk fills up mid-download

def four_files() -> dict:
    return {**{f"shard-{i}.bin": Content(2_900_000, 40 + i) for i in range(4)},
            "config.json": b'{"shards": 4}'}


def start_filling_download(cli: Cli, hub: FakeHub, procs: list, tool: str, target: Path,
                           files: dict, *extra: str) -> subprocess.Popen:
    """A slow download (about 500 kB/s in all: at most 1 MB more between two guard checks) that
    has put some bytes on disk."""
    hub.add_repo("org/shards", files)
    hub.bandwidth_per_conn = 250_000
    proc = cli.popen("download", "org/shards", "--tool", tool, "-j", "2", "-x", "1", *extra)
    procs.append(proc)
    wait_for_partials(proc, target, 600_000)
    return proc


def assert_stopped_for_disk_full(cli: Cli, proc: subprocess.Popen, filled_at: float,
                                 target: Path, files: dict, *,
                                 recorded: bool = True) -> tuple[Result, dict]:
    """Exit 4 within seconds, told why and what next; paused/disk_full; nothing half at a final
    name; no tool left. recorded=False: the metadata shares the full disk, so the pause may not
    be written; `status` must still call it paused (the task is not running)."""
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - filled_at
    r = Result(proc.returncode, out, err)
    assert r.code == 4, r.text
    assert took < 6, f"took {took:.1f} s to stop"
    line = error_lines(r)[0]
    assert line.startswith("error: stopped before the disk filled up"), line
    assert "still to fetch" in line and "resume task_001" in r.err, r.err
    st = status_of(cli)
    assert st["status"] == "paused" and st["running_pid"] is None, st
    assert st["reason"].startswith("disk_full") or not recorded, st
    done = complete_files(target, files)
    assert done != set(files)
    markers = (str(cli.root), f"--stop-with-process={proc.pid}")
    assert wait_for(lambda: not tool_processes(*markers), 5), tool_processes(*markers)
    return r, st


def missing_now(target: Path, files: dict) -> str:
    """What is not on disk yet (formatted): the files not complete, minus their partial bytes."""
    done = complete_files(target, files)
    missing = sum(size_of(d) for n, d in files.items() if n not in done) - partial_bytes(target)
    return format_size(missing)


def told_missing(r: Result) -> str:
    m = re.search(r"; ([\d.]+ \w+) still to fetch", r.err)
    assert m, r.err
    return m[1]


def resume_after_freeing(cli: Cli, hub: FakeHub, filler: Path, tool: str, target: Path,
                         files: dict) -> None:
    filler.unlink()
    hub.bandwidth_per_conn = None
    left = {rel: p.stat().st_size for rel, p in tree_files(target).items()}
    r = cli("resume", "task_001", "--tool", tool)
    assert r.code == 0, f"{r.text}\nfiles before resume: {left}"
    assert_same_tree(target, files)
    assert status_of(cli)["status"] == "completed"


@pytest.mark.parametrize("tool", TOOLS)
def test_disk_guard_stops_a_download_as_the_disk_fills(cli, hub, mount, procs, tool):
    """Another process eats the disk: the guard (every 2 s) stops the run above the reserve.
    Metadata and logs share the disk, as with the default ./metadata ./downloads ./logs."""
    disk = mount("disk", "24M")
    cli.env.update(METADATA_DIR=str(disk / "metadata"), DOWNLOADS_DIR=str(disk / "downloads"),
                   LOGS_DIR=str(disk / "logs"), HFDL_DISK_RESERVE="2M")
    files = four_files()
    target = disk / "downloads" / "org--shards"
    proc = start_filling_download(cli, hub, procs, tool, target, files)
    fill(disk / "filler", leave_free=3 * MiB // 2)
    r, st = assert_stopped_for_disk_full(cli, proc, time.monotonic(), target, files)
    assert "kept in reserve" in st["reason"], st          # the guard, not a failed write
    metadata_ok(disk / "metadata")
    missing = missing_now(target, files)
    resume_after_freeing(cli, hub, disk / "filler", tool, target, files)
    metadata_ok(disk / "metadata")
    # checked last, so that a wrong number does not hide how resume went: partial bytes are
    # kept by resume, so they are not "still to fetch"
    assert told_missing(r) == missing, r.err


@pytest.mark.parametrize("tool", TOOLS)
def test_enospc_during_a_download(cli, hub, mount, procs, tool):
    """The disk fills completely between two guard checks (reserve 0: no guard at all): the
    tool's write fails with ENOSPC, and that must end the run the same way."""
    disk = mount("disk", "24M")
    cli.env["HFDL_DISK_RESERVE"] = "0"
    files = four_files()
    target = disk / "shards"
    proc = start_filling_download(cli, hub, procs, tool, target, files, "--local-dir", str(target))
    fill(disk / "filler")
    assert free_bytes(disk) == 0
    _, st = assert_stopped_for_disk_full(cli, proc, time.monotonic(), target, files)
    assert re.search(r"space|write error", st["reason"]), st      # the failed write, told
    metadata_ok(cli.metadata)
    resume_after_freeing(cli, hub, disk / "filler", tool, target, files)


def test_enospc_with_metadata_on_the_full_disk(cli, hub, mount, procs):
    """The default layout (./metadata, ./downloads, ./logs on one disk) when the disk fills
    completely: saving the state fails with ENOSPC too; still paused/disk_full, exit 4."""
    disk = mount("disk", "24M")
    cli.env.update(METADATA_DIR=str(disk / "metadata"), DOWNLOADS_DIR=str(disk / "downloads"),
                   LOGS_DIR=str(disk / "logs"), HFDL_DISK_RESERVE="0")
    files = four_files()
    target = disk / "downloads" / "org--shards"
    proc = start_filling_download(cli, hub, procs, "python", target, files)
    fill(disk / "filler")
    assert_stopped_for_disk_full(cli, proc, time.monotonic(), target, files, recorded=False)
    metadata_ok(disk / "metadata")
    resume_after_freeing(cli, hub, disk / "filler", "python", target, files)
    metadata_ok(disk / "metadata")


# ================================================================ read-only, unreachable

def test_download_to_a_read_only_target(cli, hub, mount):
    hub.add_repo("gpt2", {"config.json": b"{}", "w.bin": Content(100_000, 5)})
    ro = mount("ro", "8M", read_only=True)
    for target in (ro, ro / "gpt2"):                # the folder itself, or one to be created
        r = cli("download", "gpt2", "--local-dir", str(target))
        assert r.code == 1, r.text
        assert error_lines(r) == [f"error: cannot write to {target}: read-only file system"]
    # too big for the disk as well: read-only is what to fix first (freeing space cannot help)
    hub.add_repo("big", {"w.bin": Content(9 * MiB, 6)})
    r = cli("download", "big", "--local-dir", str(ro / "big"))
    assert r.code == 1, r.text
    assert error_lines(r) == [f"error: cannot write to {ro / 'big'}: read-only file system"]
    assert json.loads(cli("list-tasks", "--json").out) == []
    assert hub.count(path_contains="/resolve/") == 0


def test_download_from_an_unreachable_endpoint(cli, hub):
    r = cli("download", "gpt2", "--endpoint", "http://127.0.0.1:9")
    assert r.code == 1, r.text
    assert error_lines(r)[0].startswith("error: cannot reach http://127.0.0.1:9")
    assert r.out == ""
    assert not (cli.metadata / "tasks.json").exists() and not cli.downloads.exists()


# ================================================================ mirror auto-detection, config

@pytest.fixture
def no_endpoint(cli: Cli) -> Iterator[Callable[[str], None]]:
    """No HF_ENDPOINT; anything that would still go to huggingface.co ends at a closed local port
    (a proxy), so a test can never leave 127.0.0.1. Call it with the candidates."""
    guard = closed_port()
    del cli.env["HF_ENDPOINT"]
    proxy = f"http://127.0.0.1:{guard.getsockname()[1]}"
    cli.env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, NO_PROXY="127.0.0.1,localhost")

    def candidates(value: str) -> None:
        cli.env["HFDL_MIRROR_CANDIDATES"] = value

    yield candidates
    guard.close()


def mirror_notes(r: Result) -> list[str]:
    """The notes about switching to a mirror."""
    return [ln for ln in r.err.splitlines() if ln.startswith("note:") and "mirror" in ln]


def test_mirror_is_used_when_the_first_endpoint_is_down(cli, hub, no_endpoint):
    files = {"config.json": b"{}", "w.bin": Content(200_000, 6)}
    hub.add_repo("gpt2", files)
    with contextlib.closing(closed_port()) as down:
        first = f"http://127.0.0.1:{down.getsockname()[1]}"
        no_endpoint(f"{first},{hub.url}")
        r = cli("download", "gpt2", "--tool", "python")
        assert r.code == 0, r.text
        notes = mirror_notes(r)
        assert len(notes) == 1, r.err
        assert first in notes[0] and f"using the mirror {hub.url}" in notes[0], r.err
        assert_same_tree(cli.downloads / "gpt2", files)
        assert status_of(cli)["status"] == "completed"


@pytest.mark.parametrize("switch", ["--no-mirror", "HFDL_NO_MIRROR=1"])
def test_no_mirror_keeps_the_first_candidate(cli, hub, no_endpoint, switch):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    with contextlib.closing(closed_port()) as down:
        first = f"http://127.0.0.1:{down.getsockname()[1]}"
        no_endpoint(f"{first},{hub.url}")
        flag, env = ([switch], {}) if switch.startswith("--") else ([], dict([switch.split("=")]))
        r = cli("download", "gpt2", "--tool", "python", *flag, env=env)
    assert r.code == 1, r.text
    assert error_lines(r)[0].startswith(f"error: cannot reach {first}"), r.err
    assert mirror_notes(r) == [] and hub.count() == 0
    assert not (cli.metadata / "tasks.json").exists()


def test_first_candidate_wins_when_both_answer(cli, hub, no_endpoint):
    files = {"config.json": b"{}"}
    hub.add_repo("gpt2", files)
    with FakeHub() as second:
        second.add_repo("gpt2", {"config.json": b"[]"})
        no_endpoint(f"{hub.url},{second.url}")
        r = cli("download", "gpt2", "--tool", "python")
        assert r.code == 0, r.text
        assert mirror_notes(r) == [] and f"endpoint {hub.url}" in r.err
        assert_same_tree(cli.downloads / "gpt2", files)
        # the second one got at most the reachability probe
        assert all(rec.path.startswith("/api/models?") for rec in second.records()), \
            [rec.path for rec in second.records()]


def test_config_shows_reserve_and_warning_with_sources(cli, hub):
    def effective(*args: str, env: dict | None = None) -> dict:
        r = cli("config", "--json", *args, env=env)
        assert r.code == 0, r.text
        js = json.loads(r.out)
        return {k: (js[k]["value"], js[k]["source"]) for k in ("disk_reserve", "disk_warn_percent")}

    got = effective()
    assert got["disk_reserve"] == (MiB, "env HFDL_DISK_RESERVE")
    assert float(got["disk_warn_percent"][0]) == 90 and got["disk_warn_percent"][1] == "default"
    got = effective("--reserve", "5G", "--disk-warn-percent", "75")
    assert got["disk_reserve"] == (5 * 2**30, "flag")
    assert float(got["disk_warn_percent"][0]) == 75 and got["disk_warn_percent"][1] == "flag"
    got = effective(env={"HFDL_DISK_WARN_PERCENT": "80"})
    assert float(got["disk_warn_percent"][0]) == 80
    assert got["disk_warn_percent"][1] == "env HFDL_DISK_WARN_PERCENT"
    r = cli("config")
    assert re.search(r"^disk_reserve\s+1\.00 MiB \(1048576 bytes\)\s+\[env HFDL_DISK_RESERVE\]$",
                     r.out, re.MULTILINE), r.out
    assert re.search(r"^disk_warn_percent\s+90(\.0)?%\s+\[default\]$", r.out, re.MULTILINE), r.out
    del cli.env["HFDL_DISK_RESERVE"]
    assert effective()["disk_reserve"] == (2**30, "default")
    r = cli("config", "--disk-warn-percent", "0")
    assert r.code == 2 and "invalid percentage" in error_lines(r)[0]


# ================================================================ proxies

class _Proxy(BaseHTTPRequestHandler):
    """A forwarding HTTP proxy: absolute-URI requests to 127.0.0.1 are sent on as they are
    (method, headers, body; redirects are not followed) and the answer streamed back."""

    protocol_version = "HTTP/1.1"
    HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te",
                     "trailers", "transfer-encoding", "upgrade"})

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        self.server.lines.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        if url.scheme != "http" or url.hostname != "127.0.0.1":
            self.send_error(403, "this test proxy only forwards http://127.0.0.1")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP}
        headers["Via"] = "1.1 test-proxy"
        upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            upstream.request(self.command, target, body=body, headers=headers)
            resp = upstream.getresponse()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in self.HOP:
                    self.send_header(k, v)
            if resp.getheader("Content-Length") is None and self.command != "HEAD" \
                    and resp.status not in (204, 304):
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            while self.command != "HEAD" and (chunk := resp.read1(64 << 10)):
                self.wfile.write(chunk)
        except OSError:
            self.close_connection = True
        finally:
            upstream.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _forward

    def do_CONNECT(self) -> None:
        self.server.lines.append(f"CONNECT {self.path}")  # type: ignore[attr-defined]
        self.send_error(405, "no tunnels in this test")


@pytest.fixture
def proxy() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    server.daemon_threads = True
    server.lines = []  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def proxy_files() -> dict:
    return {"config.json": b'{"proxied": true}',            # small: a regular git file (307)
            "tokenizer/vocab.txt": b"tok\n" * 200,
            "model.safetensors": Content(1_500_000, 8)}      # LFS: a 302 to the CDN


@pytest.mark.parametrize("tool", TOOLS)
def test_http_proxy_carries_api_calls_and_files(cli, hub, proxy, tool):
    files = proxy_files()
    hub.add_repo("org/proxied", files)
    r = cli("download", "org/proxied", "--tool", tool, env={"HTTP_PROXY": proxy.url})
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "org--proxied", files)
    lines = proxy.lines
    assert any(f"{hub.url}/api/models/org/proxied/revision/" in ln for ln in lines), \
        f"the Hub API calls did not go through the proxy: {lines}"
    for name in files:
        assert any(ln.startswith(f"GET {hub.url}/org/proxied/resolve/") and ln.endswith(f"/{name}")
                   for ln in lines), f"{tool}: {name} was not asked through the proxy: {lines}"
    assert any(ln.startswith(f"GET {hub.cdn_url}/lfs/") for ln in lines), \
        f"{tool}: the CDN transfer did not go through the proxy: {lines}"
    assert any(ln.startswith(f"GET {hub.url}/api/resolve-cache/") for ln in lines), lines
    direct = [f"{rec.server} {rec.method} {rec.path}" for rec in hub.records()
              if rec.headers.get("via") != "1.1 test-proxy"]
    assert direct == [], f"{tool}: these requests bypassed the proxy: {direct}"


def test_check_system_goes_through_the_proxy_and_masks_it(cli, hub, proxy, tmp_path):
    port = proxy.url.rsplit(":", 1)[1]
    r = cli("check-system", "--path", str(tmp_path),
            env={"HTTP_PROXY": f"http://ann:s3cr3t@127.0.0.1:{port}"})
    assert r.code == 0, r.text
    assert f"via proxy http://ann:****@127.0.0.1:{port})" in r.out, r.out
    assert "s3cr3t" not in r.text
    assert proxy.lines == [f"GET {hub.url}/api/models?limit=1"]


@pytest.mark.parametrize("tool", TOOLS)
def test_no_proxy_bypasses_the_proxy(cli, hub, proxy, tool):
    files = proxy_files()
    hub.add_repo("org/proxied", files)
    r = cli("download", "org/proxied", "--tool", tool,
            env={"http_proxy": proxy.url, "no_proxy": "127.0.0.1"})
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "org--proxied", files)
    assert proxy.lines == []
    assert hub.count() > 0 and not any("via" in rec.headers for rec in hub.records())
