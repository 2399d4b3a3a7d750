"""Batches for datasets bigger than the disk: analyze-dataset, plan-batch, batch-download,
batch-continue, batch-status and verify --batch, on real swapped tmpfs "disks"."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tests.fakehub import Content, Virtual, content_sha256
from tests.helpers import sha256_file, tmpfs, tree_files

MARKER = ".hf-downloader-batch.json"


def dataset_files() -> dict:
    """~9 MB in nested folders: about three 3.5 MB disks' worth."""
    files = {}
    for split, count in (("train", 12), ("validation", 4)):
        for i in range(count):
            files[f"data/{split}/shard-{i:05d}.parquet"] = Content(480_000 + 7_000 * i, 100 + i)
    files["README.md"] = b"# big dataset\n" * 50
    files["meta/info.json"] = b'{"rows": 1}'
    return files


def virtual_dataset() -> dict:
    """About 30 TB in 20,000 files, three of them bigger than a 10 TB disk; content never served."""
    rng = random.Random(7)
    files: dict = {}
    for i in range(19_990):
        files[f"data/part-{i // 1000:02d}/shard-{i:05d}.parquet"] = Virtual(rng.randint(1, 2_000_000_000))
    for i in range(3):
        files[f"giant/blob-{i}.bin"] = Virtual(12 * 10**12)
    for i in range(7):
        files[f"extra/empty-{i}.txt"] = Virtual(0)
    return files


def check_disk(folder: Path, files: dict, paths: list[str]) -> None:
    got = {p: f for p, f in tree_files(folder).items() if p != MARKER}
    assert sorted(got) == sorted(paths)
    for p in paths:
        assert sha256_file(got[p]) == content_sha256(files[p]), p


def test_plan_and_analyze_a_30tb_listing_in_seconds(cli, hub):
    files = virtual_dataset()
    hub.add_repo("big/corpus", files, repo_type="dataset")
    total = sum(v.size for v in files.values())
    started = time.monotonic()
    r = cli("analyze-dataset", "big/corpus", "--dataset", "--available-space", "10T", "--json")
    assert r.code == 0, r.text
    a = json.loads(r.out)
    assert a["file_count"] == 20_000 and a["total_bytes"] == total
    assert a["disks"]["oversize_count"] == 3 and a["disks"]["disks_min"] >= 3
    assert {f["path"] for f in a["disks"]["oversize_files"]} == {f"giant/blob-{i}.bin" for i in range(3)}
    assert sum(f["files"] for f in a["histogram"]) == 20_000
    r = cli("plan-batch", "big/corpus", "--dataset", "--available-space", "10T", "--json",
            "--output", str(cli.root / "plan.json"))
    assert r.code == 0, r.text
    elapsed = time.monotonic() - started
    assert elapsed < 30, elapsed
    plan = json.loads((cli.root / "plan.json").read_text())
    capacity = int(10 * 2**40 * 0.9)
    assert plan["capacity"] == capacity
    order = [p for p in files]
    seen: list[str] = []
    regular: list[str] = []
    for b in plan["batches"]:
        seen += b["paths"]
        if b["oversize"]:
            assert len(b["paths"]) == 1 and files[b["paths"][0]].size > capacity
            assert b["needed_space"] >= files[b["paths"][0]].size / 0.9
        else:
            assert b["total_bytes"] <= capacity
            regular += b["paths"]
    assert sorted(seen) == sorted(order) and len(seen) == len(set(seen))   # each exactly once
    listing_order = [p for p in sorted_listing(order) if files[p].size <= capacity]
    assert regular == listing_order                                          # repo order kept
    summary = json.loads(r.out)
    assert summary["oversize_batch_count"] == 3
    sizes = [b["total_bytes"] for b in plan["batches"] if not b["oversize"]]
    assert all(s >= 0.5 * capacity for s in sizes[:-1])                      # none far below


def sorted_listing(paths: list[str]) -> list[str]:
    """The Hub's recursive order: at each level folders first, then files, each sorted."""
    tree: dict = {}
    for p in paths:
        node = tree
        *dirs, name = p.split("/")
        for d in dirs:
            node = node.setdefault(d + "/", {})
        node[name] = None
    out: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for key in sorted(k for k in node if k.endswith("/")):
            walk(node[key], prefix + key)
        for key in sorted(k for k in node if not k.endswith("/")):
            out.append(prefix + key)

    walk(tree, "")
    return out


