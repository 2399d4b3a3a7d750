"""task_manager in-process: ids, the index, find, the per-task lock, rebuilding the index."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import task_manager
from task_manager import Task, TaskState, TaskStore, normalize_id
from utils import MetadataError, TaskLockedError, UsageError

SPEC = {"kind": "download", "repo_id": "org/repo", "repo_type": "model", "revision": "main",
        "local_dir": "/data/repo"}


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(tmp_path / "metadata")


def test_create_numbers_tasks_and_writes_their_metadata(store: TaskStore) -> None:
    first = store.create(SPEC)
    second = store.create({**SPEC, "revision": "v2"})
    assert (first.id, second.id) == ("task_001", "task_002")
    assert first.status == "pending" and first.repo_id == "org/repo"
    assert store.folder("task_001") == store.root / "tasks" / "task_001"
    meta = json.loads((store.folder("task_002") / "task_metadata.json").read_text())
    assert meta["revision"] == "v2" and meta["schema_version"]
    assert sorted(store.all()) == ["task_001", "task_002"]


def test_ids_never_reuse_a_removed_number(store: TaskStore) -> None:
    store.create(SPEC)
    store.create(SPEC)
    store.remove("task_002")
    assert not store.folder("task_002").exists()
    assert store.create(SPEC).id == "task_003"


def test_update_changes_the_index_and_the_task_folder(store: TaskStore) -> None:
    task = store.create(SPEC)
    updated = store.update(task.id, status="paused", files_done=3)
    assert updated.status == "paused" and updated.updated_at >= task.updated_at
    assert store.get("1").files_done == 3
    meta = json.loads((store.folder(task.id) / "task_metadata.json").read_text())
    assert meta["status"] == "paused"
    with pytest.raises(UsageError):
        store.update("task_009", status="paused")


def test_find_returns_the_newest_match(store: TaskStore) -> None:
    store.create(SPEC)
    store.create({**SPEC, "revision": "v2"})
    store.create(SPEC)
    assert store.find(SPEC).id == "task_003"
    assert store.find({"revision": "v2"}).id == "task_002"
    assert store.find({"repo_id": "other"}) is None


def test_get_an_unknown_task_is_a_usage_error(store: TaskStore) -> None:
    with pytest.raises(UsageError) as err:
        store.get("7")
    assert "task_007" in str(err.value) and "list-tasks" in err.value.hint


@pytest.mark.parametrize("given, wanted", [("task_001", "task_001"), ("1", "task_001"),
                                           ("001", "task_001"), (" task_12 ", "task_012"),
                                           ("1234", "task_1234")])
def test_normalize_id(given: str, wanted: str) -> None:
    assert normalize_id(given) == wanted


@pytest.mark.parametrize("bad", ["", "task_", "task_x1", "-1", "1.5", "../task_001"])
def test_normalize_id_refuses_other_text(bad: str) -> None:
    with pytest.raises(UsageError):
        normalize_id(bad)


def test_a_second_handle_is_refused_with_the_pid(store: TaskStore) -> None:
    task = store.create(SPEC)
    other = TaskStore(store.root)
    with store.lock(task.id):
        assert other.is_locked(task.id) and other.owner_pid(task.id) == os.getpid()
        with pytest.raises(TaskLockedError) as err:
            with other.lock(task.id):
                pass
        assert f"PID {os.getpid()}" in str(err.value) and "cancel task_001" in err.value.hint
    assert not other.is_locked(task.id) and other.owner_pid(task.id) is None
    with other.lock(task.id):                 # free again once released
        pass


def test_a_second_process_is_refused_with_the_holders_pid(store: TaskStore) -> None:
    task = store.create(SPEC)
    code = ("import sys, task_manager; s = task_manager.TaskStore(sys.argv[1]); "
            "l = s.lock('task_001'); l.__enter__(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(store.root)],
                              cwd=Path(task_manager.__file__).parent, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TaskLockedError) as err:
            with store.lock(task.id):
                pass
        assert f"PID {holder.pid}" in str(err.value)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert not store.is_locked(task.id)       # the kernel dropped the holder's lock


def test_cancel_flag(store: TaskStore) -> None:
    task = store.create(SPEC)
    assert not store.cancel_requested(task.id)
    store.request_cancel(task.id)
    assert store.cancel_requested(task.id)
    store.clear_cancel(task.id)
    store.clear_cancel(task.id)               # clearing twice is fine
    assert not store.cancel_requested(task.id)


def test_rebuild_index_from_the_task_folders(store: TaskStore) -> None:
    for _ in range(3):
        store.create(SPEC)
    store.update("task_002", status="completed")
    store.index.write_text("{not json")
    assert not store.index_ok()
    with pytest.raises(MetadataError) as err:
        store.all()
    assert "fix-progress" in err.value.hint
    (store.folder("task_003") / "task_metadata.json").write_text("{broken")
    assert store.rebuild_index() == ["task_001", "task_002"]
    assert store.index_ok() and store.get("task_002").status == "completed"
    assert "schema_version" not in store.get("task_001").to_json()
    assert store.create(SPEC).id == "task_003"


# ---------------------------------------------------------------- the typed record

# A record as a download leaves it today, and one written before the run counters, the tool and
# the endpoint were recorded (with a key this version does not know).
NEW_RECORD = {"id": "task_001", "status": "completed", "reason": "", "created_at": "2026-01-01",
              "updated_at": "2026-01-02", "kind": "download", "repo_id": "org/repo",
              "repo_type": "model", "revision": "main", "local_dir": "/data/repo",
              "include": ["*.json"], "exclude": [], "commit": "a" * 40, "files_total": 3,
              "bytes_total": 10, "tool": "aria2c", "pid": None, "endpoint": "https://hf.co",
              "files_done": 3, "files_failed": 0, "bytes_done": 10, "finished_at": "2026-01-02"}
OLD_RECORD = {"id": "task_002", "repo_id": "org/old", "repo_type": "dataset", "status": "paused",
              "local_dir": "/data/old", "note": {"kept": [1, 2]}}
BATCH_RECORD = {**NEW_RECORD, "id": "task_003", "kind": "batch", "plan_id": "p" * 32,
                "batch_count": 4, "available_space": 10**9, "safety_margin": 0.1}


@pytest.mark.parametrize("record", [NEW_RECORD, OLD_RECORD, BATCH_RECORD])
def test_a_task_record_round_trips_through_json_unchanged(record: dict) -> None:
    task = Task.from_json(record, "tasks.json")
    assert task.to_json() == record
    assert json.dumps(task.to_json()) == json.dumps(record)          # the key order too
    assert isinstance(task.status, TaskState) and task.id == record["id"]


def test_a_record_is_typed() -> None:
    task = Task.from_json(BATCH_RECORD, "tasks.json")
    assert (task.status, task.include, task.files_done) == (TaskState.COMPLETED, ("*.json",), 3)
    assert (task.batch_count, task.safety_margin) == (4, 0.1)
    old = Task.from_json(OLD_RECORD, "tasks.json")
    assert (old.files_total, old.kind, old.commit, old.extra) == (0, None, None,
                                                                  {"note": {"kept": [1, 2]}})


def test_changed_returns_a_new_record_with_new_keys_last() -> None:
    old = Task.from_json(OLD_RECORD, "tasks.json")
    new = old.changed(status=TaskState.RUNNING, pid=7, files_done=1)
    assert old.status is TaskState.PAUSED and "pid" not in old.to_json()
    assert new.status is TaskState.RUNNING
    assert list(new.to_json()) == [*OLD_RECORD, "pid", "files_done"]
    assert new.to_json()["status"] == "running" and new.to_json()["note"] == {"kept": [1, 2]}


@pytest.mark.parametrize("key, value", [("files_total", "x"), ("files_done", None),
                                        ("pid", "12"), ("status", "weird"), ("include", "a"),
                                        ("repo_id", 5), ("safety_margin", "0.1"),
                                        ("bytes_done", True)])
def test_a_wrong_type_is_a_metadata_error_naming_the_file(store: TaskStore, key: str,
                                                          value: object) -> None:
    store.create(SPEC)
    data = json.loads(store.index.read_text())
    data["tasks"]["task_001"][key] = value
    store.index.write_text(json.dumps(data))
    for read in (store.all, lambda: store.get("1"), lambda: store.find(SPEC)):
        with pytest.raises(MetadataError) as err:
            read()
        assert str(store.index) in str(err.value) and repr(key) in str(err.value)
        assert "fix-progress" in err.value.hint
    assert not store.index_ok()             # so fix-progress rebuilds it from the task folder
    assert store.rebuild_index() == ["task_001"] and store.get("1").repo_id == "org/repo"


def test_a_record_that_is_not_an_object_or_has_no_id_is_a_metadata_error() -> None:
    for bad in (["task_001"], {"status": "paused"}, {"id": 1}):
        with pytest.raises(MetadataError, match="tasks.json"):
            Task.from_json(bad, "tasks.json")


def test_the_files_on_disk_keep_their_keys(store: TaskStore) -> None:
    task = store.create({**SPEC, "include": [], "exclude": []})
    store.update(task.id, status=TaskState.RUNNING, pid=1, files_done=0)
    store.update(task.id, status="completed", pid=None)
    record = json.loads(store.index.read_text())["tasks"]["task_001"]
    assert list(record) == ["id", "status", "reason", "created_at", "updated_at", *SPEC,
                            "include", "exclude", "pid", "files_done"]
    assert record["status"] == "completed" and record["pid"] is None
    meta = json.loads((store.folder(task.id) / "task_metadata.json").read_text())
    assert meta == {"schema_version": meta["schema_version"], **record}
