"""End to end: `python main.py download ...` against the fake Hub, with each real tool."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.fakehub import Content, content_bytes, content_sha256
from tests.helpers import (ROOT, TOOLS, assert_same_tree, error_lines, file_rows, file_states,
                           tree_files)

TOKEN = "hf_TESTtokenDoNotLeak0123456789"


def model_files() -> dict:
    return {
        "config.json": b'{"model_type": "gpt2"}\n',
        "README.md": b"# gpt2\n" * 300,
        "model.safetensors": Content(3_000_000, 1),
        "onnx/decoder model.onnx": Content(1_500_000, 2),        # a space in the name
        "tokenizer/vocab.json": b'{"a": 1}' * 500,
        "tokenizer/merges.txt": b"a b\n" * 2000,
        "deep/er/still/weights-ü.bin": Content(700_000, 3),     # unicode, nested
        "empty.txt": b"",
    }


@pytest.mark.parametrize("tool", TOOLS)
def test_download_model_each_tool(cli, hub, tool):
    files = model_files()
    commit = hub.add_repo("gpt2", files)
    r = cli("download", "gpt2", "--tool", tool, "-j", "3", "-x", "4")
    assert r.code == 0, r.text
    assert f"tool: {tool}" in r.err
    assert_same_tree(cli.downloads / "gpt2", files)
    # every file came from the pinned commit, never from the branch name
    resolves = [rec.path for rec in hub.records(path_contains="/resolve/") if rec.server == "hub"
                and rec.kind == "resolve"]
    assert resolves and all(f"/resolve/{commit}/" in p for p in resolves)
    # tracking files
    tasks = json.loads((cli.metadata / "tasks.json").read_text())
    assert list(tasks["tasks"]) == ["task_001"]
    task = tasks["tasks"]["task_001"]
    assert task["status"] == "completed" and task["commit"] == commit
    folder = cli.metadata / "tasks" / "task_001"
    status = file_states(folder)
    assert json.loads((folder / "task_metadata.json").read_text())["id"] == "task_001"
    entry = status["model.safetensors"]
    assert entry["status"] == "completed" and entry["actual_size"] == 3_000_000
    assert entry["attempts"] == 1 and entry["completed_at"] and entry["created_at"]
    assert entry["error"] is None and entry["expected_hash"] == content_sha256(files["model.safetensors"])
    item = next(e for e in file_rows(folder) if e["filename"] == "model.safetensors")
    assert item["expected_size"] == 3_000_000 and item["sha256"]
    datasets = json.loads((cli.metadata / "datasets.json").read_text())
    assert "model:gpt2" in datasets["datasets"]


@pytest.mark.parametrize("tool", TOOLS)
def test_dataset_lands_in_org_name_folder(cli, hub, tool):
    files = {"data/train.jsonl": Content(400_000, 5), "README.md": b"dolly"}
    hub.add_repo("databricks/databricks-dolly-15k", files, repo_type="dataset")
    r = cli("download", "databricks/databricks-dolly-15k", "--dataset", "--tool", tool)
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "databricks--databricks-dolly-15k", files)
    assert all("/datasets/databricks/databricks-dolly-15k/resolve/" in rec.path
               for rec in hub.records(server="hub") if rec.kind == "resolve")


def test_local_dir_and_second_run_is_a_noop(cli, hub):
    files = model_files()
    hub.add_repo("gpt2", files)
    target = cli.root / "elsewhere" / "gpt2"
    assert cli("download", "gpt2", "--local-dir", str(target), "--tool", "python").code == 0
    assert_same_tree(target, files)
    hub.reset_log()
    r = cli("download", "gpt2", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0 and "task_001" in r.out
    assert hub.count(path_contains="/resolve/") == 0          # no file request at all
    assert "task_002" not in (cli.metadata / "tasks.json").read_text()


def test_include_exclude_globs(cli, hub):
    hub.add_repo("globs", {"a.json": b"{}", "x.jsonl": b"{}\n", "sub/b.json": b"[]",
                           "sub/skip.json": b"[]", "w.bin": Content(2000, 9)})
    r = cli("download", "globs", "--include", "*.json", "--exclude", "*skip*", "--tool", "python")
    assert r.code == 0, r.text
    assert sorted(tree_files(cli.downloads / "globs")) == ["a.json", "sub/b.json"]


def test_dry_run_lists_and_creates_nothing(cli, hub):
    hub.add_repo("gpt2", model_files())
    r = cli("download", "gpt2", "--dry-run")
    assert r.code == 0, r.text
    assert "model.safetensors" in r.out and "8 files" in r.out
    total = sum(len(content_bytes(d)) if isinstance(d, Content) else len(d)
                for d in model_files().values())
    assert f"({total} bytes)" in r.out
    assert not (cli.metadata / "tasks.json").exists()
    assert not (cli.downloads / "gpt2").exists()
    assert hub.count(path_contains="/resolve/") == 0
    js = json.loads(cli("download", "gpt2", "--dry-run", "--json").out)
    assert js["total_size"] == total and len(js["files"]) == 8


def test_tree_listing_pages_past_one_page(cli, hub):
    hub.tree_page_size = 7
    files = {f"shards/part-{i:03d}.txt": f"shard {i}\n".encode() * 20 for i in range(40)}
    hub.add_repo("paged", files)
    r = cli("download", "paged", "--tool", "python", "-j", "8")
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "paged", files)
    assert hub.count(path_contains="/tree/") >= 6


def test_unsafe_names_are_refused_and_the_rest_downloads(cli, hub):
    files = {"good.txt": b"fine", "../evil.txt": b"owned", "a/../../evil2.txt": b"owned",
             "/abs.txt": b"owned"}
    hub.add_repo("evil", files)
    r = cli("download", "evil", "--tool", "python", "--local-dir", str(cli.root / "t" / "evil"))
    assert r.code == 0, r.text
    assert sorted(tree_files(cli.root / "t")) == ["evil/good.txt"]
    assert "evil.txt" in r.err and "skipped" in r.err
    assert not (cli.root / "evil.txt").exists() and not (cli.root / "t" / "evil.txt").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_gated_repo_token_stays_home(cli, hub, tool):
    files = {"w.bin": Content(4_000_000, 11), "config.json": b"{}"}
    hub.add_repo("org/gated", files, gated=True)
    hub.add_token(TOKEN, access={"org/gated"})
    hub.bandwidth_per_conn = 4_000_000      # slow enough to sample the children
    r = cli("download", "org/gated")
    assert r.code == 1 and "gated" in r.err and "HF_TOKEN" in r.err, r.text
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        seen.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
                    except OSError:
                        pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = cli("download", "org/gated", "--tool", tool, "-x", "2", env={"HF_TOKEN": TOKEN})
    finally:
        stop.set()
        sampler.join()
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "org--gated", files)
    tool_lines = [c for c in seen if c.startswith(tool)]
    if tool != "python":
        assert tool_lines, "the tool process was never seen"
    assert not any(TOKEN in c for c in seen)
    # the token went to the hub only, never to the CDN
    assert hub.count(server="cdn") > 0
    assert all("authorization" not in rec.headers for rec in hub.records(server="cdn"))
    assert any(rec.headers.get("authorization") == f"Bearer {TOKEN}"
               for rec in hub.records(server="hub"))
    for folder in (cli.metadata, cli.root / "logs"):
        for p in folder.rglob("*"):
            if p.is_file():
                assert TOKEN not in p.read_text(errors="replace"), p


@pytest.mark.parametrize("args,code,needle", [
    (["download", "nobody/nothing"], 1, "not found"),
    (["download", "gpt2", "--revision", "v9"], 1, "revision 'v9' not found"),
    (["download", "gpt2", "--include", "*.xyz"], 2, "matches"),
    (["download", "gpt2", "-j", "0"], 2, "-j/--jobs"),
    (["download", "gpt2", "--tool", "curl"], 2, "invalid choice"),
    (["download", "gpt2", "--reserve", "lots"], 2, "invalid size"),
    (["download", "../x"], 2, "invalid repo id"),
    (["status", "task_042"], 2, "no task task_042"),
])
def test_user_errors_get_one_line(cli, hub, args, code, needle):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    r = cli(*args)
    assert r.code == code, r.text
    assert needle in r.err
    error_lines(r)


def test_unreachable_endpoint(cli, hub):
    r = cli("download", "gpt2", "--endpoint", "http://127.0.0.1:9")
    assert r.code == 1 and "cannot reach http://127.0.0.1:9" in r.err
    error_lines(r)


def test_missing_tool_is_reported(cli, hub, tmp_path):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    bare = tmp_path / "bin"
    bare.mkdir()
    r = cli("download", "gpt2", "--tool", "aria2c", env={"PATH": str(bare)})
    assert r.code == 1 and "aria2c is not installed" in r.err and "apt-get install aria2" in r.err
    r = cli("download", "gpt2", env={"PATH": str(bare)})     # auto falls back to python
    assert r.code == 0 and "tool: python (auto)" in r.err, r.text


@pytest.mark.parametrize("tool", TOOLS)
def test_huge_file_is_never_asked_in_one_get(cli, hub, tool):
    hub.max_single_get = 1_000_000        # the CDN's 50 GB limit, scaled down
    files = {"huge.bin": Content(3_500_000, 21), "small.txt": b"s" * 10}
    hub.add_repo("huge", files)
    r = cli("download", "huge", "--tool", tool, env={"HFDL_MAX_SINGLE_GET": "1000000"})
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "huge", files)
    gets = [rec for rec in hub.records("GET", server="cdn") if rec.file == "huge.bin"]
    assert gets and all(rec.range and rec.status == 206 for rec in gets)
    if tool != "python":
        assert "python backend fetches it in parts" in r.err


def test_listing_commands_and_json(cli, hub):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    hub.add_repo("org/data", {"d.jsonl": b"{}\n"}, repo_type="dataset")
    r = cli("add-dataset", "org/data", "--dataset", "--description", "my data")
    assert r.code == 0 and "registered dataset org/data" in r.out
    assert cli("download", "gpt2", "-q").code == 0
    r = cli("list-datasets")
    assert "org/data" in r.out and "my data" in r.out and "gpt2" in r.out
    ds = json.loads(cli("list-datasets", "--json").out)
    assert {d["repo_id"] for d in ds} == {"org/data", "gpt2"}
    r = cli("list-tasks")
    assert "task_001" in r.out and "completed" in r.out
    tasks = json.loads(cli("list-tasks", "--json").out)
    assert tasks[0]["id"] == "task_001" and tasks[0]["files_done"] == 1
    st = json.loads(cli("status", "task_001", "--json").out)
    assert st["status"] == "completed" and st["bytes_done"] == 2
    assert "completed" in cli("status", "1").out
    detail = json.loads(cli("task-detail", "task_001", "--json").out)
    assert detail["files"][0]["filename"] == "config.json"
    assert detail["files"][0]["status"] == "completed"
    assert "config.json" in cli("task-detail", "task_001").out
    r = cli("add-dataset", "org/missing", "--dataset")
    assert r.code == 1 and "not found" in r.err


def test_config_shows_sources_not_token(cli, hub, tmp_path):
    env = {"HF_TOKEN": TOKEN, "DOWNLOADS_DIR": str(tmp_path / "dl")}
    r = cli("config", "--metadata-dir", str(tmp_path / "md"), env=env)
    assert r.code == 0
    assert TOKEN not in r.text
    assert "HF_TOKEN environment variable" in r.out
    js = json.loads(cli("config", "--json", "--metadata-dir", "m", env=env).out)
    assert js["metadata_dir"]["source"] == "flag"
    assert js["downloads_dir"] == {"value": str(tmp_path / "dl"), "source": "env DOWNLOADS_DIR"}
    assert js["endpoint"]["source"] == "env HF_ENDPOINT"
    # the default (logs/ beside main.py) is tested on a copy of the repo: tests/test_cli.py
    assert js["logs_dir"] == {"value": str(cli.root / "logs"), "source": "env LOGS_DIR"}


def test_config_module_api(tmp_path):
    import config
    cfg = config.get_config()
    cfg.set_metadata_dir(tmp_path / "meta")
    assert config.get_config().metadata_dir == tmp_path / "meta"
    assert config.get_config().source("metadata_dir") == "set_metadata_dir()"


def test_progress_lines_without_a_terminal(cli, hub):
    hub.add_repo("slow", {"a.bin": Content(1_500_000, 4), "b.txt": b"b"})
    hub.bandwidth_per_conn = 1_000_000
    r = cli("download", "slow", "--tool", "python", env={"HFDL_PROGRESS_INTERVAL": "0.3"})
    assert r.code == 0, r.text
    lines = [ln for ln in r.err.splitlines() if ln.startswith("progress:")]
    assert len(lines) >= 3, r.err
    assert "files" in lines[-1] and "ETA" in lines[-1] and "/s" in lines[-1]
    # per-file lines only with -v (tests/test_logs.py); the log has them all
    assert "done:" not in r.err and "\r" not in r.err
    log = (cli.root / "logs" / "download.log").read_text()
    assert "task_001: done: a.bin" in log


def test_tool_command_line_is_logged(cli, hub):
    hub.add_repo("gpt2", {"config.json": b"{}"})
    assert cli("download", "gpt2", "--tool", "wget").code == 0
    log = (cli.root / "logs" / "download.log").read_text()
    assert "running: wget" in log and "--output-document=" in log


def test_no_partial_left_and_none_at_final_path(cli, hub):
    files = model_files()
    hub.add_repo("gpt2", files)
    assert cli("download", "gpt2", "--tool", "aria2c").code == 0
    leftovers = [p for p in (cli.downloads / "gpt2").rglob("*")
                 if p.name.endswith((".incomplete", ".aria2", ".parts", ".log"))]
    assert leftovers == []
    shutil.rmtree(cli.downloads)


def test_progress_bar_on_a_terminal(cli, hub):
    """On a terminal, progress is a bar redrawn in place (tqdm), not a stream of lines."""
    import pty
    import subprocess
    import sys
    hub.add_repo("slow", {"a.bin": Content(1_200_000, 4)})
    hub.bandwidth_per_conn = 1_000_000
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"),
                             "download", "slow", "--tool", "python"], cwd=cli.root, env=cli.env,
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(60) == 0
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "B/s" in text and "100%" in text, text
    assert "progress:" not in text            # no plain lines on a terminal
    assert "task_001: completed" in text


def test_no_flags_picks_per_repo_and_file_and_says_so_once(cli, hub):
    """auto: the python transport; many small files go 32 at once over one connection each; a
    big file (16 MiB+) tries one connection first and, on a link capped per connection, opens
    several ranged connections whose ranges an idle one splits."""
    small = {f"d/f{i:02d}.json": b"x" * (100 + i) for i in range(20)}
    hub.add_repo("small", small)
    r = cli("download", "small")
    assert r.code == 0, r.text
    assert [ln for ln in r.err.splitlines() if ln.startswith("tool:")] == [
        f"tool: python (auto), -x 1 (auto) -j 32 (auto), endpoint {hub.url}"], r.err
    assert_same_tree(cli.downloads / "small", small)
    big = {"model.safetensors": Content(24 << 20, 5), "config.json": b"{}"}
    hub.add_repo("big", big)
    hub.reset_log()
    hub.bandwidth_per_conn = 8e6          # one connection: 3 s; six: 0.5 s
    r = cli("download", "big")
    assert r.code == 0, r.text
    assert "tool: python (auto), -x 1 or 6 (auto, up to 12) -j 8 (auto)" in r.err, r.err
    assert_same_tree(cli.downloads / "big", big)
    ranges = [q.range for q in hub.requests if q.kind == "cdn" and "model" in q.path]
    assert len(ranges) >= 6, ranges
    log = (cli.root / "logs" / "download.log").read_text()
    assert "the link is capped per connection" in log, log


def test_no_flags_keeps_one_connection_per_file_where_one_keeps_up(cli, hub):
    """On a link no connection cap holds back (here: loopback, as fast as this machine can
    hash), each big file stays on its one connection: more would only cost CPU."""
    big = {f"w{i}.safetensors": Content(128 << 20, 7 + i) for i in range(2)}
    hub.add_repo("fast", big)
    r = cli("download", "fast")
    assert r.code == 0, r.text
    assert "-x 1 or 16 (auto) -j 8 (auto)" in r.err, r.err
    assert_same_tree(cli.downloads / "fast", big)
    gets = [q for q in hub.requests if q.kind == "cdn" and q.method == "GET"]
    assert len(gets) == 2 and all(q.range and q.range.endswith(f"-{(128 << 20) - 1}")
                                  for q in gets), [q.range for q in gets]
    log = (cli.root / "logs" / "download.log").read_text()
    assert "one connection per big file moved" in log and "one each" in log, log


def test_no_flags_opens_all_connections_at_once_when_the_server_is_far(cli, hub):
    """A server whose first two answers take 20 ms or more is far: one TCP connection cannot fill
    such a link, so big files do not probe with one first."""
    big = {"model.safetensors": Content(24 << 20, 9)}
    hub.add_repo("far", big)
    hub.latency = 0.03
    r = cli("download", "far")
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "far", big)
    log = (cli.root / "logs" / "download.log").read_text()
    assert "the server is far (its first answers took" in log, log
    gets = [q for q in hub.requests if q.kind == "cdn" and q.method == "GET"]
    assert len(gets) >= 6, [q.range for q in gets]
