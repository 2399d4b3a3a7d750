"""Moving one file's bytes: failure kinds and what the downloader does with them, the Partial
object, the python backend against an in-process fake Hub, and the aria2c daemon's temp folder
after a stop."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from urllib.parse import urlsplit
import time
from pathlib import Path

import pytest

import downloader
import fetcher
from dataset_manager import RemoteFile, file_url
from transfer import (FailureKind, FetchError, Job, PythonBackend, http_error,
                      retry_after_seconds)
from tests.helpers import tool_processes
from partial import Partial

# ================================================================ failures and actions


@pytest.mark.parametrize("status,headers,kind", [
    (429, {"Retry-After": "7"}, FailureKind.RATE_LIMITED),
    (401, {"X-Error-Code": "GatedRepo"}, FailureKind.DENIED),
    (403, {"X-Error-Code": "GatedRepo"}, FailureKind.DENIED),
    (401, {"X-Error-Code": "RepoNotFound"}, FailureKind.DENIED),
    (401, {}, FailureKind.TRANSIENT),               # no Hub error code: maybe a proxy, retry
    (403, {}, FailureKind.TRANSIENT),               # an expired CDN link: resolve again
    (404, {"X-Error-Code": "EntryNotFound"}, FailureKind.NOT_FOUND),
    (404, {}, FailureKind.NOT_FOUND),
    (416, {}, FailureKind.BAD_PARTIAL),
    (500, {}, FailureKind.TRANSIENT),
    (503, {}, FailureKind.TRANSIENT),
])
def test_http_error_kinds(status: int, headers: dict[str, str], kind: FailureKind) -> None:
    error = http_error(status, "http://hub/x", headers)
    assert error.kind is kind
    assert str(status) in str(error)


def test_http_error_429_carries_a_wait() -> None:
    assert http_error(429, "u", {"Retry-After": "7"}).retry_after == 7.0
    assert http_error(429, "u", {}).retry_after == 5.0          # no header: a default wait
    assert http_error(500, "u", {"Retry-After": "7"}).retry_after is None


@pytest.mark.parametrize("headers,seconds", [
    ({"Retry-After": "12"}, 12.0),
    ({"Retry-After": " 3 "}, 3.0),
    ({"RateLimit": '"resolvers";r=0;t=42'}, 42.0),
    ({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT", "RateLimit": '"api";r=0;t=9'}, 9.0),
    ({"Retry-After": "soon"}, None),
    ({}, None),
])
def test_retry_after_seconds(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after_seconds(headers) == seconds


def test_every_failure_kind_has_one_action() -> None:
    A = fetcher.Action
    assert set(fetcher.ON_FAILURE) == set(FailureKind)
    assert fetcher.ON_FAILURE == {
        FailureKind.TRANSIENT: A.RETRY,
        FailureKind.RATE_LIMITED: A.WAIT,
        FailureKind.DENIED: A.GIVE_UP,
        FailureKind.NOT_FOUND: A.GIVE_UP,
        FailureKind.BAD_PARTIAL: A.DISCARD,
        FailureKind.DISK_FULL: A.STOP_RUN,
        FailureKind.STOPPED: A.PAUSE,
    }


def test_fetch_error_defaults_to_transient() -> None:
    error = FetchError("connection lost")
    assert error.kind is FailureKind.TRANSIENT and error.retry_after is None


def test_downloader_keeps_its_public_names() -> None:
    assert fetcher.Options().tool == "auto"
    assert fetcher.RunResult(status="completed").status == "completed"
    assert downloader.choose_tool("python") == "python"


# ================================================================ Partial

HASH = "0123456789abcdef" * 4


def test_partial_names_the_version(tmp_path: Path) -> None:
    p = Partial(tmp_path, "sub/model.bin", HASH)
    side = tmp_path / ".hfdl/partial/sub"          # out of the repo's own namespace
    assert p.path == side / "model.bin.0123456789.incomplete"
    assert p.control == side / "model.bin.0123456789.incomplete.aria2"
    assert p.part_map == side / "model.bin.0123456789.incomplete.parts"
    assert Partial(tmp_path, "sub/model.bin", "f" * 64).path != p.path


def test_partial_of_a_long_name_fits_name_max(tmp_path: Path) -> None:
    p = Partial(tmp_path, "x" * 250, HASH)
    assert len(p.part_map.name.encode()) <= 255
    assert p.path.name.endswith(".0123456789.incomplete")


def test_partial_kind(tmp_path: Path) -> None:
    p = Partial(tmp_path, "f.bin", HASH)
    p.prepare()
    assert p.kind() == "none"
    p.part_map.write_text("{}")
    assert p.kind() == "none"                    # a side file alone holds no bytes
    p.part_map.unlink()
    p.path.write_bytes(b"x" * 10_000)
    assert p.kind() == "seq"
    p.part_map.write_text("{}")
    assert p.kind() == "parts"
    p.part_map.unlink()
    p.control.write_bytes(b"")                   # aria2c could not save it: unreadable
    assert p.kind() == "seq" and not p.control.exists()
    p.control.write_bytes(b"\0" * 64)
    assert p.kind() == "aria2"
    p.control.unlink()
    with open(p.path, "r+b") as f:               # segments killed before the control file
        f.truncate(50 << 20)
    assert p.kind() == "sparse"


def test_partial_bytes_on_disk_counts_blocks_not_length(tmp_path: Path) -> None:
    p = Partial(tmp_path, "f.bin", HASH)
    assert p.bytes_on_disk() == 0
    p.prepare()
    p.path.write_bytes(b"y" * 5000)
    assert p.bytes_on_disk() == 5000
    with open(p.path, "r+b") as f:
        f.truncate(64 << 20)
    assert p.bytes_on_disk() < 1 << 20


def test_partial_discard_removes_side_files(tmp_path: Path) -> None:
    p = Partial(tmp_path, "f.bin", HASH)
    p.prepare()
    for path in p.files():
        path.write_bytes(b"z")
    (tmp_path / "f.bin").write_bytes(b"final")   # not the partial's to remove
    p.discard()
    assert sorted(x.name for x in tmp_path.iterdir()) == [".hfdl", "f.bin"]
    assert not list(p.path.parent.iterdir())
    p.discard()                                  # nothing left: no error


def test_partial_promote_to(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "f.bin"
    final.parent.mkdir()
    p = Partial(tmp_path, "sub/f.bin", HASH)
    p.prepare()
    p.path.write_bytes(b"whole")
    p.part_map.write_text("{}")
    p.control.write_bytes(b"c")
    p.promote_to(final)
    assert final.read_bytes() == b"whole"
    assert sorted(x.name for x in final.parent.iterdir()) == ["f.bin"]
    assert not list(p.path.parent.iterdir())


# ================================================================ the python backend

REPO = "org/model"


def _data(size: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


FILES = {"big.bin": _data(3_000_000, 1), "small.txt": b"hello\n" * 10}


def _job(hub, tmp_path: Path, path: str, *, connections: int = 1,
         max_single_get: int = 50 * 10**9) -> Job:
    entry = hub.file_info(REPO, path)
    f = RemoteFile(path, entry.size, entry.oid, entry.sha256 if entry.lfs else None)
    final = tmp_path / "out" / path
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Partial(tmp_path / "out", path, f.expected_hash)
    partial.prepare()
    return Job(file=f, final=final, partial=partial,
               url=file_url(hub.url, REPO, "model", "main", path), token=None,
               endpoint=hub.url, connections=connections, max_single_get=max_single_get)


@pytest.fixture
def repo_hub(hub):
    hub.add_repo(REPO, FILES)
    return hub


@pytest.mark.parametrize("path", sorted(FILES))
def test_python_backend_streams_and_hashes(repo_hub, tmp_path: Path, path: str) -> None:
    job = _job(repo_hub, tmp_path, path)
    seen: list[int] = []
    digest = PythonBackend(10.0).fetch(job, seen.append, threading.Event())
    assert digest == job.file.expected_hash
    assert job.partial.path.read_bytes() == FILES[path]
    assert seen[-1] == len(FILES[path])
    fetcher.finish_file(job, digest)
    assert job.final.read_bytes() == FILES[path] and not job.partial.path.exists()


def test_python_backend_resumes_from_the_partial(repo_hub, tmp_path: Path) -> None:
    job = _job(repo_hub, tmp_path, "big.bin")
    job.partial.path.write_bytes(FILES["big.bin"][:1_000_000])
    digest = PythonBackend(10.0).fetch(job, lambda n: None, threading.Event())
    assert digest == job.file.expected_hash
    assert repo_hub.bytes_served("big.bin") <= 2_000_000 + 10_000


def test_python_backend_fetches_huge_files_in_ranges(repo_hub, tmp_path: Path) -> None:
    repo_hub.max_single_get = 1_000_000          # the CDN's limit, scaled down
    job = _job(repo_hub, tmp_path, "big.bin", connections=2, max_single_get=1_000_000)
    assert job.needs_ranges
    digest = PythonBackend(10.0).fetch(job, lambda n: None, threading.Event())
    assert digest == job.file.expected_hash      # hashed from the disk as the prefix grew
    assert job.partial.path.read_bytes() == FILES["big.bin"]
    # in ranged parts (the part map is dropped once all are in: the check comes next)
    assert len({r.range for r in repo_hub.records("GET") if r.file == "big.bin" and r.range}) >= 3
    fetcher.finish_file(job, digest)
    assert job.final.read_bytes() == FILES["big.bin"] and not job.partial.part_map.exists()


def test_python_backend_failure_kinds(repo_hub, tmp_path: Path) -> None:
    backend = PythonBackend(10.0)
    job = _job(repo_hub, tmp_path, "small.txt")
    repo_hub.add_fault("429", "small.txt", retry_after=7)
    with pytest.raises(FetchError) as info:
        backend.fetch(job, lambda n: None, threading.Event())
    assert info.value.kind is FailureKind.RATE_LIMITED and info.value.retry_after == 7
    job.url = file_url(repo_hub.url, REPO, "model", "main", "missing.bin")
    with pytest.raises(FetchError) as info:
        backend.fetch(job, lambda n: None, threading.Event())
    assert info.value.kind is FailureKind.NOT_FOUND


def test_python_backend_stops_on_the_event(repo_hub, tmp_path: Path) -> None:
    job = _job(repo_hub, tmp_path, "big.bin")
    stop = threading.Event()
    stop.set()
    with pytest.raises(FetchError) as info:
        PythonBackend(10.0).fetch(job, lambda n: None, stop)
    assert info.value.kind is FailureKind.STOPPED


def test_a_too_long_partial_is_a_bad_partial(repo_hub, tmp_path: Path) -> None:
    job = _job(repo_hub, tmp_path, "small.txt")
    job.partial.path.write_bytes(FILES["small.txt"] + b"extra")
    with pytest.raises(FetchError) as info:
        fetcher.finish_file(job, None)
    assert info.value.kind is FailureKind.BAD_PARTIAL


# ================================================================ a stopped aria2c run


def test_stopped_aria2c_run_leaves_no_temp_folder(cli, hub, tmp_path: Path) -> None:
    hub.add_repo(REPO, {"a.bin": _data(3_000_000, 2), "b.bin": _data(2_000_000, 3)})
    hub.bandwidth_per_conn = 300_000
    tmp = tmp_path / "t"
    tmp.mkdir()
    proc = cli.popen("download", REPO, "--tool", "aria2c", env={"TMPDIR": str(tmp)})
    deadline = time.monotonic() + 30
    # the folder itself goes as soon as aria2c has read its secret: wait for aria2c instead
    while not (tool_processes(str(tmp)) and hub.bytes_served() > 200_000):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no aria2c download under way: {proc.communicate()[1]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not list(tmp.glob("hfdl-aria2-*")), os.listdir(tmp)


def test_aria2c_takes_another_port_when_its_port_was_taken_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RPC port is picked free, but another process may bind it before aria2c does: aria2c
    then exits at once, and the daemon starts again on another port instead of failing the run."""
    import socket

    import tools
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real_free_port = tools._free_port
    monkeypatch.setattr(tools, "_free_port", lambda: next(ports, None) or real_free_port())
    children = tools.ChildSet()
    try:
        daemon = tools.Aria2Daemon(children, stall_timeout=10, jobs=1)
        try:
            assert daemon.port != taken.getsockname()[1]
            assert daemon.call("aria2.getVersion")["version"]
        finally:
            daemon.close()
    finally:
        taken.close()
        children.kill_all()


