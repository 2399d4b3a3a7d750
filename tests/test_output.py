"""What the commands print for people and for scripts (issue 11, points 5-9): --dry-run against
the disk, complete --json (errors included), list-tasks, the registered repo type, analyze and
plan-batch agreeing, and one set of units in the bar, the lines and `status`."""
from __future__ import annotations

import io
import json
from pathlib import Path

import main
from progress import Progress
from tests.fakehub import Content
from tests.helpers import error_lines, wait_for
from utils import format_size

FILES = {
    "config.json": b'{"model_type": "gpt2"}\n',
    "b/vocab.txt": b"word\n" * 400,
    "a/merges.txt": b"a b\n" * 300,
    "model.bin": Content(300_000, 1),
}


def folders(tmp_path: Path) -> list[str]:
    return ["--metadata-dir", str(tmp_path / "metadata"), "--downloads-dir",
            str(tmp_path / "downloads"), "--logs-dir", str(tmp_path / "logs")]


# ---------------------------------------------------------------- 5. --dry-run and the disk

def test_dry_run_marks_files_on_disk_sorts_and_names_the_folder(cli, hub):
    hub.add_repo("gpt2", FILES)
    assert cli("download", "gpt2", "--include", "config.json", "a/*", "model.bin",
               "--tool", "python", "-q").code == 0
    # same size, other bytes: present but not the file, so still to download
    (cli.downloads / "gpt2" / "config.json").write_bytes(b"x" * len(FILES["config.json"]))
    r = cli("download", "gpt2", "--dry-run")
    assert r.code == 0, r.text
    rows = [ln for ln in r.out.splitlines() if ln.rstrip().endswith(tuple(FILES))]
    assert [ln.split()[-1] for ln in rows] == sorted(FILES)
    marked = {ln.split()[-1] for ln in rows if "on disk" in ln}
    assert marked == {"a/merges.txt", "model.bin"}
    todo = len(FILES["config.json"]) + len(FILES["b/vocab.txt"])
    target = cli.downloads / "gpt2"
    assert f"2 files ({format_size(todo)}, {todo} bytes) to download out of 4, into {target}" in r.out
    js = json.loads(cli("download", "gpt2", "--dry-run", "--json").out)
    assert [f["path"] for f in js["files"]] == sorted(FILES)
    assert {f["path"]: f["on_disk"] for f in js["files"]} == {
        "a/merges.txt": True, "b/vocab.txt": False, "config.json": False, "model.bin": True}
    assert all(isinstance(f["size"], int) for f in js["files"])
    assert (js["to_download_count"], js["to_download_bytes"]) == (2, todo)
    assert js["local_dir"] == str(target) and js["file_count"] == 4


# ---------------------------------------------------------------- 6. --json for scripts

def test_download_json_names_repo_commit_and_folder(cli, hub):
    commit = hub.add_repo("org/data", {"d.jsonl": b"{}\n"}, repo_type="dataset")
    r = cli("download", "org/data", "--dataset", "--json", "--tool", "python")
    assert r.code == 0, r.text
    js = json.loads(r.out)
    assert (js["repo_id"], js["repo_type"], js["commit"]) == ("org/data", "dataset", commit)
    assert js["local_dir"] == str(cli.downloads / "org--data") and js["status"] == "completed"


def test_status_json_of_all_tasks_has_the_running_pid(cli, hub):
    hub.add_repo("slow", {"a.bin": Content(2_000_000, 4)})
    hub.bandwidth_per_conn = 200_000
    proc = cli.popen("download", "slow", "--tool", "python", "-q")
    try:
        def running() -> list:
            r = cli("status", "--json")
            return [t for t in json.loads(r.out) if t["running_pid"]] if r.code == 0 else []
        assert wait_for(lambda: bool(running()), timeout=30)
        assert running()[0]["running_pid"] == proc.pid
        assert json.loads(cli("list-tasks", "--json").out)[0]["running_pid"] == proc.pid
    finally:
        proc.kill()
        proc.communicate()
    assert json.loads(cli("status", "--json").out)[0]["running_pid"] is None


