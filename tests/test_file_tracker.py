"""file_tracker in-process: transitions, counters, coalesced saves, sync, and the disk checks."""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import pytest

import file_tracker as ft
from dataset_manager import Listing, RemoteFile
from file_tracker import FileState, FileTracker
from partial import Partial
from utils import MetadataError

ENDPOINT = "http://127.0.0.1:1"


def remote(path: str, data: bytes, *, lfs: bool = False) -> RemoteFile:
    """A RemoteFile whose expected hash matches `data` (sha256 for LFS, git blob sha1 if not)."""
    blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    return RemoteFile(path, len(data), blob, hashlib.sha256(data).hexdigest() if lfs else None)


CONTENT = {"a.bin": b"a" * 3000, "sub/b.txt": b"hello b\n", "sub/deep/c.bin": b"c" * 500}
FILES = [remote(p, d, lfs=p.endswith(".bin")) for p, d in CONTENT.items()]


def listing(files: list[RemoteFile] = FILES, commit: str = "c1" * 20) -> Listing:
    return Listing("org/repo", "model", "main", commit, files)


@pytest.fixture
def tracker(tmp_path: Path) -> FileTracker:
    return FileTracker.create(tmp_path / "task", "task_001", listing(), ENDPOINT)


def put(local: Path, path: str, data: bytes) -> Path:
    final = local / path
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(data)
    return final


# ---------------------------------------------------------------- files on disk, load

def test_create_writes_both_files_and_load_reads_them_back(tmp_path: Path,
                                                           tracker: FileTracker) -> None:
    folder = tmp_path / "task"
    listed = json.loads((folder / "file_list.json").read_text())
    assert listed["columns"] == ["filename", "expected_size", "blob_id", "sha256"]
    assert [row[0] for row in listed["files"]] == list(CONTENT)
    assert listed["files"][0] == ["a.bin", 3000, FILES[0].blob_id, FILES[0].sha256]   # no URL
    saved = json.loads((folder / "file_status.json").read_text())
    assert saved["counts"]["pending"] == 3 and saved["files"] == {} and saved["completed"] == []
    again = FileTracker.load(folder, "task_001")
    assert again.files == FILES and again.meta["commit"] == "c1" * 20
    assert again.status == tracker.status


OLD = Path(__file__).parent / "fixtures" / "old_format_task"    # written by the code of 2255643


def test_a_task_saved_in_the_old_format_loads_and_resumes(tmp_path: Path) -> None:
    """A task made before the compact files (a dict and a URL per file, a full status per
    file) loads with its states, counts and details, and is saved compact afterwards."""
    folder = tmp_path / "task"
    shutil.copytree(OLD, folder)
    old_status = json.loads((OLD / "file_status.json").read_text())["files"]
    tracker = FileTracker.load(folder, "task_007")
    assert [f.path for f in tracker.files] == ["a.bin", "sub/b.txt", "sub/deep/c.bin", "d.txt"]
    assert tracker.meta == {"repo_id": "org/repo", "repo_type": "model", "commit": "c1" * 20}
    assert tracker.counts == {"pending": 1, "downloading": 0, "completed": 2, "failed": 1}
    assert tracker.summary()["bytes_done"] == 3001
    for path, entry in old_status.items():      # the same entries (started_at: only while running)
        expected = {k: v for k, v in entry.items() if not (k == "started_at" and
                                                            entry["status"] == "completed")}
        assert tracker.status[path] == expected, path
    assert tracker.paths_in(FileState.PENDING, FileState.FAILED) == ["sub/b.txt", "sub/deep/c.bin"]
    tracker.reset("sub/b.txt")
    tracker.save()
    tracker.write_list(ENDPOINT)
    again = FileTracker.load(folder, "task_007")
    assert again.status == tracker.status and again.files == tracker.files
    saved = json.loads((folder / "file_status.json").read_text())
    assert saved["completed"] == [[0, 1], [3, 1]] and set(saved["files"]) == {"sub/b.txt", "d.txt"}
    assert saved["files"]["d.txt"] == {"attempts": 2, "last_attempt_at": old_status["d.txt"]["last_attempt_at"]}


