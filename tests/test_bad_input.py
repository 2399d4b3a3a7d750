"""Bad input: each gives one clear `error:` line and a documented exit status, never an internal
error (exit 70), never a traceback, and never loses data already downloaded or recorded."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import Content
from tests.helpers import ROOT, Result, assert_same_tree, error_lines, tmpfs

FILES = {"a.txt": b"a" * 100, "sub/b.bin": Content(50_000, 7)}


def downloaded(cli, hub, repo: str = "one") -> Path:
    hub.add_repo(repo, FILES)
    r = cli("download", repo, "--tool", "python")
    assert r.code == 0, r.text
    folder = cli.downloads / repo
    assert_same_tree(folder, FILES)
    return folder


def task_file(cli, name: str, task: str = "task_001") -> Path:
    return cli.metadata / "tasks" / task / name


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[Path]:
    """`folder` (with what it holds) made read-only: a read-only tmpfs for root (mode bits do
    not stop root), chmod 0500 for anyone else."""
    if os.geteuid() == 0:
        saved = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        staging = folder.with_name(folder.name + ".staging")
        folder.rename(staging)
        with tmpfs(folder, "4m", mode="0755"):
            for rel, data in saved.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            yield folder
        folder.rmdir()
        staging.rename(folder)
    else:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o500)
        try:
            yield folder
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


# ================================================================ the metadata folder

def test_read_only_metadata_folder(cli, hub):
    folder = downloaded(cli, hub)
    hub.add_repo("two", {"c.txt": b"c"})
    before = {p: p.read_bytes() for p in cli.metadata.rglob("*") if p.is_file()}
    with locked_folder(cli.metadata):
        for cmd in (["download", "two"], ["download", "one"], ["fix-progress"],
                    ["clean", "--delete-files"]):
            r = cli(*cmd)
            assert r.code == 1, (cmd, r.text)
            line = error_lines(r)[0]
            assert line.startswith(f"error: cannot write the metadata folder {cli.metadata}: "), line
            assert line.endswith(("read-only file system", "permission denied")), line
            assert "this is a bug" not in r.err
        r = cli("list-tasks", "--json")              # reading still works
        assert r.code == 0 and json.loads(r.out)[0]["id"] == "task_001", r.text
    assert hub.count(path_contains="/two/resolve/") == 0
    assert_same_tree(folder, FILES)
    assert not (cli.downloads / "two").exists()
    assert {p: p.read_bytes() for p in cli.metadata.rglob("*") if p.is_file()} == before


# ================================================================ a non-UTF-8 --local-dir

def test_non_utf8_local_dir(cli, hub, tmp_path):
    hub.add_repo("one", FILES)
    target = os.fsencode(str(tmp_path)) + b"/caf\xe9"          # Latin-1, not UTF-8
    proc = subprocess.run([sys.executable.encode(), os.fsencode(str(ROOT / "main.py")),
                           b"download", b"one", b"--local-dir", target, b"--tool", b"python"],
                          cwd=cli.root, env=cli.env, capture_output=True)
    r = Result(proc.returncode, proc.stdout.decode(errors="replace"),
               proc.stderr.decode(errors="replace"))
    assert r.code == 2, r.text
    line = error_lines(r)[0]
    assert "--local-dir" in line and "UTF-8" in line and "caf\\xe9" in line, line
    assert not os.path.exists(target)
    assert hub.count(path_contains="/resolve/") == 0
    assert json.loads(cli("list-tasks", "--json").out) == []


# ================================================================ metadata files of wrong types

WRONG = {
    "attempts": ("file_status.json", lambda d: d["files"].setdefault("a.txt", {}).update(attempts="x")),
    "actual_size": ("file_status.json",
                    lambda d: d["files"].setdefault("a.txt", {}).update(actual_size="x")),
    "file size": ("file_list.json", lambda d: d["files"][0].__setitem__(1, "x")),
    "completed runs": ("file_status.json", lambda d: d.update(completed=[[0, "x"]])),
    "list schema": ("file_list.json", lambda d: d.update(schema_version="2")),
    "status schema": ("file_status.json", lambda d: d.update(schema_version="2")),
}


@pytest.mark.parametrize("what", list(WRONG))
def test_task_file_of_wrong_types(cli, hub, what):
    folder = downloaded(cli, hub)
    name, change = WRONG[what]
    path = task_file(cli, name)
    edit_json(path, change)
    listing = name == "file_list.json"        # what the Hub listed: only a new download rebuilds it
    for cmd in (["task-detail", "task_001"], ["verify", "task_001"], ["resume", "task_001"]):
        r = cli(*cmd)
        assert r.code == 1, (cmd, r.text)
        assert str(path) in error_lines(r)[0], r.err
        assert ("clean --all TASK" if listing else "fix-progress") in r.err, r.err
    r = cli("fix-progress")
    if listing:
        assert r.code == 1 and str(path) in error_lines(r)[0] and "clean" in r.err, r.text
        assert cli("clean", "--all", "task_001").code == 0
        r = cli("download", "one", "--tool", "python")
        assert r.code == 0, r.text
        assert hub.count(path_contains="/resolve/") == len(FILES)     # checked, not fetched
        assert_same_tree(folder, FILES)
        return
    assert r.code == 0, r.text
    assert cli("task-detail", "task_001").code == 0
    st = json.loads(cli("status", "task_001", "--json").out)
    assert st["status"] == "completed" and st["files_done"] == 2, st
    assert_same_tree(folder, FILES)


@pytest.mark.parametrize("what", ["bytes_total", "schema_version", "no local_dir"])
def test_task_index_of_wrong_types(cli, hub, what):
    folder = downloaded(cli, hub)
    index = cli.metadata / "tasks.json"
    if what == "bytes_total":
        edit_json(index, lambda d: d["tasks"]["task_001"].update(bytes_total="x"))
    elif what == "schema_version":
        edit_json(index, lambda d: d.update(schema_version="2"))
    else:
        edit_json(index, lambda d: d["tasks"]["task_001"].pop("local_dir"))
    for cmd in (["list-tasks"], ["download", "one"], ["clean", "--delete-files"]):
        r = cli(*cmd)
        assert r.code == 1, (cmd, r.text)
        assert str(index) in error_lines(r)[0] and "fix-progress" in r.err, r.err
    assert hub.count(path_contains="/resolve/") == len(FILES)       # nothing fetched again
    assert_same_tree(folder, FILES)                                   # nothing deleted
    r = cli("fix-progress")
    assert r.code == 0, r.text
    tasks = json.loads(cli("list-tasks", "--json").out)
    assert [t["id"] for t in tasks] == ["task_001"] and tasks[0]["status"] == "completed", tasks
    assert_same_tree(folder, FILES)


def test_registry_schema_version_of_wrong_type(cli, hub):
    downloaded(cli, hub)
    registry = cli.metadata / "datasets.json"
    edit_json(registry, lambda d: d.update(schema_version="2"))
    r = cli("list-datasets")
    assert r.code == 1, r.text
    assert str(registry) in error_lines(r)[0] and "fix-progress" in r.err


# ================================================================ plan files

def test_plan_file_whose_batch_names_an_unlisted_path(cli, hub, tmp_path):
    hub.add_repo("big", {"a.bin": Content(3000, 1), "b.bin": Content(3000, 2),
                         "c.bin": Content(3000, 3)})
    plan_file = tmp_path / "plan.json"
    r = cli("plan-batch", "big", "--available-space", "5000", "--output", str(plan_file))
    assert r.code == 0, r.text
    edit_json(plan_file, lambda d: d["batches"][0]["paths"].append("not/listed.bin"))
    r = cli("batch-continue", str(plan_file), "1", "--local-dir", str(tmp_path / "disk"))
    assert r.code == 1, r.text
    line = error_lines(r)[0]
    assert str(plan_file) in line and "not/listed.bin" in line, line
    assert hub.count(path_contains="/resolve/") == 0
    assert not (tmp_path / "disk").exists()


# ================================================================ a target we may not write

def test_local_dir_not_writable_is_not_a_full_disk(cli, hub):
    hub.add_repo("one", FILES)
    target = "/proc/self/x"
    r = cli("download", "one", "--local-dir", target)
    assert r.code == 1, r.text
    line = error_lines(r)[0]
    assert line.startswith(f"error: cannot write to {target}: "), line
    assert "space" not in r.err, r.err
    assert json.loads(cli("list-tasks", "--json").out) == []
    assert hub.count(path_contains="/resolve/") == 0


# ================================================================ datasets.json

def test_download_with_a_corrupt_registry_fails_before_downloading(cli, hub):
    hub.add_repo("one", FILES)
    registry = cli.metadata / "datasets.json"
    registry.parent.mkdir(parents=True)
    registry.write_text('{"datasets": ')
    r = cli("download", "one", "--tool", "python")
    assert r.code == 1, r.text
    assert str(registry) in error_lines(r)[0] and "fix-progress" in r.err
    assert hub.count(path_contains="/resolve/") == 0
    assert not (cli.downloads / "one").exists()
    assert json.loads(cli("list-tasks", "--json").out) == []
    assert registry.read_text() == '{"datasets": '                   # left for the user to see
    assert cli("fix-progress").code == 0
    assert cli("download", "one", "--tool", "python").code == 0
    assert "one" in cli("list-datasets").out


# ================================================================ fix-progress keeps tasks

@pytest.mark.parametrize("index", ["corrupt", "readable"])
@pytest.mark.parametrize("damage", ["truncate", "wrong-type", "missing"])
def test_fix_progress_rebuilds_a_task_whose_record_is_corrupt(cli, hub, damage, index):
    folder = downloaded(cli, hub)
    meta = task_file(cli, "task_metadata.json")
    if damage == "truncate":
        meta.write_text(meta.read_text()[:20])
    elif damage == "wrong-type":
        edit_json(meta, lambda d: d.update(files_done="x"))
    else:
        meta.unlink()
    tasks_json = cli.metadata / "tasks.json"          # the index must be rebuilt
    if index == "corrupt":
        tasks_json.write_text("{")
    else:                                             # its records still read: they are used
        edit_json(tasks_json, lambda d: d.update(schema_version="2"))
    r = cli("fix-progress")
    assert r.code == 0, r.text
    source = "file_list.json" if index == "corrupt" else str(tasks_json)
    assert f"task_001: rebuilt from {source}" in r.out, r.out
    tasks = json.loads(cli("list-tasks", "--json").out)
    assert [t["id"] for t in tasks] == ["task_001"], tasks
    st = json.loads(cli("status", "task_001", "--json").out)
    assert st["status"] == "completed" and st["files_done"] == 2, st
    assert json.loads(meta.read_text())["local_dir"] == str(folder)
    assert cli("download", "one").code == 0
    assert hub.count(path_contains="/resolve/") == len(FILES)
    assert_same_tree(folder, FILES)


def test_fix_progress_says_what_it_drops(cli, hub):
    downloaded(cli, hub)
    for name in ("task_metadata.json", "file_list.json"):
        task_file(cli, name).write_text("{")
    (cli.metadata / "tasks.json").write_text("{")
    r = cli("fix-progress")
    assert r.code == 0, r.text
    assert "task_001" in r.err and "dropped" in r.err, r.err
    assert str(task_file(cli, "task_metadata.json")) in r.err, r.err
    aside = cli.metadata / "tasks" / "task_001.dropped"
    assert str(aside) in r.err and (aside / "file_list.json").exists(), r.err   # kept aside
    assert json.loads(cli("list-tasks", "--json").out) == []
    assert cli("download", "one", "--tool", "python").code == 0       # a new task_001
    assert hub.count(path_contains="/resolve/") == len(FILES)         # the files were checked
    assert (aside / "file_list.json").exists()