def test_config_json_has_numbers_and_booleans(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HFDL_NO_MIRROR", "1")
    assert main.main(["config", "--json", "--reserve", "2M", *folders(tmp_path)]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["disk_reserve"] == {"value": 2 * 2**20, "source": "flag"}
    assert js["no_mirror"]["value"] is True and js["disk_warn_percent"]["value"] == 90
    assert isinstance(js["max_single_get"]["value"], int)
    assert isinstance(js["progress_interval"]["value"], float)
    assert js["metadata_dir"]["value"] == str(tmp_path / "metadata")
    assert isinstance(js["mirror_candidates"]["value"], list)


def test_every_error_with_json_is_a_document_on_stdout(cli, hub):
    r = cli("download", "no/such", "--json")
    assert r.code == 1 and error_lines(r)
    js = json.loads(r.out)
    assert js["exit_status"] == 1 and "no/such" in js["error"] and js["hint"]
    r = cli("status", "task_009", "--json")
    assert json.loads(r.out)["exit_status"] == r.code != 0 and error_lines(r)
    # argparse's own errors too, wherever --json stands
    for args in (["download", "--json", "gpt2", "-j", "0"], ["--json", "list-tasks"],
                 ["list-tasks", "--json", "--status"]):
        r = cli(*args)
        assert r.code == 2, r.text
        js = json.loads(r.out)
        assert js["exit_status"] == 2 and js["error"] and "--help" in js["hint"]
        assert "error: " + js["error"] in r.err
    r = cli("status", "task_009")                 # without --json: stderr only, as before
    assert r.out == "" and error_lines(r)


# ---------------------------------------------------------------- 7. tasks and repo types

def test_list_tasks_tells_tasks_of_one_repo_apart(cli, hub):
    hub.add_repo("gpt2", FILES)
    assert cli("download", "gpt2", "--include", "*.json", "--tool", "python", "-q").code == 0
    assert cli("download", "gpt2", "--local-dir", "other", "--exclude", "model.bin",
               "--tool", "python", "-q").code == 0
    out = cli("list-tasks").out
    first, second = out.split("task_002")
    assert str(cli.downloads / "gpt2") in first and "include *.json" in first
    assert str(cli.root / "other") in second and "exclude model.bin" in second


def test_download_uses_the_registered_type(cli, hub):
    commit = hub.add_repo("org/data", {"d.jsonl": b"{}\n"}, repo_type="dataset")
    assert cli("add-dataset", "org/data", "--dataset").code == 0
    r = cli("download", "org/data", "--tool", "python", "--json")
    assert r.code == 0, r.text
    js = json.loads(r.out)
    assert js["repo_type"] == "dataset" and js["commit"] == commit
    assert "registered as a dataset" in r.err
    r = cli("download", "org/data", "--repo-type", "model")      # an explicit type wins
    assert r.code == 1 and "model org/data not found" in error_lines(r)[0]


# ---------------------------------------------------------------- 8. analyze and plan agree

def test_analyze_dataset_counts_the_disks_plan_batch_makes(cli, hub):
    # 500 + 450 bytes on 1000-byte disks: one disk at margin 1.0, two batches at 0.9
    hub.add_repo("org/corpus", {"a/1.bin": b"1" * 500, "b/2.bin": b"2" * 450,
                                "c/3.bin": b"3" * 950}, repo_type="dataset")

    def counts(*extra: str) -> tuple[int, int]:
        r = cli("analyze-dataset", "org/corpus", "--dataset", "--available-space", "1000",
                "--json", *extra)
        assert r.code == 0, r.text
        disks = json.loads(r.out)["disks"]
        p = cli("plan-batch", "org/corpus", "--dataset", "--available-space", "1000", "--json",
                *extra)
        assert p.code == 0, p.text
        plan = json.loads(p.out)
        assert disks["disks_planned"] == plan["regular_batch_count"]
        assert disks["oversize_count"] == plan["oversize_batch_count"]
        assert disks["capacity"] == plan["capacity"]
        return disks["batch_count"], plan["batch_count"]

    assert counts() == (3, 3)                       # 950 B is oversize at 0.9
    assert counts("--safety-margin", "1.0") == (2, 2)
    text = cli("analyze-dataset", "org/corpus", "--dataset", "--available-space", "1000").out
    assert "margin 0.9" in text and "makes 3 batches" in text


# ---------------------------------------------------------------- 9. units and resumed runs

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_and_lines_say_mib_and_count_the_whole_task():
    mib = 2**20
    bar = Progress(13, 13 * mib, 8, 8 * mib, _Tty(), 1.0)
    bar.tick()
    bar.close()
    text = bar.stream.getvalue()
    assert "8.00 MiB / 13.00 MiB" in text and "8/13 files" in text and "MB" not in text
    lines = Progress(13, 13 * mib, 8, 8 * mib, io.StringIO(), 1.0)
    assert lines.line().startswith("progress: 8.00 MiB / 13.00 MiB (61.5%), 8/13 files")


def test_resume_counts_the_whole_task_and_prints_the_tool(cli, hub):
    files = {f"f{i:02d}.txt": f"file {i}\n".encode() * 50 for i in range(13)}
    hub.add_repo("many", files)
    assert cli("download", "many", "--tool", "python", "-q").code == 0
    for name in sorted(files)[:5]:
        (cli.downloads / "many" / name).unlink()
    r = cli("resume", "task_001", "--tool", "wget")
    assert r.code == 0, r.text
    progress = [ln for ln in r.err.splitlines() if ln.startswith("progress:")]
    assert progress and "13/13 files" in progress[-1], r.err
    tool = [ln for ln in r.err.splitlines() if ln.startswith("tool: wget")]
    # -j not given: chosen from the files (13 small ones: 32 at once), and the header says so
    assert tool and "-x" not in tool[0] and "-j 32 (auto)" in tool[0], r.err
    r = cli("download", "many", "--tool", "aria2c", "-x", "4")
    assert "tool: aria2c, -x 4 -j 32 (auto)" in r.err