def test_batches_across_swapped_disks(cli, hub, tmp_path):
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    mount = tmp_path / "mnt" / "disk"
    common = ["--dataset", "--available-space", "3500K"]
    r = cli("plan-batch", "org/big", *common, "--local-dir", str(mount), "--output",
            str(tmp_path / "plan.json"))
    assert r.code == 0, r.text
    plan = json.loads((tmp_path / "plan.json").read_text())
    batches = [b["paths"] for b in plan["batches"]]
    assert len(batches) == 3 and not any(b["oversize"] for b in plan["batches"])
    hub.reset_log()
    with tmpfs(mount, "4M"):                                     # disk A
        r = cli("batch-download", "org/big", *common, "--local-dir", str(mount), "--tool", "aria2c")
        assert r.code == 0, r.text
        assert "reusing the plan of task_001" in r.err
        check_disk(mount, files, batches[0])
        marker = json.loads((mount / MARKER).read_text())
        assert marker["batches"][0]["batch"] == 1 and marker["batches"][0]["task_id"] == "task_001"
        disk_a = marker["disk_id"]
        rows = json.loads(cli("batch-status", "task_001", "--json").out)["batches"]
        assert [r_["state"] for r_ in rows] == ["completed", "pending", "pending"]
        assert rows[0]["disk_present"] and rows[0]["disk_id"] == disk_a
    with tmpfs(mount, "4M"):                                     # disk B, empty, same path
        rows = json.loads(cli("batch-status", "task_001", "--json").out)["batches"]
        assert rows[0]["state"] == "completed" and not rows[0]["disk_present"]
        r = cli("verify", "task_001", "--batch", "1")          # the wrong disk is refused
        assert r.code == 1 and "does not hold batch 1" in r.err, r.text
        r = cli("batch-continue", "task_001", "2", "--tool", "wget")
        assert r.code == 0, r.text
        assert "missing" not in r.text.lower()
        check_disk(mount, files, batches[1])
        assert cli("verify", "task_001", "--batch", "2").code == 0
        r = cli("verify", "task_001", "--batch", "1")
        assert r.code == 1 and "holds batch 2 of task_001" in r.err
        rows = json.loads(cli("batch-status", "task_001", "--json").out)["batches"]
        assert [r_["state"] for r_ in rows] == ["completed", "completed", "pending"]
        assert rows[1]["disk_present"] and rows[1]["disk_id"] != disk_a
    with tmpfs(mount, "4M"):                                     # disk C
        r = cli("batch-continue", "task_001", "3", "--tool", "python")
        assert r.code == 0, r.text
        check_disk(mount, files, batches[2])
        st = json.loads(cli("status", "task_001", "--json").out)
        assert st["status"] == "completed" and st["files_done"] == len(files)
    # every file of the plan was downloaded exactly once across the batches
    for path in files:
        assert hub.file_downloads(path) == 1, (path, hub.file_downloads(path))


def test_batch_continue_refuses_a_small_disk_and_warns_about_gaps(cli, hub, tmp_path):
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    mount = tmp_path / "disk"
    r = cli("plan-batch", "org/big", "--dataset", "--available-space", "3500K", "--local-dir",
            str(mount))
    assert r.code == 0, r.text
    with tmpfs(mount, "2M"):
        r = cli("batch-continue", "task_001", "2")
        assert r.code == 4, r.text
        assert "not enough space" in r.err
        assert not any(mount.iterdir())                  # refused before creating any file
    with tmpfs(mount, "4M"):
        r = cli("batch-continue", "task_001", "2")
        assert r.code == 0, r.text
        assert "batch 1 is not complete" in r.err
    r = cli("batch-continue", "task_001", "9")
    assert r.code == 2 and "no batch 9" in r.err


def test_interrupted_batch_resumes(cli, hub, tmp_path):
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    mount = tmp_path / "disk"
    with tmpfs(mount, "4M"):
        hub.bandwidth_per_conn = 800_000
        proc = cli.popen("batch-download", "org/big", "--dataset", "--available-space", "3500K",
                         "--local-dir", str(mount), "--tool", "python")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(mount.rglob("*.incomplete")):
            time.sleep(0.05)
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        hub.bandwidth_per_conn = None
        rows = json.loads(cli("batch-status", "task_001", "--json").out)["batches"]
        assert rows[0]["state"] in ("downloading", "pending")
        r = cli("resume", "task_001")
        assert r.code == 0, r.text
        import batch_manager
        from task_manager import TaskStore
        plan = batch_manager.load_task_plan(TaskStore(cli.metadata), "task_001")
        check_disk(mount, files, list(plan.batches[0].paths))


def test_plan_file_on_another_machine(cli, hub, tmp_path):
    """A plan file lets another machine (its own metadata) fetch a batch of the same plan."""
    files = dataset_files()
    hub.add_repo("org/big", files, repo_type="dataset")
    plan_path = tmp_path / "plan.json"
    assert cli("plan-batch", "org/big", "--dataset", "--available-space", "3500K",
               "--output", str(plan_path)).code == 0
    hub.add_commit("org/big", files={"data/train/shard-00000.parquet": Content(480_000, 999)},
                   repo_type="dataset")                  # the branch moves: the plan does not
    other = tmp_path / "machine2"
    target = tmp_path / "disk2"
    r = cli("batch-continue", str(plan_path), "2", "--local-dir", str(target),
            "--metadata-dir", str(other))
    assert r.code == 0, r.text
    plan = json.loads(plan_path.read_text())
    check_disk(target, files, plan["batches"][1]["paths"])
    r = cli("batch-continue", str(plan_path), "1", "--local-dir", str(tmp_path / "disk1"),
            "--metadata-dir", str(other))
    assert r.code == 0, r.text
    check_disk(tmp_path / "disk1", files, plan["batches"][0]["paths"])  # the pinned commit's bytes
    assert "task_002" not in (other / "tasks.json").read_text()


def test_batch_errors_are_one_line(cli, hub):
    hub.add_repo("org/big", {"a.txt": b"a"}, repo_type="dataset")
    for args, code in ((["plan-batch", "org/big", "--dataset", "--available-space", "0"], 2),
                       (["plan-batch", "org/big", "--dataset", "--available-space", "1G",
                         "--safety-margin", "1.5"], 2),
                       (["plan-batch", "org/big", "--dataset"], 2),
                       (["batch-status", "task_001"], 2),
                       (["batch-continue", "nothing.json", "1"], 1)):
        r = cli(*args)
        assert r.code == code, (args, r.text)
        assert len([ln for ln in r.err.splitlines() if ln.startswith("error:")]) == 1, r.err
    assert cli("download", "org/big", "--dataset").code == 0
    r = cli("batch-status", "task_001")
    assert r.code == 2 and "not a batch task" in r.err
