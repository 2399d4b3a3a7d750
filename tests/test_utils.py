"""utils in-process: sizes, atomic JSON, safe repo paths, hashing, globs, errors and exit statuses."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

import utils
from tests.helpers import ROOT
from partial import Partial
from utils import (SCHEMA_VERSION, DiskSpaceError, ExitStatus, HFDError, HubError, MetadataError,
                   TaskLockedError, ToolError, UsageError, format_duration, format_size,
                   git_blob_hasher, glob_match, hash_file, new_hasher, parse_size, path_selected,
                   read_json, repo_folder_name, safe_join, safe_relpath, write_json_atomic)

# ================================================================ sizes


@pytest.mark.parametrize("text,value", [
    ("1073741824", 1073741824), (" 7 ", 7), ("0", 0), ("12b", 12), (42, 42),
    ("1G", 2**30), ("1g", 2**30), ("500M", 500 * 2**20), ("10T", 10 * 2**40), ("2k", 2048),
    ("500GiB", 500 * 2**30), ("1 MiB", 2**20), ("3KiB", 3072),
    ("1GB", 10**9), ("2kb", 2000), ("1.5TB", 1_500_000_000_000), ("1.5G", 3 * 2**29),
])
def test_parse_size(text: str | int, value: int) -> None:
    # Bare letters are binary (df/ls), "GB" decimal, "GiB" binary.
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "lots", "-1", "1X", "1.5.5G", "G", "1 G B", "0x10"])
def test_parse_size_refuses_with_a_usage_hint(bad: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(bad)
    assert repr(bad) in str(info.value)
    assert info.value.hint and "1G" in info.value.hint
    assert info.value.exit_status == ExitStatus.USAGE


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536 * 2**20, "1.50 GiB"),
    (2**40, "1.00 TiB"), (5 * 2**50, "5120.00 TiB"),   # TiB is the largest unit shown
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_reads_back() -> None:
    assert format_size(parse_size("1.5GiB")) == "1.50 GiB"


@pytest.mark.parametrize("seconds,text", [
    (None, "--:--"), (float("nan"), "--:--"), (float("inf"), "--:--"),
    (0, "00:00"), (59.9, "00:59"), (61, "01:01"), (3661, "1:01:01"),
])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


# ================================================================ JSON


def test_write_json_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.json"       # missing folders are created
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION, "name": "é"})
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION, "name": "second"})
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]   # no temp file left
    assert read_json(path) == {"schema_version": SCHEMA_VERSION, "name": "second"}
    assert path.read_text(encoding="utf-8").endswith("}\n")


def test_write_json_atomic_compact(tmp_path: Path) -> None:
    """No indent: no spaces either (the per-file metadata of 100k files is read by programs)."""
    write_json_atomic(tmp_path / "p.json", {"a": [1, 2]}, indent=None)
    assert (tmp_path / "p.json").read_text() == '{"a":[1,2]}\n'


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"new": object()})        # not serialisable, half written
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_read_json_missing(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="missing"):
        read_json(tmp_path / "none.json")
    assert read_json(tmp_path / "none.json", default={"x": 1}) == {"x": 1}


@pytest.mark.parametrize("raw", [b'{"a": ', b"", b"\xff\xfe{}", b"{'single': 1}"])
def test_corrupt_json_names_the_file(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "tasks.json"
    path.write_bytes(raw)
    with pytest.raises(MetadataError) as info:
        read_json(path, default={})                      # a default never hides corruption
    assert str(path) in str(info.value) and "corrupt" in str(info.value)
    assert info.value.hint and "fix-progress" in info.value.hint
    assert path.read_bytes() == raw                      # left as it was, for the user to see


def test_read_json_checks_the_shape(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(MetadataError, match="expected a JSON object"):
        read_json(path)
    assert read_json(path, kind=list) == [1, 2]
    path.write_text("{}")
    with pytest.raises(MetadataError, match="expected a JSON list"):
        read_json(path, kind=list)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION})
    assert read_json(path) == {"schema_version": SCHEMA_VERSION}
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(MetadataError, match="newer version") as info:
        read_json(path)
    assert str(path) in str(info.value) and info.value.hint


# ================================================================ paths


@pytest.mark.parametrize("name", ["a.txt", "sub/dir/b.bin", ".gitattributes", "a..b/c", "x y/é"])
def test_safe_relpath_keeps_good_names(name: str) -> None:
    assert safe_relpath(name) == name


@pytest.mark.parametrize("name", [
    "", "..", "../x", "a/../b", "a/..", ".", "./a", "a/./b",   # leaves or hides the folder
    "/etc/passwd", "C:x", "c:/x",                              # absolute or a drive
    "a\\b", "..\\x",                                           # backslashes
    "a//b", "a/", "/", "a\x00b",                               # empty parts, NUL
])
def test_safe_relpath_refuses(name: str) -> None:
    with pytest.raises(ValueError):
        safe_relpath(name)


def test_safe_join(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b.txt") == tmp_path / "a" / "b.txt"
    for bad in ("../escape", "/abs", "a\\b", "a//b"):
        with pytest.raises(ValueError):
            safe_join(tmp_path, bad)


def test_repo_folder_name() -> None:
    assert repo_folder_name("gpt2") == "gpt2"
    assert repo_folder_name("org/name") == "org--name"


# ================================================================ hashing

HELLO = b"hello\n"
HELLO_OID = "ce013625030ba8dba906f756967f9e9ca394464a"      # git hash-object of "hello\n"
EMPTY_OID = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"      # git's empty blob
HELLO_SHA256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def test_git_blob_hasher_gives_the_git_oid() -> None:
    h = git_blob_hasher(len(HELLO))
    h.update(HELLO)
    assert h.hexdigest() == HELLO_OID
    assert git_blob_hasher(0).hexdigest() == EMPTY_OID
    assert new_hasher("sha1", len(HELLO)).hexdigest() == git_blob_hasher(len(HELLO)).hexdigest()
    assert new_hasher("sha256", 123).hexdigest() == hashlib.sha256().hexdigest()


def test_hash_file(tmp_path: Path) -> None:
    path = tmp_path / "hello"
    path.write_bytes(HELLO)
    assert hash_file(path, "sha1", len(HELLO)) == HELLO_OID
    assert hash_file(path, "sha256", len(HELLO)) == HELLO_SHA256
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file(tmp_path / "empty", "sha1", 0) == EMPTY_OID


def test_hash_file_in_many_chunks_and_from_an_offset(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(utils, "HASH_CHUNK", 1000)        # several reads, a short last one
    data = bytes(range(256)) * 300
    path = tmp_path / "data"
    path.write_bytes(data)
    assert hash_file(path, "sha256", len(data)) == hashlib.sha256(data).hexdigest()
    # a resumed check: the bytes before the offset were hashed while they were written
    head = new_hasher("sha1", len(data))
    head.update(data[:12345])
    whole = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert hash_file(path, "sha1", len(data), start_hasher=head, offset=12345) == whole


# ================================================================ globs


@pytest.mark.parametrize("path,pattern,hit", [
    ("config.json", "*.json", True),
    ("sub/dir/config.json", "*.json", True),         # no "/" in the pattern: the base name too
    ("sub/x.bin", "sub/*.bin", True),
    ("other/sub/x.bin", "sub/*.bin", False),         # with "/": the whole path only
    ("data/a/b.txt", "data/*", True),                # fnmatch's * crosses "/"
    ("README.md", "*.MD", False),                    # case matters
    ("model-00001.safetensors", "model-0000[0-9].safetensors", True),
])
def test_glob_match(path: str, pattern: str, hit: bool) -> None:
    assert glob_match(path, pattern) is hit


def test_path_selected_exclude_wins() -> None:
    assert path_selected("a.bin", None, None)
    assert path_selected("a.bin", [], [])
    assert path_selected("a.bin", ["*.txt", "*.bin"], None)
    assert not path_selected("a.bin", ["*.txt"], None)
    assert not path_selected("a.bin", ["*.bin"], ["a.*"])
    assert not path_selected("sub/a.bin", None, ["sub/*"])


# ================================================================ errors and exit statuses


def _readme_statuses() -> set[int]:
    """The statuses in the README's "Exit statuses" table (`| 130 / 143 |` holds two)."""
    section = ROOT.joinpath("README.md").read_text().split("## Exit statuses", 1)[1]
    section = section.split("\n## ", 1)[0]
    return {int(n) for row in re.findall(r"^\| ([\d /]+) \|", section, re.M)
            for n in row.split("/")}


