"""batch_manager in-process: the stored plan (Plan) round-trips through its JSON unchanged, and a
corrupt or wrong-typed plan is a MetadataError with the way out."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import batch_manager as bm
from batch_planner import Batch
from dataset_manager import Listing, RemoteFile
from task_manager import TaskStore
from utils import HFDError, MetadataError, UsageError

FILES = [RemoteFile("a.bin", 600, "1" * 40, "a" * 64), RemoteFile("b/c.txt", 300, "2" * 40),
         RemoteFile("d.bin", 0, "3" * 40)]
LISTING = Listing("org/data", "dataset", "main", "c" * 40, FILES)

# batch_plan.json as plan-batch wrote it before Plan existed (the keys in the order written then),
# after batch 1 was started and batch 2 finished on another disk.
STORED = {"schema_version": 1, "kind": bm.PLAN_KIND, "plan_id": "f" * 32, "repo_id": "org/data",
          "repo_type": "dataset", "revision": "main", "commit": "c" * 40,
          "available_space": 1000, "safety_margin": 0.9, "capacity": 900,
          "created_at": "2026-01-01T00:00:00+0000",
          "files": [{"path": "a.bin", "size": 600, "blob_id": "1" * 40, "sha256": "a" * 64},
                    {"path": "b/c.txt", "size": 300, "blob_id": "2" * 40, "sha256": None}],
          "batches": [{"number": 1, "paths": ["a.bin"], "total_bytes": 600, "oversize": False,
                       "needed_space": 0},
                      {"number": 2, "paths": ["b/c.txt"], "total_bytes": 300,
                       "oversize": False, "needed_space": 0}],
          "state": {"2": {"target": "/mnt/b", "completed_at": "2026-01-02"},
                    "1": {"target": "/mnt/a", "device": 64, "fsid": 7, "mount_point": "/mnt",
                          "disk_id": "abc", "started_at": "2026-01-03", "completed_at": None}},
          "current": 1}


@pytest.mark.parametrize("with_state", [True, False])
def test_a_stored_plan_round_trips_unchanged(with_state: bool) -> None:
    data = STORED if with_state else {k: v for k, v in STORED.items() if k != "state"}
    plan = bm.Plan.from_json(copy.deepcopy(data), "batch_plan.json", hint="h")
    assert json.dumps(plan.to_json(with_state=with_state)) == json.dumps(data)
    assert plan.current == 1 and plan.target_of(3) is None
    assert plan.target_of(1) == ("/mnt/a" if with_state else None)
    assert plan.batches[1] == Batch(2, ("b/c.txt",), 300) and plan.batch(2) is plan.batches[1]
    assert plan.listing().files[1] == RemoteFile("b/c.txt", 300, "2" * 40)


def test_a_new_plan_writes_the_keys_in_the_order_of_old(tmp_path: Path) -> None:
    plan = bm.new_plan(LISTING, 1000, 0.9)
    data = plan.to_json()
    old = [k for k in STORED if k != "current"]       # and what a plan records since issue 15:
    new = ["workers", "endpoint", "include", "exclude"]
    at = old.index("capacity") + 1
    assert list(data) == old[:at] + new + old[at:] and data["state"] == {}
    assert data["kind"] == bm.PLAN_KIND and data["capacity"] == 900
    assert [f["path"] for f in data["files"]] == ["a.bin", "b/c.txt", "d.bin"]
    plan.current = 2                         # as run_batch records the batch it started
    plan.state[2] = {"target": "/x"}
    assert list(plan.to_json())[-2:] == ["state", "current"]
    again = bm.Plan.from_json(json.loads(json.dumps(plan.to_json())), "p", hint="h")
    assert again.to_json() == plan.to_json() and again.state == {2: {"target": "/x"}}


def test_the_task_plan_and_the_output_file(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "metadata")
    store.folder("task_001").mkdir(parents=True)
    plan = bm.Plan.from_json(copy.deepcopy(STORED), "p", hint="h")
    bm.save_task_plan(store, "task_001", plan)
    saved = (store.folder("task_001") / bm.PLAN_FILE).read_text()
    assert json.loads(saved) == STORED and list(json.loads(saved)) == list(STORED)
    assert bm.load_task_plan(store, "task_001").to_json() == STORED
    out = tmp_path / "plan.json"
    bm.write_plan_file(str(out), plan)
    assert "state" not in json.loads(out.read_text())
    assert bm.read_plan_file(str(out)).to_json(with_state=False) == json.loads(out.read_text())
    with pytest.raises(UsageError, match="is not a batch task"):
        bm.load_task_plan(store, "task_002")


@pytest.mark.parametrize("change", [
    {"capacity": "900"}, {"commit": None}, {"plan_id": 5}, {"state": []},
    {"state": {"x": {}}}, {"state": {"1": "here"}}, {"current": "1"}, {"batches": [{"x": 1}]},
    {"files": [{"path": "a", "size": "1", "blob_id": "b"}]}, {"safety_margin": True}])
def test_a_wrong_typed_task_plan_is_a_metadata_error_with_a_hint(tmp_path: Path,
                                                                 change: dict) -> None:
    store = TaskStore(tmp_path / "metadata")
    path = store.folder("task_001") / bm.PLAN_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**STORED, **change}))
    with pytest.raises(MetadataError) as err:
        bm.load_task_plan(store, "task_001")
    assert str(path) in str(err.value) and "plan-batch" in err.value.hint


def test_a_missing_field_or_corrupt_plan_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({k: v for k, v in STORED.items() if k != "repo_id"}))
    with pytest.raises(MetadataError, match="repo_id") as err:
        bm.read_plan_file(str(path))
    assert "plan-batch --output" in err.value.hint
    path.write_text("{broken")
    with pytest.raises(HFDError, match="not a batch plan.*corrupt"):
        bm.read_plan_file(str(path))
    with pytest.raises(HFDError, match="plan file .* not found"):
        bm.read_plan_file(str(path.with_name("absent.json")))
    path.write_text(json.dumps({**STORED, "kind": "other"}))
    with pytest.raises(UsageError, match="not a batch plan"):
        bm.read_plan_file(str(path))