def test_status_runs_saved_for_another_listing_are_not_applied(tmp_path: Path,
                                                               tracker: FileTracker) -> None:
    """A crash between writing file_list.json and file_status.json: the completed runs index
    another list, so they are ignored (the run re-adopts complete files after checking them)."""
    tracker.complete("a.bin", 3000)
    tracker.save()
    status_file = tmp_path / "task" / "file_status.json"
    data = json.loads(status_file.read_text())
    data["list_check"] = "2:00000000"
    status_file.write_text(json.dumps(data))
    assert FileTracker.load(tmp_path / "task", "task_001").counts["completed"] == 0


def test_a_corrupt_status_file_says_how_to_rebuild(tmp_path: Path, tracker: FileTracker) -> None:
    (tmp_path / "task" / "file_status.json").write_text('{"files": [1, 2]}')
    with pytest.raises(MetadataError) as err:
        FileTracker.load(tmp_path / "task", "task_001")
    assert "fix-progress" in err.value.hint
    rebuilt = FileTracker.rebuild(tmp_path / "task", "task_001")
    assert rebuilt.paths_in(FileState.PENDING) == list(CONTENT)


def test_a_hand_edited_list_with_a_bad_name_is_refused(tmp_path: Path,
                                                       tracker: FileTracker) -> None:
    path = tmp_path / "task" / "file_list.json"
    data = json.loads(path.read_text())
    data["files"][0][0] = "../escape.bin"
    path.write_text(json.dumps(data))
    with pytest.raises(MetadataError):
        FileTracker.load(tmp_path / "task", "task_001")


# ---------------------------------------------------------------- transitions and counters

def test_transitions_keep_the_counters_right(tracker: FileTracker) -> None:
    size_a = len(CONTENT["a.bin"])
    tracker.start("a.bin")
    assert tracker.counts["downloading"] == 1 and tracker.counts["pending"] == 2
    tracker.attempt_failed("a.bin", "timeout", final=False)
    assert tracker.status["a.bin"]["status"] == "downloading"
    tracker.complete("a.bin", size_a)
    assert tracker.status["a.bin"]["attempts"] == 2
    assert tracker.summary() == {"files_total": 3, "files_done": 1, "files_failed": 0,
                                 "bytes_total": sum(map(len, CONTENT.values())),
                                 "bytes_done": size_a}
    tracker.attempt_failed("sub/b.txt", "404", final=True)
    assert tracker.summary()["files_failed"] == 1
    tracker.reset("a.bin", "missing on disk")
    assert tracker.summary()["files_done"] == 0 and tracker.summary()["bytes_done"] == 0
    assert tracker.status["a.bin"]["error"] == "missing on disk"
    assert sum(tracker.counts.values()) == 3


def test_interrupted_only_moves_downloading_files(tracker: FileTracker) -> None:
    tracker.start("a.bin")
    tracker.complete("sub/b.txt", len(CONTENT["sub/b.txt"]))
    for path in CONTENT:
        tracker.interrupted(path)
    assert tracker.status["a.bin"]["status"] == "pending"
    assert tracker.status["sub/b.txt"]["status"] == "completed"


# ---------------------------------------------------------------- coalesced saves

def test_maybe_save_is_coalesced(tmp_path: Path, tracker: FileTracker) -> None:
    now = [1000.0]
    tracker.clock = lambda: now[0]
    tracker.save()                           # the last save happened at 1000.0
    status_file = tmp_path / "task" / "file_status.json"

    def saved_pending() -> int:
        return json.loads(status_file.read_text())["counts"]["pending"]

    now[0] += 5
    tracker.maybe_save()                     # nothing changed: nothing written
    assert saved_pending() == 3 and tracker._last_save == 1000.0
    tracker.start("a.bin")
    tracker.maybe_save()                     # the last save is old enough
    assert saved_pending() == 2
    tracker.start("sub/b.txt")
    now[0] += 0.5
    tracker.maybe_save()                     # too soon: coalesced
    assert saved_pending() == 2
    now[0] += 0.5
    tracker.maybe_save()
    assert saved_pending() == 1
    tracker.start("sub/deep/c.bin")
    tracker.flush()                          # the end of a run saves whatever is left
    assert saved_pending() == 0