def test_exit_statuses_are_the_documented_ones() -> None:
    assert {s.name: int(s) for s in ExitStatus} == {
        "OK": 0, "ERROR": 1, "USAGE": 2, "FILES_FAILED": 3, "DISK_FULL": 4, "CANCELLED": 5,
        "LOCKED": 6, "INTERNAL": 70, "INTERRUPTED": 130, "TERMINATED": 143}
    assert _readme_statuses() == {int(s) for s in ExitStatus}


@pytest.mark.parametrize("cls,status", [
    (HFDError, 1), (HubError, 1), (MetadataError, 1), (ToolError, 1),
    (UsageError, 2), (DiskSpaceError, 4), (TaskLockedError, 6),
])
def test_error_types_carry_their_exit_status(cls: type[HFDError], status: int) -> None:
    err = cls("it broke", hint="do this")
    assert (str(err), err.hint, err.exit_status) == ("it broke", "do this", status)
    assert cls("x", exit_status=ExitStatus.CANCELLED).exit_status == ExitStatus.CANCELLED
    assert cls.exit_status == status                   # an override does not leak to the class


def test_exclusive_file_excludes_takes_over_a_stale_lock_and_times_out(tmp_path: Path) -> None:
    import os
    import threading
    import time
    lock, inside, most = tmp_path / "m.lock", [0], [0]

    def worker() -> None:
        for _ in range(20):
            with utils.exclusive_file(lock):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                inside[0] -= 1
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and not lock.exists()
    lock.write_text("node 1\n")                      # left by a killed holder long ago
    os.utime(lock, (time.time() - 120, time.time() - 120))
    with utils.exclusive_file(lock, stale=60):
        assert lock.read_text() != "node 1\n"
        with pytest.raises(HFDError, match="held for over"):   # a live holder: wait, then say so
            with utils.exclusive_file(lock, wait=0.3):
                pass
    assert not lock.exists() and list(tmp_path.iterdir()) == []


def test_partial_bytes_of_many_files_matches_each_partial(tmp_path: Path) -> None:
    files = [("a.bin", "ab" * 32), ("sub/b.bin", "cd" * 32), ("c.bin", "ef" * 32)]
    assert Partial.bytes_of(tmp_path, files) == {}              # no partial folder: no stat
    for (path, digest), data in zip(files, (b"x" * 5000, b"", None)):
        if data is not None:
            partial = Partial(tmp_path, path, digest)
            partial.prepare()
            with partial.open("wb") as fh:
                fh.write(data)
    assert Partial.bytes_of(tmp_path, files) == \
        {"a.bin": Partial(tmp_path, "a.bin", "ab" * 32).bytes_on_disk()}
    assert Partial.bytes_of(tmp_path, files)["a.bin"] == 5000
