"""maintenance in-process: verify, fix-progress and clean on tasks whose files are in tmp_path."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import maintenance
from dataset_manager import Listing, RemoteFile
from file_tracker import FileTracker
from task_manager import Task, TaskStore
from partial import Partial
from utils import TaskLockedError

ENDPOINT = "http://127.0.0.1:1"
CONTENT = {"a.bin": b"a" * 3000, "sub/b.txt": b"hello b\n", "sub/deep/c.bin": b"c" * 500}
FILES = [RemoteFile(p, len(d), hashlib.sha1(f"blob {len(d)}\0".encode() + d).hexdigest(),
                    hashlib.sha256(d).hexdigest() if p.endswith(".bin") else None)
         for p, d in CONTENT.items()]


def listing() -> Listing:
    return Listing("org/repo", "model", "main", "c1" * 20, FILES)


def put(local: Path, path: str, data: bytes) -> Path:
    final = local / path
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(data)
    return final


def new_task(store: TaskStore, local: Path, *, status: str = "completed",
             on_disk: bool = True, **extra: object) -> Task:
    """A task whose files are all recorded complete (and, if asked, are on disk)."""
    task = store.create({"kind": "download", "repo_id": "org/repo", "repo_type": "model",
                         "local_dir": str(local), **extra})
    tracker = FileTracker.create(store.folder(task.id), task.id, listing(), ENDPOINT)
    for f in FILES:
        if on_disk:
            put(local, f.path, CONTENT[f.path])
        tracker.complete(f.path, f.size)
    tracker.save()
    return store.update(task.id, status=status, **tracker.summary())


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(tmp_path / "metadata")


def test_verify_marks_bad_files_and_fails_a_completed_task(tmp_path: Path,
                                                           store: TaskStore) -> None:
    local = tmp_path / "local"
    task = new_task(store, local)
    put(local, "sub/b.txt", b"HELLO B\n")
    report = maintenance.verify_task(store, task, local)
    assert [(r.path, r.verdict) for r in report.bad] == [("sub/b.txt", "hash mismatch")]
    assert len(report.results) == 3
    assert (local / "sub/b.txt").read_bytes() == b"HELLO B\n"   # maybe the user's: left alone
    after = store.get(task.id)
    assert (after.status, after.reason, after.files_done) == \
        ("failed", "verify: 1 bad files", 2)
    quick = maintenance.verify_task(store, after, local, paths=["a.bin"], quick=True)
    assert not quick.bad and len(quick.results) == 1


def test_fix_rebuilds_an_unreadable_status_from_the_disk(tmp_path: Path,
                                                         store: TaskStore) -> None:
    local = tmp_path / "local"
    task = new_task(store, local, status="running")
    (local / "a.bin").unlink()
    (store.folder(task.id) / "file_status.json").write_text("{oops")
    fix = maintenance.fix_task(store, task)
    assert fix.rebuilt and fix.status == "paused"
    assert fix.changes == {"now_completed": 2, "now_pending": 0, "now_failed": 0}
    assert fix.summary["files_done"] == 2
    put(local, "a.bin", CONTENT["a.bin"])
    fix = maintenance.fix_task(store, store.get(task.id))
    assert not fix.rebuilt and fix.status == "completed" and store.get("1").pid is None
    status = json.loads((store.folder(task.id) / "file_status.json").read_text())
    assert status["counts"]["completed"] == 3


def test_fix_of_a_batch_task_accepts_absent_files(tmp_path: Path, store: TaskStore) -> None:
    task = new_task(store, tmp_path / "local", status="paused", on_disk=False, kind="batch")
    fix = maintenance.fix_task(store, task)
    assert fix.changes == {"now_completed": 0, "now_pending": 0, "now_failed": 0}
    assert fix.status == "completed"


def test_each_operation_refuses_a_locked_task(tmp_path: Path, store: TaskStore) -> None:
    local = tmp_path / "local"
    task = new_task(store, local)
    with TaskStore(store.root).lock(task.id):
        with pytest.raises(TaskLockedError):
            maintenance.verify_task(store, task, local)
        with pytest.raises(TaskLockedError):
            maintenance.fix_task(store, task)
        removed, running = maintenance.clean_tasks(store, set(), include_ended=False,
                                                   delete_files=True)
        assert (removed, running) == ([], [task.id])
    assert (local / "a.bin").exists() and store.get(task.id)


def test_clean_deletes_only_the_tasks_files(tmp_path: Path, store: TaskStore) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    done = new_task(store, mine)
    kept = new_task(store, other)
    paused = new_task(store, tmp_path / "third", status="paused")
    partial = Partial(mine, "sub/deep/c.bin", FILES[2].expected_hash).path
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"c")
    stranger = put(mine, "sub/notes.txt", b"not downloaded by the tool")
    removed, running = maintenance.clean_tasks(store, {done.id}, include_ended=False,
                                               delete_files=True)
    assert running == [] and [(c.task_id, c.files_deleted) for c in removed] == [(done.id, 3)]
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == \
        ["sub", "sub/notes.txt"] and stranger.exists()
    assert not store.folder(done.id).exists() and sorted(store.all()) == \
        [kept.id, paused.id]
    assert all((other / f.path).exists() for f in FILES)
    removed, _ = maintenance.clean_tasks(store, set(), include_ended=False, delete_files=False)
    assert [(c.task_id, c.files_deleted) for c in removed] == [(kept.id, None)]
    assert all((other / f.path).exists() for f in FILES)
    removed, _ = maintenance.clean_tasks(store, set(), include_ended=True, delete_files=False)
    assert removed == []                             # paused is not ended
    store.update(paused.id, status="cancelled")
    removed, _ = maintenance.clean_tasks(store, set(), include_ended=True, delete_files=False)
    assert [c.task_id for c in removed] == [paused.id] and store.all() == {}


def test_clean_with_an_unreadable_file_list_keeps_the_files(tmp_path: Path,
                                                            store: TaskStore) -> None:
    local = tmp_path / "local"
    task = new_task(store, local)
    (store.folder(task.id) / "file_list.json").write_text("[")
    removed, _ = maintenance.clean_tasks(store, set(), include_ended=False, delete_files=True)
    assert removed[0].files_deleted is None and removed[0].note.startswith("files not deleted")
    assert (local / "a.bin").exists() and store.all() == {}
