"""A task's life across runs (issue 12, points 3, 4 and 7): a complete task stays complete on
a nearly full disk, --prune deletes what the task downloaded and upstream removed (whenever it
is given), and the options given at download time are remembered by the task."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fakehub import Content
from tests.helpers import assert_same_tree, tmpfs, tree_files

MiB = 2**20
FILLER = r"""
import os, sys
path, leave = sys.argv[1], int(sys.argv[2])
folder = os.path.dirname(path)
with open(path, "ab", buffering=0) as f:
    while True:
        st = os.statvfs(folder)
        room = st.f_bavail * st.f_frsize - leave
        if room <= 0:
            break
        f.write(b"\xa5" * max(4096, min(256 << 10, room)))
"""


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave_free: int) -> None:
    """Another program eats the disk until about `leave_free` bytes are free."""
    res = subprocess.run([sys.executable, "-c", FILLER, str(path), str(leave_free)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr


def task_record(cli, task_id: str = "task_001") -> dict:
    return json.loads((cli.metadata / "tasks.json").read_text())["tasks"][task_id]


# ================================================================ 3: complete on a full disk

def test_complete_task_on_a_nearly_full_disk_stays_complete(cli, hub, tmp_path):
    files = {"a.bin": Content(600_000, 1), "b.txt": b"bee"}
    hub.add_repo("full", files)
    disk = tmp_path / "disk"
    with tmpfs(disk, "4m"):
        target = disk / "full"
        r = cli("download", "full", "--local-dir", str(target), "--tool", "python")
        assert r.code == 0, r.text
        fill(disk / "other-program.bin", 256 << 10)       # below the 1M reserve now
        assert free_bytes(disk) < MiB
        for argv in (("download", "full", "--local-dir", str(target)),
                     ("resume", "task_001")):
            r = cli(*argv)
            assert r.code == 0, (argv, r.text)
            assert "already complete" in r.out, r.text
            assert "disk_full" not in r.text and "not enough space" not in r.text
            assert task_record(cli)["status"] == "completed"
        r = cli("download", "full", "--local-dir", str(target), "--json")
        assert r.code == 0 and json.loads(r.out)["already_complete"] is True
        # the task record forgotten: a new task adopts the files, nothing to write, no refusal
        assert cli("clean").code == 0
        r = cli("download", "full", "--local-dir", str(target))
        assert r.code == 0, r.text
        assert task_record(cli, "task_002")["status"] == "completed"
        assert hub.file_downloads("a.bin") == 1
        assert_same_tree(target, files)
        # with a file to fetch the reserve still holds: refused before writing
        (target / "b.txt").unlink()
        (target / "a.bin").unlink()
        r = cli("download", "full", "--local-dir", str(target))
        assert r.code == 4 and "not enough space" in r.err, r.text


def test_complete_batch_on_a_nearly_full_disk(cli, hub, tmp_path):
    files = {f"data/part-{i}.bin": Content(400_000, i) for i in range(4)}
    hub.add_repo("org/set", files, repo_type="dataset")
    disk = tmp_path / "disk"
    with tmpfs(disk, "4m"):
        r = cli("batch-download", "org/set", "--dataset", "--available-space", "1M",
                "--local-dir", str(disk), "--tool", "python")
        assert r.code == 0, r.text
        fill(disk / "other-program.bin", 256 << 10)
        r = cli("batch-continue", "task_001", "1")
        assert r.code == 0, r.text
        assert "already complete" in r.out and "disk_full" not in r.text
        rows = json.loads(cli("batch-status", "task_001", "--json").out)["batches"]
        assert rows[0]["state"] == "completed"


def test_preflight_with_nothing_to_write_passes(tmp_path):
    import system_monitor
    with tmpfs(tmp_path / "disk", "4m") as disk:
        fill(disk / "filler.bin", 128 << 10)
        usage = system_monitor.preflight(disk, needed=0, reserve=MiB)
        assert usage.free < MiB


# ================================================================ 4: --prune, whenever given

def file_list(cli, task_id: str = "task_001") -> dict:
    return json.loads((cli.metadata / "tasks" / task_id / "file_list.json").read_text())


def test_prune_later_deletes_what_the_hint_promised(cli, hub):
    hub.add_repo("p", {"a.txt": b"a", "sub/b.bin": Content(200_000, 1), "c.txt": b"c"})
    assert cli("download", "p").code == 0
    folder = cli.downloads / "p"
    hub.add_commit("p", delete=["sub/b.bin", "c.txt"])
    r = cli("download", "p")
    assert r.code == 0, r.text
    assert ("removed upstream: sub/b.bin (kept; the same download with --prune deletes it, "
            "now or on any later run)") in r.err
    assert (folder / "sub" / "b.bin").exists()
    assert sorted(e["filename"] for e in file_list(cli)["removed"]) == ["c.txt", "sub/b.bin"]
    r = cli("download", "p")                        # a later run still says so
    assert r.code == 0 and "2 files removed upstream are still in the folder" in r.err, r.text
    (folder / "c.txt").write_bytes(b"C")            # the user's own bytes now: never deleted
    r = cli("download", "p", "--prune")             # no new commit: the hint holds anyway
    assert r.code == 0, r.text
    assert "pruned: sub/b.bin" in r.err
    assert "kept: c.txt (changed since this task downloaded it" in r.err
    assert sorted(tree_files(folder)) == ["a.txt", "c.txt"]       # the emptied sub/ is gone too
    assert "removed" not in file_list(cli)
    r = cli("download", "p", "--prune")
    assert r.code == 0 and "pruned" not in r.err and "kept" not in r.err, r.text
    assert (folder / "c.txt").read_bytes() == b"C"


def test_prune_spares_files_listed_again_and_never_downloaded(cli, hub):
    hub.add_repo("q", {"a.txt": b"a", "b.txt": b"b"})
    assert cli("download", "q").code == 0
    folder = cli.downloads / "q"
    hub.add_commit("q", delete=["b.txt"], files={"new.txt": b"n"})
    hub.add_fault("status", "new.txt", count=None, status=404)
    r = cli("download", "q", "--retries", "0")
    assert "removed upstream: b.txt (kept;" in r.err, r.text
    hub.clear_faults()
    hub.add_commit("q", files={"b.txt": b"b"}, delete=["new.txt"])   # b.txt is back
    r = cli("download", "q", "--prune")
    assert r.code == 0, r.text
    assert "removed upstream: new.txt (not downloaded; nothing to delete)" in r.err
    assert "b.txt" not in r.err
    assert sorted(tree_files(folder)) == ["a.txt", "b.txt"]
    assert hub.file_downloads("b.txt") == 1


# ================================================================ 7: the task's options

def tries_of(hub, path: str) -> int:
    return len([r for r in hub.records("GET") if r.file == path])


def test_resume_uses_the_options_given_to_download(cli, hub):
    hub.add_repo("opts", {"a.txt": b"a", "bad.txt": b"bad"})
    hub.add_fault("status", "bad.txt", count=None, status=503)
    r = cli("download", "opts", "--tool", "python", "-x", "3", "-j", "2", "--retries", "1",
            "--stall-timeout", "30", "--reserve", "2M")
    assert r.code == 3, r.text
    assert tries_of(hub, "bad.txt") == 2                       # --retries 1: two tries
    assert task_record(cli)["options"] == {
        "command": "download", "flags": {"tool": "python", "connections": 3, "jobs": 2,
                                         "retries": 1, "stall_timeout": 30.0,
                                         "reserve": 2 * MiB}}
    hub.reset_log()
    r = cli("resume", "task_001")
    assert r.code == 3, r.text
    assert ("using the task's options: --tool python -x 3 -j 2 --retries 1 --stall-timeout 30 "
            "--reserve 2M (from download)") in r.err
    assert "tool: python, -x 3 -j 2" in r.err
    assert tries_of(hub, "bad.txt") == 2
    hub.reset_log()
    r = cli("resume", "task_001", "--retries", "0", "--tool", "auto")   # overridden for this run
    assert r.code == 3, r.text
    assert ("using the task's options: -x 3 -j 2 --stall-timeout 30 --reserve 2M "
            "(from download)") in r.err
    assert tries_of(hub, "bad.txt") == 1
    assert task_record(cli)["options"]["flags"]["retries"] == 1     # resume does not change them
    hub.clear_faults()
    hub.reset_log()
    r = cli("download", "opts", "-j", "4")     # a re-run download: uses them, keeps the new -j
    assert r.code == 0, r.text
    assert "using the task's options: --tool python -x 3 --retries 1" in r.err
    assert "tool: python, -x 3 -j 4" in r.err
    assert task_record(cli)["options"]["flags"]["jobs"] == 4


def test_remembered_reserve_applies_until_overridden(cli, hub, tmp_path):
    hub.add_repo("res", {"small.bin": Content(300_000, 1)})
    disk = tmp_path / "disk"
    with tmpfs(disk, "4m"):
        target = disk / "res"
        r = cli("download", "res", "--local-dir", str(target), "--reserve", "3M")
        assert r.code == 0, r.text
        hub.add_commit("res", files={"big.bin": Content(1_500_000, 2)})
        r = cli("download", "res", "--local-dir", str(target))     # the env says 1M
        assert r.code == 4 and "3.00 MiB kept in reserve" in r.err, r.text
        r = cli("resume", "task_001", "--reserve", "1M")
        assert r.code == 0, r.text
        assert task_record(cli)["status"] == "completed"


def test_old_records_without_options_and_bad_ones(cli, hub):
    hub.add_repo("old", {"a.txt": b"a"})
    assert cli("download", "old").code == 0
    index = cli.metadata / "tasks.json"
    data = json.loads(index.read_text())
    assert "options" not in data["tasks"]["task_001"]          # nothing given: nothing kept
    r = cli("resume", "task_001")
    assert r.code == 0 and "using the task's options" not in r.err, r.text
    assert "options" not in json.loads(index.read_text())["tasks"]["task_001"]
    data["tasks"]["task_001"]["options"] = {"command": "download", "flags": {"jobs": 0}}
    index.write_text(json.dumps(data))
    r = cli("resume", "task_001")
    assert r.code != 0 and "tasks.json" in r.err and "'jobs'" in r.err, r.text
    r = cli("resume", "task_001", "-j", "2")
    assert r.code == 0, r.text


def test_batch_continue_uses_the_options_of_batch_download(cli, hub, tmp_path):
    files = {f"data/part-{i}.bin": Content(400_000, i) for i in range(4)}
    hub.add_repo("org/set", files, repo_type="dataset")
    target = tmp_path / "disk"
    r = cli("batch-download", "org/set", "--dataset", "--available-space", "1M",
            "--local-dir", str(target), "--tool", "python", "-j", "1")
    assert r.code == 0, r.text
    r = cli("batch-continue", "task_001", "2", "--local-dir", str(tmp_path / "disk2"))  # swapped
    assert r.code == 0, r.text
    assert "using the task's options: --tool python -j 1 (from batch-download)" in r.err