def test_python_backend_keeps_its_connections_alive_through_the_cdn_hop(hub, tmp_path: Path) -> None:
    files = {f"d/f{i}.parquet": _data(1000 + i, i) for i in range(6)}
    hub.add_repo(REPO, files, lfs=lambda path, size: True)   # each: the hub's 302, then the CDN
    backend = PythonBackend(10.0)
    for path in files:
        job = _job(hub, tmp_path, path)
        fetcher.finish_file(job, backend.fetch(job, lambda n: None, threading.Event()))
    assert backend.pool.made == 2                    # one to the hub, one to the CDN
    idle = backend.pool._idle
    assert sorted(k[2] for k in idle) == sorted({urlsplit(hub.url).port, urlsplit(hub.cdn_url).port})
    assert [len(v) for v in idle.values()] == [1, 1]
    assert {r.kind for r in hub.requests if r.method == "GET"} >= {"resolve", "cdn"}


def test_ranged_fetch_splits_the_longest_range_for_an_idle_connection(repo_hub, tmp_path: Path):
    job = _job(repo_hub, tmp_path, "big.bin", connections=2)
    size = job.file.size
    data = FILES["big.bin"]
    job.partial.path.write_bytes(data[:1000] + bytes(size - 1000))
    job.partial.part_map.write_text(json.dumps({"size": size, "hash": job.file.expected_hash,
                                                "parts": [[0, 999, 1000], [1000, size - 1, 1000]]}))
    backend = PythonBackend(10.0)
    backend.MIN_SPLIT = 100_000
    repo_hub.bandwidth_per_conn = 4_000_000        # ~0.75 s for one connection alone
    assert backend.fetch(job, lambda n: None, threading.Event()) == job.file.sha256   # hashed as it grew
    assert job.partial.path.read_bytes() == data
    starts = sorted(int(r.range[6:].split("-")[0]) for r in repo_hub.requests
                    if r.range and r.status == 206)
    assert starts[0] == 1000 and len(starts) >= 2 and starts[1] > 1000, starts   # the back half