# ---------------------------------------------------------------- sync to a new listing

def test_sync_to_a_new_listing(tmp_path: Path, tracker: FileTracker) -> None:
    for f in FILES:
        tracker.complete(f.path, f.size)
    changed = remote("a.bin", b"A" * 3000, lfs=True)
    added = remote("new.txt", b"new\n")
    report = tracker.sync(listing([changed, FILES[1], added], commit="c2" * 20), ENDPOINT)
    assert (report.added, report.changed, report.removed, report.unchanged) == \
        (["new.txt"], ["a.bin"], ["sub/deep/c.bin"], 1)
    assert report.old_versions == {"a.bin": FILES[0].expected_hash,
                                   "sub/deep/c.bin": FILES[2].expected_hash}
    assert tracker.status["a.bin"]["status"] == "pending"
    assert tracker.status["sub/b.txt"]["status"] == "completed"
    assert "sub/deep/c.bin" not in tracker.status
    assert tracker.summary()["files_total"] == 3 and tracker.summary()["files_done"] == 1
    again = FileTracker.load(tmp_path / "task", "task_001")
    assert again.meta["commit"] == "c2" * 20 and [f.path for f in again.files] == \
        ["a.bin", "sub/b.txt", "new.txt"]


# ---------------------------------------------------------------- checking a file

def test_check_file_verdicts(tmp_path: Path) -> None:
    f = FILES[0]
    path = tmp_path / "a.bin"
    assert ft.check_file(path, f).verdict == "missing"
    path.write_bytes(CONTENT["a.bin"][:-1])
    short = ft.check_file(path, f)
    assert (short.verdict, short.size) == ("size mismatch", f.size - 1)
    path.write_bytes(b"b" * f.size)
    assert ft.check_file(path, f, quick=True).verdict == "ok"
    wrong = ft.check_file(path, f)
    assert wrong.verdict == "hash mismatch" and wrong.digest == hashlib.sha256(b"b" * f.size).hexdigest()
    path.write_bytes(CONTENT["a.bin"])
    assert ft.check_file(path, f).verdict == "ok"
    # a digest computed while streaming is trusted instead of reading the file again
    assert ft.check_file(path, f, digest="0" * 64).verdict == "hash mismatch"
    assert ft.check_file(tmp_path / "x", FILES[1]).verdict == "missing"


# ---------------------------------------------------------------- the disk, the truth

def test_adopt_finished_records_good_files_and_leaves_bad_ones(tmp_path: Path,
                                                               tracker: FileTracker) -> None:
    local = tmp_path / "local"
    put(local, "a.bin", CONTENT["a.bin"])
    bad = put(local, "sub/b.txt", b"HELLO B\n")           # right size, wrong bytes
    assert ft.adopt_finished(tracker, local, list(CONTENT)) == 1
    assert tracker.status["a.bin"]["status"] == "completed"
    assert tracker.status["sub/b.txt"]["status"] == "pending" and bad.exists()
    assert ft.adopt_finished(tracker, local, ["sub/deep/c.bin"]) == 0


def test_forget_missing_uses_sizes_only(tmp_path: Path, tracker: FileTracker) -> None:
    local = tmp_path / "local"
    for f in FILES:
        put(local, f.path, CONTENT[f.path])
        tracker.complete(f.path, f.size)
    (local / "a.bin").unlink()
    put(local, "sub/b.txt", b"longer than before\n")
    put(local, "sub/deep/c.bin", b"C" * 500)               # same size: not read, so kept
    assert ft.forget_missing(tracker, local) == 2
    assert tracker.paths_in(FileState.PENDING) == ["a.bin", "sub/b.txt"]
    assert tracker.status["a.bin"]["error"] == "missing on disk"
    assert (local / "sub/b.txt").exists()                  # the run that follows replaces it


