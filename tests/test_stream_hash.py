"""Hashing while the bytes land: every backend hands back the digest of what is on disk, so the
file is checked without being read again, and corrupted bytes are still caught."""
from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Iterator

import pytest

import fetcher
import file_tracker
import tools
from dataset_manager import RemoteFile, file_url
from stream_hash import PrefixHasher, aria2_done_prefix
from tests.fakehub import Content
from tests.helpers import wait_for
from transfer import Backend, FetchError, Job, PythonBackend
from partial import Partial

REPO = "org/streamed"
SIZE = 12 << 20          # three 4 MiB hashing steps: enough to hash some while downloading


@pytest.mark.parametrize("bitfield, piece, size, want", [
    ("", 1 << 20, 5 << 20, 0), ("00", 1 << 20, 5 << 20, 0), ("80", 1 << 20, 5 << 20, 1 << 20),
    ("c0", 1 << 20, 5 << 20, 2 << 20), ("ef", 1 << 20, 8 << 20, 3 << 20),
    ("f8", 1 << 20, 5 << 20, 5 << 20), ("ff", 1 << 20, 5 << 20, 5 << 20),   # padding bits
    ("fb", 10, 100, 50)])
def test_aria2_done_prefix_counts_the_leading_finished_pieces(bitfield: str, piece: int,
                                                              size: int, want: int) -> None:
    assert aria2_done_prefix(bitfield, piece, size) == want


def _remote(path: str, data: bytes) -> RemoteFile:
    import hashlib
    return RemoteFile(path, len(data), "0" * 40, hashlib.sha256(data).hexdigest())


def test_prefix_hasher_hashes_ahead_and_vouches_only_for_the_listed_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * (SIZE // 256)
    path = tmp_path / "f"
    path.write_bytes(data[:8 << 20] + bytes(SIZE - (8 << 20)))     # the tail not there yet
    hasher = PrefixHasher(path, _remote("f", data))
    hasher.advance(8 << 20)
    with open(path, "r+b") as out:
        out.seek(8 << 20)
        out.write(data[8 << 20:])
    assert hasher.finish() == _remote("f", data).expected_hash
    # bytes read before a tool wrote them (a tool said too early that they were there): the
    # digest is not the listed one, so it is not vouched for and the caller reads the file again
    path.write_bytes(bytes(SIZE))
    hasher = PrefixHasher(path, _remote("f", data))
    hasher.advance(8 << 20)
    assert wait_for(lambda: hasher.hashed == 8 << 20, timeout=10)
    with open(path, "r+b") as out:
        out.write(data)
    assert hasher.finish() is None
    # a file shorter than it was said to be: no digest
    path.write_bytes(data[:1000])
    hasher = PrefixHasher(path, _remote("f", data))
    hasher.advance(SIZE)
    assert hasher.finish() is None


def test_bytes_written_at_the_front_are_hashed_from_memory_and_the_rest_read_back(
        tmp_path: Path) -> None:
    data = bytes(range(256)) * (SIZE // 256)
    path = tmp_path / "f"
    path.write_bytes(data)
    hasher = PrefixHasher(path, _remote("f", data))
    hasher.feed(0, data[:1 << 20])                        # the front: hashed now
    hasher.feed(2 << 20, b"x" * (1 << 20))                # past a gap: left to the disk
    assert hasher.hashed == 1 << 20
    hasher.feed((1 << 20) - 10, data[(1 << 20) - 10:3 << 20])   # overlapping: the new part
    assert hasher.hashed == 3 << 20
    hasher.advance(3 << 20)                               # nothing to read back: no thread
    assert hasher._thread is None
    assert hasher.finish() == _remote("f", data).expected_hash


# ---------------------------------------------------------------- every backend

BACKENDS = ["python-stream", "python-ranged", "aria2c", "wget"]


@pytest.fixture
def streamed_hub(hub):
    hub.add_repo(REPO, {"w.safetensors": Content(SIZE, seed=5)})
    hub.bandwidth_per_conn = 16e6        # ~0.4-0.8 s a file: the hasher has time to run ahead
    return hub


def _job(hub, tmp_path: Path, kind: str) -> Job:
    entry = hub.file_info(REPO, "w.safetensors")
    f = RemoteFile(entry.path, entry.size, entry.oid, entry.sha256)
    partial = Partial(tmp_path / "out", f.path, f.expected_hash)
    partial.prepare()
    ranged = kind == "python-ranged"
    return Job(file=f, final=tmp_path / "out" / f.path, partial=partial,
               url=file_url(hub.url, REPO, "model", "main", f.path), token=None,
               endpoint=hub.url, connections=2, max_single_get=(4 << 20) if ranged else 10**12)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Iterator[tuple[str, Backend]]:
    kind = request.param
    children = tools.ChildSet()
    b: Backend = (PythonBackend(10.0) if kind.startswith("python") else
                  tools.Aria2Backend(children, stall_timeout=10, jobs=1) if kind == "aria2c" else
                  tools.WgetBackend(children, stall_timeout=10))
    b.open()
    try:
        yield kind, b
    finally:
        b.close()
        children.kill_all()


def _hashed_ahead(caplog: pytest.LogCaptureFixture) -> int:
    lines = [r.getMessage() for r in caplog.records if "as they landed" in r.getMessage()]
    assert len(lines) == 1, lines
    return int(re.search(r": (\d+) of", lines[0]).group(1))   # type: ignore[union-attr]


def test_each_backend_returns_the_digest_so_the_file_is_not_read_again(
        streamed_hub, tmp_path: Path, backend, caplog, monkeypatch) -> None:
    kind, b = backend
    caplog.set_level(logging.DEBUG, logger="hfdl.hash")
    job = _job(streamed_hub, tmp_path, kind)
    digest = b.fetch(job, lambda n: None, threading.Event())
    assert digest == job.file.expected_hash
    if kind != "python-stream":             # the stream hashes in memory as it writes
        assert _hashed_ahead(caplog) >= 4 << 20
    def no_reading(*args: object, **kwargs: object) -> str:
        raise AssertionError("the file was hashed again")
    monkeypatch.setattr(file_tracker, "hash_file", no_reading)
    fetcher.finish_file(job, digest)
    assert job.final.stat().st_size == SIZE and not job.partial.path.exists()


def test_each_backend_still_catches_corrupted_bytes(streamed_hub, tmp_path: Path,
                                                    backend) -> None:
    kind, b = backend
    streamed_hub.add_fault("corrupt", "w.safetensors", count=None)
    job = _job(streamed_hub, tmp_path, kind)
    digest = b.fetch(job, lambda n: None, threading.Event())
    assert digest != job.file.expected_hash
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetcher.finish_file(job, digest)
    assert not job.final.exists()


def test_each_backend_hashes_a_resumed_partial_from_its_start(streamed_hub, tmp_path: Path,
                                                              backend) -> None:
    """Stopped half-way, then resumed from what is on disk (the part map, aria2c's control
    file, the length): the digest still covers the whole file."""
    kind, b = backend
    job = _job(streamed_hub, tmp_path, kind)
    stop = threading.Event()

    def stop_half_way(n: int) -> None:
        if n >= SIZE // 3:
            stop.set()
    with pytest.raises(FetchError):
        b.fetch(job, stop_half_way, stop)
    assert 0 < job.partial.bytes_on_disk() < SIZE
    served = streamed_hub.bytes_served("w.safetensors")
    digest = b.fetch(job, lambda n: None, threading.Event())
    assert digest == job.file.expected_hash
    assert streamed_hub.bytes_served("w.safetensors") - served < SIZE     # it did resume