def test_ranges_after_the_first_go_straight_to_the_cdn_link_and_via_the_hub_once_it_expired(
        hub, tmp_path: Path) -> None:
    data = _data(4_000_000, 3)
    hub.add_repo(REPO, {"w.bin": data}, lfs=lambda path, size: True)
    job = _job(hub, tmp_path / "a", "w.bin", connections=2, max_single_get=500_000)  # 8 ranges
    backend = PythonBackend(10.0)
    assert backend.fetch(job, lambda n: None, threading.Event()) == job.file.expected_hash
    gets = [r for r in hub.requests if r.method == "GET" and r.file == "w.bin"]
    resolves = [r for r in gets if r.kind == "resolve"]
    assert len([r for r in gets if r.kind == "cdn"]) >= 8 and len(resolves) <= 2, gets
    # the signed link expires while the file is fetched: that range asks the hub for a new one
    hub.reset_log()
    hub.cdn_url_ttl, hub.bandwidth_per_conn = 1, 1_000_000     # links last < 1 s; the file ~2 s
    job = _job(hub, tmp_path / "b", "w.bin", connections=2, max_single_get=500_000)
    assert backend.fetch(job, lambda n: None, threading.Event()) == job.file.expected_hash
    assert job.partial.path.read_bytes() == data
    gets = [r for r in hub.requests if r.method == "GET" and r.file == "w.bin"]
    expired = [i for i, r in enumerate(gets) if r.kind == "cdn" and r.status == 403]
    assert expired and any(r.kind == "resolve" for r in gets[expired[0]:]), \
        [(r.kind, r.status) for r in gets]