def test_reconcile_with_disk(tmp_path: Path, tracker: FileTracker) -> None:
    local = tmp_path / "local"
    a, b, c = FILES
    put(local, "a.bin", CONTENT["a.bin"][:1000])           # short: a good head, kept as partial
    tracker.complete("a.bin", a.size)
    put(local, "sub/b.txt", CONTENT["sub/b.txt"])          # there but not recorded
    tracker.start("sub/deep/c.bin")                        # recorded downloading, nothing there
    changes = ft.reconcile_with_disk(tracker, local)
    assert changes == {"now_completed": 1, "now_pending": 1, "now_failed": 1}
    assert tracker.status["a.bin"]["status"] == "failed"
    assert not (local / "a.bin").exists()
    assert Partial(local, "a.bin", a.expected_hash).path.stat().st_size == 1000
    assert tracker.status["sub/b.txt"]["status"] == "completed"
    assert tracker.status["sub/deep/c.bin"]["status"] == "pending"


def test_reconcile_removes_long_or_wrong_files_and_can_accept_absence(
        tmp_path: Path, tracker: FileTracker) -> None:
    local = tmp_path / "local"
    put(local, "a.bin", b"a" * 4000)                       # too long: wrong bytes
    put(local, "sub/b.txt", b"HELLO B\n")                  # wrong hash
    tracker.complete("sub/deep/c.bin", FILES[2].size)      # gone, but absence is expected
    changes = ft.reconcile_with_disk(tracker, local, missing_ok=True)
    assert changes == {"now_completed": 0, "now_pending": 0, "now_failed": 2}
    assert not (local / "a.bin").exists() and not (local / "sub/b.txt").exists()
    assert not Partial(local, "a.bin", FILES[0].expected_hash).path.exists()
    assert tracker.status["sub/deep/c.bin"]["status"] == "completed"
    assert ft.reconcile_with_disk(tracker, local)["now_pending"] == 1


def test_delete_local_files_removes_only_the_tasks_files(tmp_path: Path,
                                                         tracker: FileTracker) -> None:
    local = tmp_path / "local"
    for f in FILES:
        put(local, f.path, CONTENT[f.path])
    partial = Partial(local, "sub/deep/c.bin", FILES[2].expected_hash).path
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"c")
    (local / "sub/deep/c.bin").unlink()
    keep = put(local, "sub/mine.txt", b"not the task's")
    assert ft.delete_local_files(tracker, local).removed == 2
    assert keep.exists() and not (local / "sub/deep").exists() and not partial.exists()
    assert sorted(p.name for p in local.rglob("*")) == ["mine.txt", "sub"]


def imported_modules(module: object) -> set[str]:
    """Every module a source file imports, at its top or inside functions."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_task_state_and_file_state_do_not_import_each_other() -> None:
    import task_manager
    assert "task_manager" not in imported_modules(ft)
    assert "file_tracker" not in imported_modules(task_manager)


def test_a_crash_while_a_sync_rewrites_the_list_loses_no_state(tmp_path: Path,
                                                               tracker: FileTracker) -> None:
    """sync writes the states keyed by path before the new file_list.json: stopped after it,
    before the compact save, the new list loads with every state (index runs saved for the
    old list would not apply to it)."""
    tracker.complete("a.bin", 3000)
    tracker.complete("sub/b.txt", 8)
    tracker.save()
    newer = listing([remote("new.txt", b"new"), *FILES], commit="c2" * 20)
    save, calls = tracker.save, []

    def crash_on_the_compact_save(*, by_path: bool = False) -> None:
        calls.append(by_path)
        if not by_path:
            raise OSError("power cut")
        save(by_path=by_path)
    tracker.save = crash_on_the_compact_save       # type: ignore[method-assign]
    with pytest.raises(OSError):
        tracker.sync(newer, ENDPOINT)
    assert calls == [True, False]
    again = FileTracker.load(tmp_path / "task", "task_001")      # the new list, saved states
    assert again.meta["commit"] == "c2" * 20 and again.files[0].path == "new.txt"
    assert again.paths_in(FileState.COMPLETED) == ["a.bin", "sub/b.txt"]
    assert again.status["a.bin"]["completed_at"] == tracker.status["a.bin"]["completed_at"]
