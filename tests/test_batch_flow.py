"""Batch tasks across swapped disks, as a user drives them for days (issue 12 points 5, 6, 11):
hints that name the command that works, `resume` that continues the batch whose disk is mounted,
the disk marker that refuses a second batch, and trial plans that do not pile up.

A "disk" here is a folder moved in and out of the mount path (the tmpfs version is
tests/test_batch.py): the marker file travels with it, as it does with a real disk."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tests.helpers import error_lines
from tests.test_batch import MARKER, check_disk, dataset_files

SPACE = ["--dataset", "--available-space", "3500K"]       # dataset_files: 3 batches


def plan_paths(cli) -> list[list[str]]:
    """The paths of each batch of task_001, from its --output plan file."""
    out = cli.root / "plan-out.json"
    r = cli("plan-batch", "org/big", *SPACE, "--output", str(out), "--local-dir",
            str(cli.root / "mnt"))
    assert r.code == 0, r.text
    return [b["paths"] for b in json.loads(out.read_text())["batches"]]


def swap(mnt: Path, shelf: Path, name: str, back: str | None = None) -> None:
    """Unmount the disk at `mnt` onto the shelf as `name`; mount shelf/`back` (or nothing)."""
    shelf.mkdir(exist_ok=True)
    shutil.move(str(mnt), str(shelf / name))
    if back:
        shutil.move(str(shelf / back), str(mnt))


def states(cli) -> list[str]:
    r = cli("batch-status", "task_001", "--json")
    assert r.code == 0, r.text
    return [row["state"] for row in json.loads(r.out)["batches"]]


def test_hints_after_verify_of_a_shelved_disk_name_the_command_that_works(cli, hub, tmp_path):
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    mnt, shelf = tmp_path / "mnt", tmp_path / "shelf"
    batches = plan_paths(cli)
    assert len(batches) == 3
    r = cli("batch-download", "org/big", *SPACE, "--local-dir", str(mnt))
    assert r.code == 0, r.text
    assert "next: swap the disk, then python main.py batch-continue task_001 2" in r.err
    swap(mnt, shelf, "A")
    assert cli("batch-continue", "task_001", "2").code == 0
    swap(mnt, shelf, "B")
    r = cli("batch-continue", "task_001", "3")
    assert r.code == 0, r.text
    assert "task_001: all 3 batches complete" in r.err and "next:" not in r.err
    # disk B is on the shelf, checked where it is now: one file went bad
    bad = shelf / "B" / batches[1][0]
    bad.write_bytes(b"\0" * bad.stat().st_size)
    r = cli("verify", "task_001", "--batch", "2", "--local-dir", str(shelf / "B"))
    assert r.code == 3, r.text
    assert (f"'python main.py batch-continue task_001 2 --local-dir {shelf / 'B'}' fetches them "
            "again") in r.out
    assert "resume task_001" not in r.out
    # batch 3, complete, is not "failed" because batch 2 has a bad file on another disk
    r = cli("batch-continue", "task_001", "3")
    assert r.code == 0, r.text
    assert "task_001 batch 3/3: completed" in r.out and "failed" not in r.text
    assert f"next: mount the disk of batch 2, then python main.py batch-continue task_001 2 " \
           f"--local-dir {mnt}" in r.err
    assert states(cli)[2] == "completed"
    # resume with disk C mounted: nothing of batch 2 to do here; it says what works instead
    r = cli("resume", "task_001")
    assert r.code == 1, r.text
    (line,) = error_lines(r)
    assert f"the disk at {mnt} holds batch 3 of task_001, complete" in line
    assert "unfinished: 2 of 3" in line
    assert (f"hint: mount the disk of batch 2, then python main.py batch-continue task_001 2 "
            f"--local-dir {mnt}") in r.err
    check_disk(mnt, files, batches[2])                       # nothing written beside batch 3
    # the hint of verify, followed on the shelf, repairs disk B
    r = cli("batch-continue", "task_001", "2", "--local-dir", str(shelf / "B"))
    assert r.code == 0, r.text
    check_disk(shelf / "B", files, batches[1])
    assert "task_001: all 3 batches complete" in r.err
    assert states(cli) == ["completed"] * 3
    r = cli("resume", "task_001")
    assert r.code == 0 and "task_001: all 3 batches complete" in r.err, r.text


def test_resume_continues_the_batch_whose_disk_is_mounted(cli, hub, tmp_path):
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    mnt, shelf = tmp_path / "mnt", tmp_path / "shelf"
    batches = plan_paths(cli)
    assert cli("batch-continue", "task_001", "1").code == 0
    swap(mnt, shelf, "A")
    hub.bandwidth_per_conn = 800_000                    # batch 2 is interrupted halfway
    proc = cli.popen("batch-continue", "task_001", "2", "--tool", "python")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(mnt.rglob("*.incomplete")):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    hub.bandwidth_per_conn = None
    assert states(cli)[1] in ("downloading", "pending")
    swap(mnt, shelf, "B", back="A")                     # and disk A is mounted again
    r = cli("resume", "task_001")                       # disk A holds batch 1, complete
    assert r.code == 1 and "holds batch 1 of task_001, complete" in r.err, r.text
    assert "batch-continue task_001 2 --local-dir" in r.err
    swap(mnt, shelf, "A2", back="B")
    r = cli("resume", "task_001")                       # disk B: batch 2 is continued
    assert r.code == 0, r.text
    assert "task_001 batch 2/3: completed" in r.out
    check_disk(mnt, files, batches[1])
    assert "next: swap the disk, then python main.py batch-continue task_001 3" in r.err


def test_next_never_points_at_a_complete_batch(cli, hub, tmp_path):
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    mnt, shelf = tmp_path / "mnt", tmp_path / "shelf"
    batches = plan_paths(cli)
    r = cli("batch-continue", "task_001", "1")
    assert r.code == 0 and "batch-continue task_001 2" in r.err, r.text
    swap(mnt, shelf, "A")
    r = cli("batch-continue", "task_001", "3")                 # batch 2 skipped for now
    assert r.code == 0, r.text
    assert "next: swap the disk, then python main.py batch-continue task_001 2" in r.err
    r = cli("status", "task_001", "--json")
    assert "batch-continue task_001 2" in json.loads(r.out)["reason"]
    swap(mnt, shelf, "C")
    r = cli("batch-continue", "task_001", "2")
    assert r.code == 0, r.text
    check_disk(mnt, files, batches[1])
    assert "task_001: all 3 batches complete" in r.err
    assert "next:" not in r.err and "batch-continue task_001 3" not in r.text
    st = json.loads(cli("status", "task_001", "--json").out)
    assert st["status"] == "completed"
    r = cli("plan-batch", "org/big", *SPACE, "--local-dir", str(mnt))   # the same plan again
    assert r.code == 0 and "task_001: all 3 batches complete" in r.out and "next:" not in r.out


def test_a_disk_holding_another_batch_is_refused(cli, hub, tmp_path):
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    mnt = tmp_path / "mnt"
    batches = plan_paths(cli)
    assert cli("batch-continue", "task_001", "2").code == 0
    before = sorted(p.name for p in mnt.rglob("*"))
    r = cli("batch-continue", "task_001", "3")                 # disk of batch 2 still mounted
    assert r.code == 1, r.text
    (line,) = error_lines(r)
    assert "this disk holds batch 2 of task_001; swap the disk or pass --local-dir" in line
    assert sorted(p.name for p in mnt.rglob("*")) == before    # nothing written
    # the plan file of the same plan is the same plan: refused too
    r = cli("batch-continue", str(cli.root / "plan-out.json"), "1")
    assert r.code == 1 and "this disk holds batch 2 of task_001" in r.err, r.text
    assert states(cli) == ["pending", "completed", "pending"]
    # another folder is another disk
    other = tmp_path / "usb"
    assert cli("batch-continue", "task_001", "3", "--local-dir", str(other)).code == 0
    check_disk(other, files, batches[2])
    # --force: a warning, and batch 1 goes beside batch 2
    r = cli("batch-continue", "task_001", "1", "--force")
    assert r.code == 0, r.text
    assert "warning: " in r.err and "this disk holds batch 2 of task_001" in r.err
    check_disk(mnt, files, batches[0] + batches[1])
    marker = json.loads((mnt / MARKER).read_text())
    assert sorted(e["batch"] for e in marker["batches"]) == [1, 2]


# ---------------------------------------------------------------- trial plans (point 11)

def task_ids(cli) -> list[str]:
    r = cli("list-tasks", "--json")
    assert r.code == 0, r.text
    data = json.loads(r.out)
    rows = data["tasks"] if isinstance(data, dict) else data
    return sorted(row["id"] if "id" in row else row["task"] for row in rows)


def test_a_new_plan_replaces_the_unstarted_plan_of_the_same_repo_and_folder(cli, hub, tmp_path):
    hub.add_repo("org/big", dataset_files(), repo_type="dataset")
    plan = ["plan-batch", "org/big", "--dataset"]
    assert cli(*plan, "--available-space", "3500K").code == 0               # task_001
    r = cli(*plan, "--available-space", "5M")
    assert r.code == 0, r.text
    assert "task_002 replaces the unstarted plan task_001" in r.err
    assert task_ids(cli) == ["task_002"]
    assert not (cli.metadata / "tasks" / "task_001").exists()
    r = cli(*plan, "--available-space", "5M")                                # the same plan
    assert r.code == 0 and "reusing the plan of task_002" in r.err and "replaces" not in r.err
    other = tmp_path / "usb"                                                  # another folder
    r = cli(*plan, "--available-space", "4M", "--local-dir", str(other))
    assert r.code == 0 and "replaces" not in r.err, r.text
    assert task_ids(cli) == ["task_002", "task_003"]
    # a started plan is never replaced
    assert cli("batch-download", "org/big", "--dataset", "--available-space", "5M").code == 0
    r = cli(*plan, "--available-space", "6M")
    assert r.code == 0 and "replaces" not in r.err, r.text
    assert task_ids(cli) == ["task_002", "task_003", "task_004"]
    # clean --plans: the unstarted ones go, the started one stays
    r = cli("clean", "--plans")
    assert r.code == 0, r.text
    assert "removed task_003 (unstarted plan of dataset org/big" in r.out
    assert "removed task_004" in r.out and "task_002" not in r.out
    assert task_ids(cli) == ["task_002"]
    r = cli("clean", "--plans")
    assert r.code == 0 and "nothing to clean (no unstarted plans)" in r.out, r.text


def test_a_20k_file_plan_stores_its_listing_once(cli, hub):
    """Measured on this listing: 17.5 MB of metadata before (batch_plan.json 4.7 MB, a second
    copy of the listing with every batch's paths), 12.8 MB after (batch_plan.json ~1 KB)."""
    import batch_manager as bm
    from task_manager import TaskStore
    from tests.test_batch import virtual_dataset
    hub.add_repo("big/corpus", virtual_dataset(), repo_type="dataset")
    out = cli.root / "plan.json"
    r = cli("plan-batch", "big/corpus", "--dataset", "--available-space", "10T", "--output",
            str(out))
    assert r.code == 0, r.text
    folder = cli.metadata / "tasks" / "task_001"
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert sizes["batch_plan.json"] < 16_000, sizes
    total = sum(p.stat().st_size for p in cli.metadata.rglob("*") if p.is_file())
    assert total < 13_500_000, sizes
    stored = json.loads((folder / "batch_plan.json").read_text())
    assert "files" not in stored and stored["file_count"] == 20_000
    # the batches read back are those of the self-contained plan file, path for path
    plan = bm.load_task_plan(TaskStore(cli.metadata), "task_001")
    written = json.loads(out.read_text())
    assert [list(b.paths) for b in plan.batches] == [b["paths"] for b in written["batches"]]
    assert [f.path for f in plan.files] == [f["path"] for f in written["files"]]
    # and a saved plan keeps the compact form
    plan.state[1] = {"target": "/x"}
    bm.save_task_plan(TaskStore(cli.metadata), "task_001", plan)
    assert (folder / "batch_plan.json").stat().st_size < 16_000
    r = cli("batch-status", "task_001", "--json")
    assert r.code == 0 and len(json.loads(r.out)["batches"]) == len(written["batches"]), r.text


def test_a_broken_compact_plan_is_one_error_line(cli, hub):
    hub.add_repo("org/big", dataset_files(), repo_type="dataset")
    assert cli("plan-batch", "org/big", *SPACE).code == 0
    path = cli.metadata / "tasks" / "task_001" / "batch_plan.json"
    good = json.loads(path.read_text())
    assert good["batches"][0]["ranges"][0][0] == 0
    for broken in ({**good, "file_count": 3},
                   {**good, "batches": [{**good["batches"][0], "ranges": [[5, 999]]}]}):
        path.write_text(json.dumps(broken))
        r = cli("batch-status", "task_001")
        assert r.code == 1, r.text
        (line,) = error_lines(r)
        assert str(path) in line and "not a valid batch plan" in line, line
        assert "hint: run plan-batch again" in r.err


def test_a_plan_of_a_20k_file_repo_costs_little_metadata(cli, hub):
    """Issue 12: a plan of a 20k-file repo took 18 MB of metadata (a URL and a full status
    entry per file); the task folder and the registry now stay under 4 MB all told."""
    files = {f"data/{split}/part-{i:05d}-of-10000.{ext}": b"%d" % i
             for split, ext in (("train", "parquet"), ("test", "jsonl")) for i in range(10_000)}
    hub.add_repo("org/wide", files, repo_type="dataset", lfs=lambda p, size: p.endswith(".parquet"))
    r = cli("plan-batch", "org/wide", "--dataset", "--available-space", "20K")
    assert r.code == 0, r.text
    folder = cli.metadata / "tasks" / "task_001"
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    total = sum(sizes.values()) + (cli.metadata / "datasets.json").stat().st_size
    assert total < 4_000_000, sizes
    assert sizes["file_status.json"] < 2_000, sizes          # nothing started: no per-file entry
    r = cli("batch-status", "task_001", "--json")
    assert r.code == 0 and json.loads(r.out)["batches"][0]["state"] == "pending", r.text
