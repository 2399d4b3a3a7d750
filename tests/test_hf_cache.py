"""`download --hf-cache`: the repo lands in the Hugging Face hub cache layout, and the proof is
huggingface_hub itself, run offline in a subprocess against that cache (issue 13)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakehub import Content, FakeHub, content_bytes
from tests.helpers import Cli, error_lines, wait_for

FILES = {
    "config.json": b'{"model_type": "gpt2"}',
    "model.safetensors": Content(300_000, seed=3),
    "copy/model.safetensors": Content(300_000, seed=3),      # shares the first one's blob
    "tokenizer/vocab.txt": b"a\nb\nc\n",
}

PROBE = r"""
import json, os, sys
from huggingface_hub import snapshot_download, hf_hub_download, try_to_load_from_cache, scan_cache_dir
repo, repo_type, revision, files = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
out = {"snapshot": snapshot_download(repo, repo_type=repo_type, revision=revision,
                                     local_files_only=True)}
out["files"] = {f: hf_hub_download(repo, f, repo_type=repo_type, revision=revision,
                                   local_files_only=True) for f in files}
out["cached"] = {f: try_to_load_from_cache(repo, f, repo_type=repo_type, revision=revision)
                 for f in files}
info = scan_cache_dir()
out["warnings"] = [str(w) for w in info.warnings]
out["repos"] = [{"id": r.repo_id, "type": r.repo_type, "size": r.size_on_disk,
                 "revisions": sorted((rev.commit_hash, sorted(rev.refs), rev.nb_files)
                                     for rev in r.revisions)} for r in info.repos]
print(json.dumps(out))
"""


def probe(cache: Path, repo: str, repo_type: str, revision: str, files: list[str]) -> dict[str, Any]:
    """What huggingface_hub, offline, finds in the cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFDL_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(cache.parent / "hf-home-probe"))
    r = subprocess.run([sys.executable, "-c", PROBE, repo, repo_type, revision, json.dumps(files)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def verify(cache: Path, repo: str, repo_type: str, revision: str, endpoint: str) -> str:
    """`hf cache verify`: every cached file checked against the Hub's checksums."""
    hf = Path(sys.executable).with_name("hf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFDL_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(cache.parent / "hf-home-probe"))
    r = subprocess.run([str(hf), "cache", "verify", repo, "--repo-type", repo_type,
                        "--revision", revision, "--fail-on-extra-files"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All checksums match" in r.stdout, r.stdout
    return r.stdout + r.stderr


def sizes(files: dict[str, Any]) -> int:
    return sum(len(content_bytes(d)) if not isinstance(d, bytes) else len(d) for d in files.values())


def test_model_in_the_cache_is_found_offline_by_huggingface_hub(cli: Cli, hub: FakeHub,
                                                                 tmp_path: Path) -> None:
    commit = hub.add_repo("org/model", FILES)
    cache = tmp_path / "cache"
    r = cli("download", "org/model", "--hf-cache", str(cache), "--tool", "python")
    assert r.code == 0, r.text
    folder = cache / "models--org--model"
    snapshot = folder / "snapshots" / commit
    assert (folder / "refs" / "main").read_text() == commit
    for path in FILES:
        link = snapshot / path
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), path
        assert os.path.realpath(link).startswith(str(folder / "blobs")), path
    assert hub.file_downloads("model.safetensors") + hub.file_downloads("copy/model.safetensors") == 1
    assert len(list((folder / "blobs").iterdir())) == 3          # the shared blob once
    assert not (snapshot / ".hfdl").exists()

    found = probe(cache, "org/model", "model", "main", list(FILES))
    assert found["snapshot"] == str(snapshot)
    for path in FILES:
        assert found["files"][path] == str(snapshot / path)
        assert found["cached"][path] == str(snapshot / path)
    assert found["warnings"] == []
    blob_bytes = sizes({k: v for k, v in FILES.items() if k != "copy/model.safetensors"})
    assert found["repos"] == [{"id": "org/model", "type": "model", "size": blob_bytes,
                               "revisions": [[commit, ["main"], len(FILES)]]}]
    assert f"checked: {len(FILES)}" in verify(cache, "org/model", "model", commit, hub.url)

    # the same command again: nothing fetched, still the same layout
    hub.reset_log()
    r = cli("download", "org/model", "--hf-cache", str(cache), "-q")
    assert r.code == 0 and r.out.strip() == str(snapshot), r.text
    assert sum(hub.file_downloads(p) for p in FILES) == 0


def test_dataset_with_include_and_a_second_revision_sharing_blobs(cli: Cli, hub: FakeHub,
                                                                   tmp_path: Path) -> None:
    data = {"data/train.parquet": Content(200_000, seed=5), "data/test.parquet": b"t" * 5000,
            "README.md": b"# data\n", "extra/big.parquet": Content(100_000, seed=9)}
    first = hub.add_repo("org/data", data, repo_type="dataset")
    hub.add_tag("org/data", "v1", repo_type="dataset")
    second = hub.add_commit("org/data", {"README.md": b"# data, v2\n"}, repo_type="dataset")
    cache = tmp_path / "cache"
    env = {"HFDL_HF_CACHE": str(cache)}
    r = cli("download", "org/data", "--dataset", "--revision", "v1", "--include", "data/*",
            "README.md", "--tool", "python", env=env)
    assert r.code == 0, r.text
    hub.reset_log()
    r = cli("download", "org/data", "--dataset", "--include", "data/*", "README.md",
            "--tool", "python", env=env)
    assert r.code == 0, r.text
    # only the changed README was fetched for the second commit: the data blobs are shared
    assert hub.file_downloads("README.md") == 1
    assert hub.file_downloads("data/train.parquet") == hub.file_downloads("data/test.parquet") == 0
    folder = cache / "datasets--org--data"
    assert (folder / "refs" / "v1").read_text() == first
    assert (folder / "refs" / "main").read_text() == second
    wanted = ["data/train.parquet", "data/test.parquet", "README.md"]
    for revision, commit in (("v1", first), ("main", second)):
        found = probe(cache, "org/data", "dataset", revision, wanted)
        snapshot = folder / "snapshots" / commit
        assert found["snapshot"] == str(snapshot)
        assert found["files"] == {p: str(snapshot / p) for p in wanted}
        assert not (snapshot / "extra").exists()
    repos = found["repos"]
    assert len(repos) == 1 and repos[0]["type"] == "dataset"
    assert repos[0]["size"] == 200_000 + 5000 + len(b"# data\n") + len(b"# data, v2\n")
    assert repos[0]["revisions"] == sorted([[first, ["v1"], 3], [second, ["main"], 3]])
    verify(cache, "org/data", "dataset", second, hub.url)


def test_a_blob_already_in_the_cache_is_checked_and_reused(cli: Cli, hub: FakeHub,
                                                           tmp_path: Path) -> None:
    commit = hub.add_repo("org/model", FILES)
    cache = tmp_path / "cache"
    assert cli("download", "org/model", "--hf-cache", str(cache)).code == 0
    folder = cache / "models--org--model"
    snapshot = folder / "snapshots" / commit
    # a damaged blob and a lost link: the blob is fetched again, the link remade
    blob = Path(os.path.realpath(snapshot / "tokenizer/vocab.txt"))
    blob.write_bytes(b"x\ny\nz\n")
    (snapshot / "config.json").unlink()
    cli("clean", "--all")
    hub.reset_log()
    r = cli("download", "org/model", "--hf-cache", str(cache), "--tool", "python")
    assert r.code == 0, r.text
    assert hub.file_downloads("tokenizer/vocab.txt") == 1
    assert hub.file_downloads("config.json") == 0
    assert hub.file_downloads("model.safetensors") == 0
    assert (snapshot / "tokenizer/vocab.txt").read_bytes() == b"a\nb\nc\n"
    assert (snapshot / "config.json").is_symlink()


def test_default_cache_is_huggingface_hubs_and_local_dir_conflicts(cli: Cli, hub: FakeHub,
                                                                   tmp_path: Path) -> None:
    commit = hub.add_repo("org/model", {"config.json": b"{}"})
    hub_cache = tmp_path / "hub-cache"
    r = cli("download", "org/model", "--hf-cache", env={"HF_HUB_CACHE": str(hub_cache)})
    assert r.code == 0, r.text
    assert (hub_cache / "models--org--model" / "snapshots" / commit / "config.json").is_symlink()
    r = cli("download", "org/model", "--hf-cache", str(hub_cache), "--local-dir",
            str(tmp_path / "x"))
    assert r.code == 2 and "--hf-cache and --local-dir" in error_lines(r)[0]
    r = cli("config")
    assert "hf_cache" in r.out
    r = cli("download", "--hf-cache", "org/model")      # the flag took the repo as its folder
    assert r.code == 2 and "put the repo first" in error_lines(r)[0]


def test_local_dir_over_the_env_setting_says_so_and_no_hf_cache_turns_it_off(
        cli: Cli, hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/model", {"config.json": b"{}"})
    env = {"HFDL_HF_CACHE": str(tmp_path / "cache")}
    r = cli("download", "org/model", "--local-dir", str(tmp_path / "plain"), env=env)
    assert r.code == 0, r.text
    notes = [line for line in r.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--local-dir wins over HFDL_HF_CACHE" in notes[0], r.err
    assert not (tmp_path / "plain" / "config.json").is_symlink()
    r = cli("download", "org/model", "--no-hf-cache", "-q", env=env)
    assert r.code == 0 and r.out.strip() == str(tmp_path / "downloads" / "org--model"), r.text
    assert "note:" not in r.err and not (tmp_path / "cache").exists()
    r = cli("download", "org/model", "--hf-cache", "--no-hf-cache")
    assert r.code == 2 and "not allowed with" in error_lines(r)[0]


@pytest.mark.parametrize("value", ["1", "on"])
def test_env_setting_one_means_the_librarys_cache(cli: Cli, hub: FakeHub, tmp_path: Path,
                                                  value: str) -> None:
    hub.add_repo("org/model", {"config.json": b"{}"})
    r = cli("download", "org/model", "-q",
            env={"HFDL_HF_CACHE": value, "HF_HOME": str(tmp_path / "home")})
    assert r.code == 0, r.text
    assert r.out.strip().startswith(str(tmp_path / "home" / "hub" / "models--org--model"))


# ---------------------------------------------------------------- hf download --local-dir

def hf_download(hub: FakeHub, tmp_path: Path, repo: str, local_dir: Path,
                *extra: str) -> subprocess.CompletedProcess:
    hf = Path(sys.executable).with_name("hf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFDL_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "hf-home-cli"))
    r = subprocess.run([str(hf), "download", repo, "--local-dir", str(local_dir), *extra],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def listing_only(hub: FakeHub) -> bool:
    """Since the log was reset, the Hub saw the listing (repo info, tree) and nothing else
    about the repo: no HEAD, no file (the CLI's own /api/agent-harnesses call aside)."""
    seen = [f"{r.method} {r.kind} {r.path.split('?')[0]}" for r in hub.records()
            if "agent-harnesses" not in r.path]
    kinds = {s.rsplit("/", 1)[0] for s in seen}
    return "GET api /api/models/org/model/revision" in kinds and kinds <= {
        "GET api /api/models/org/model/revision", "GET api /api/models/org/model/tree"}


def test_hf_download_over_our_local_dir_fetches_only_the_listing(cli: Cli, hub: FakeHub,
                                                                 tmp_path: Path) -> None:
    commit = hub.add_repo("org/model", FILES)
    target = tmp_path / "target"
    assert cli("download", "org/model", "--local-dir", str(target)).code == 0
    meta = target / ".cache/huggingface/download/tokenizer/vocab.txt.metadata"
    lines = meta.read_text().splitlines()
    assert lines[:2] == [commit, hub.file_info("org/model", "tokenizer/vocab.txt").oid]
    hub.reset_log()
    hf_download(hub, tmp_path, "org/model", target)
    assert listing_only(hub), hub.records()
    # hf's library sees them current too
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download('org/model', local_dir=sys.argv[1]))")
    hub.reset_log()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFDL_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "h"))
    r = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert listing_only(hub), hub.records()


def test_files_hf_download_left_are_adopted_without_a_refetch(cli: Cli, hub: FakeHub,
                                                              tmp_path: Path) -> None:
    hub.add_repo("org/model", FILES)
    target = tmp_path / "target"
    hf_download(hub, tmp_path, "org/model", target)
    hub.reset_log()
    r = cli("download", "org/model", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert sum(hub.file_downloads(p) for p in FILES) == 0
    st = json.loads(cli("status", "task_001", "--json").out)
    assert st["files_done"] == len(FILES)
    # a file hf left that changed since is checked, and fetched again
    (target / "config.json").write_bytes(b'{"model_type": "bert"}')
    cli("clean", "--all")
    hub.reset_log()
    assert cli("download", "org/model", "--local-dir", str(target)).code == 0
    assert hub.file_downloads("config.json") == 1
    assert (target / "config.json").read_bytes() == FILES["config.json"]


def test_clean_delete_files_removes_our_hf_metadata(cli: Cli, hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/model", FILES)
    target = tmp_path / "target"
    assert cli("download", "org/model", "--local-dir", str(target)).code == 0
    assert (target / ".cache/huggingface").is_dir()
    assert cli("clean", "--delete-files").code == 0
    assert not target.exists()


# ---------------------------------------------------------------- the rest, in cache mode

def start_in_cache(cli: Cli, cache: Path, jobs: int) -> subprocess.Popen:
    """org/model into the hub cache over the python backend, one stream per file (a test then
    kills it)."""
    return cli.popen("download", "org/model", "--hf-cache", str(cache), "--tool", "python",
                     "-j", str(jobs), "-x", "1")


def test_kill9_resume_verify_sync_and_clean_in_cache_mode(cli: Cli, hub: FakeHub,
                                                          tmp_path: Path) -> None:
    big = {"a.safetensors": Content(6 << 20, seed=1), "b.safetensors": Content(6 << 20, seed=2),
           "config.json": b"{}"}
    first = hub.add_repo("org/model", big)
    cache = tmp_path / "cache"
    folder = cache / "models--org--model"
    hub.bandwidth_per_conn = 3_000_000
    proc = start_in_cache(cli, cache, jobs=2)
    assert wait_for(lambda: hub.bytes_served() > 4 << 20, 30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)             # the killed connections' records land in the log
    hub.reset_log()
    hub.bandwidth_per_conn = 0
    r = cli("resume", "task_001")
    assert r.code == 0, r.text
    ranges = [rec.range for rec in hub.records("GET") if rec.file and rec.file.endswith("tensors")]
    assert any(rg and not rg.startswith("bytes=0-") for rg in ranges), ranges   # continued
    snapshot = folder / "snapshots" / first
    assert (snapshot / "a.safetensors").is_symlink() and not (snapshot / ".hfdl").exists()
    assert (folder / "refs" / "main").read_text() == first        # resume wrote the ref too
    assert cli("verify", "task_001").code == 0
    # a blob damaged behind our back: verify says so, resume fetches it again
    blob = Path(os.path.realpath(snapshot / "config.json"))
    blob.write_bytes(b"[]")
    assert cli("verify", "task_001").code == 3
    assert cli("resume", "task_001").code == 0
    assert blob.read_bytes() == b"{}" and (snapshot / "config.json").is_symlink()

    # the branch moves: the same task goes to a new snapshot, the unchanged blob reused,
    # refs/main moved (the old snapshot stays, a detached revision, as huggingface_hub leaves it)
    second = hub.add_commit("org/model", {"b.safetensors": Content(1000, seed=7)})
    hub.reset_log()
    r = cli("download", "org/model", "--hf-cache", str(cache))
    assert r.code == 0, r.text
    assert hub.file_downloads("a.safetensors") == 0 and hub.file_downloads("b.safetensors") == 1
    assert (folder / "refs" / "main").read_text() == second
    tasks = json.loads((cli.root / "metadata" / "tasks.json").read_text())["tasks"]
    assert list(tasks) == ["task_001"]
    assert tasks["task_001"]["local_dir"] == str(folder / "snapshots" / second)
    assert tasks["task_001"]["commit"] == second
    found = probe(cache, "org/model", "model", "main", list(big))
    assert found["snapshot"] == str(folder / "snapshots" / second)
    assert cli("verify", "task_001").code == 0

    # clean --delete-files: the task's snapshot and its own blob go, the shared ones stay
    new_b = os.path.realpath(folder / "snapshots" / second / "b.safetensors")
    r = cli("clean", "--delete-files", "task_001")
    assert r.code == 0, r.text
    assert not (folder / "snapshots" / second).exists() and not os.path.exists(new_b)
    assert len(list((folder / "blobs").iterdir())) == 3
    found = probe(cache, "org/model", "model", first, list(big))
    assert found["repos"][0]["revisions"] == [[first, [], 3]]
    assert found["warnings"] == []


def test_without_symlinks_files_stay_real_files_as_huggingface_hub_does(cli: Cli, hub: FakeHub,
                                                                        tmp_path: Path) -> None:
    commit = hub.add_repo("org/model", FILES)
    cache = tmp_path / "cache"
    # huggingface_hub's own switch for filesystems without symlinks (its probe honours it)
    r = cli("download", "org/model", "--hf-cache", str(cache), "--tool", "python",
            env={"HF_HUB_DISABLE_SYMLINKS": "1"})
    assert r.code == 0, r.text
    assert "has no symlinks" in r.err
    snapshot = cache / "models--org--model" / "snapshots" / commit
    for path, data in FILES.items():
        p = snapshot / path
        assert p.is_file() and not p.is_symlink(), path
        assert p.read_bytes() == (data if isinstance(data, bytes) else content_bytes(data))
    assert hub.file_downloads("model.safetensors") + hub.file_downloads("copy/model.safetensors") == 1
    found = probe(cache, "org/model", "model", "main", list(FILES))
    assert found["files"] == {p: str(snapshot / p) for p in FILES}
    assert cli("verify", "task_001").code == 0
    assert cli("clean", "--delete-files").code == 0
    assert not (cache / "models--org--model").exists()


def test_a_filesystem_refusing_symlinks_is_probed_and_blobs_move_into_the_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No filesystem without symlinks can be mounted here (no vfat in this kernel): os.symlink
    refusing, as it does there, stands in for one, under huggingface_hub's own probe."""
    import errno

    import hf_cache

    def refuse(*_a: Any, **_k: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")
    folder = tmp_path / "models--org--model"
    snapshot = folder / "snapshots" / ("c" * 40)
    (folder / "blobs").mkdir(parents=True)
    blob = folder / "blobs" / ("e" * 64)
    blob.write_bytes(b"weights")
    monkeypatch.setattr(os, "symlink", refuse)
    with pytest.warns(UserWarning, match="does not support them"):      # the library's own
        assert not hf_cache.symlinks_supported(snapshot)
    hf_cache.link_blob(blob, snapshot / "sub" / "model.safetensors")
    final = snapshot / "sub" / "model.safetensors"
    assert final.is_file() and not final.is_symlink() and final.read_bytes() == b"weights"
    assert not blob.exists()                 # moved, as huggingface_hub does with a new blob


def readme_python_recipe() -> str:
    """The python block of the README's 'Use with transformers / vLLM' section."""
    from tests.helpers import ROOT
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use with transformers / vLLM", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_recipe_finds_the_download_offline(cli: Cli, hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add_repo("gpt2", {"config.json": b"{}", "model.safetensors": Content(5000, seed=1)})
    cache = tmp_path / "cache"
    assert cli("download", "gpt2", "--hf-cache", str(cache)).code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFDL_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "h"))
    r = subprocess.run([sys.executable, "-c", readme_python_recipe()], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    snapshot = cache / "models--gpt2" / "snapshots" / commit
    assert r.stdout.split() == [str(snapshot), str(snapshot / "config.json")]


@pytest.mark.parametrize("name", ["config.json", "a/b/model.safetensors", "x y/é.txt"])
def test_metadata_paths_are_the_ones_huggingface_hub_reads(tmp_path: Path, name: str) -> None:
    from huggingface_hub._local_folder import get_local_download_paths

    from hf_cache import local_metadata_path
    assert local_metadata_path(tmp_path, name) == \
        get_local_download_paths(tmp_path, name).metadata_path


# ---------------------------------------------------------------- partials shared with huggingface_hub

BIG = {"a.safetensors": Content(4 << 20, seed=11), "b.safetensors": Content(4 << 20, seed=12),
       "config.json": b"{}"}


def hf_env(hub: FakeHub, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFDL_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HOME=str(cache.parent / "hf-home-dl"))
    return env


HF_GET = ("import sys; from huggingface_hub import hf_hub_download; "
          "print(hf_hub_download(sys.argv[1], sys.argv[2]))")


def incomplete(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (folder / "blobs").glob("*.incomplete")}


def assert_whole(cache: Path, commit: str, files: dict[str, Any]) -> None:
    """Every file byte-identical through its snapshot link; no partial left in blobs/."""
    folder = cache / "models--org--model"
    for path, data in files.items():
        link = folder / "snapshots" / commit / path
        assert link.is_symlink(), path
        assert link.read_bytes() == (data if isinstance(data, bytes) else content_bytes(data)), path
    assert list((folder / "blobs").glob("*.incomplete*")) == []


def test_partial_names_are_huggingface_hubs(tmp_path: Path) -> None:
    from huggingface_hub.file_download import repo_folder_name

    from partial import Partial
    folder = tmp_path / repo_folder_name(repo_id="org/model", repo_type="model")
    snapshot = folder / "snapshots" / ("c" * 40)
    partial = Partial(snapshot, "sub/model.safetensors", "e" * 64)
    # file_download._hf_hub_download_to_cache_dir: blob_path + ".incomplete", and its lock
    blob = os.path.join(str(folder), "blobs", "e" * 64)
    assert str(partial.path) == blob + ".incomplete" and str(partial.blob) == blob
    assert str(partial.lock) == os.path.join(str(tmp_path), ".locks", folder.name, "e" * 64 + ".lock")
    assert partial.control.parent == partial.part_map.parent == folder / "blobs"
    assert Partial(tmp_path / "plain", "x.bin", "e" * 64).blob is None     # elsewhere: .hfdl/


def test_killed_in_cache_mode_then_hf_hub_download_then_resume(cli: Cli, hub: FakeHub,
                                                               tmp_path: Path) -> None:
    commit = hub.add_repo("org/model", BIG)
    cache = tmp_path / "cache"
    folder = cache / "models--org--model"
    hub.bandwidth_per_conn = 2_000_000
    proc = start_in_cache(cli, cache, jobs=3)
    assert wait_for(lambda: len([n for n, size in incomplete(folder).items() if size > 1 << 19])
                    == 2, 30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    hub.bandwidth_per_conn = 0
    # our partials are where huggingface_hub keeps its own: its scan reports them as such
    left = incomplete(folder)
    assert not (folder / "snapshots" / commit / ".hfdl").exists()
    code = ("import json; from huggingface_hub import scan_cache_dir; "
            "print(json.dumps(sorted(p.file_path.name for p in scan_cache_dir().incomplete_files)))")
    r = subprocess.run([sys.executable, "-c", code], env=hf_env(hub, cache), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout) == sorted(left), r.stderr
    # hf_hub_download is not tripped by our partial (nor waits on a lock a dead process held)
    r = subprocess.run([sys.executable, "-c", HF_GET, "org/model", "a.safetensors"],
                       env=hf_env(hub, cache), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == content_bytes(BIG["a.safetensors"])
    hub.reset_log()
    r = cli("resume", "task_001")
    assert r.code == 0, r.text
    assert hub.file_downloads("a.safetensors") == 0          # its blob, from hf, checked
    ranges = [rec.range for rec in hub.records("GET") if rec.file == "b.safetensors"]
    assert ranges and all(rg and not rg.startswith("bytes=0-") for rg in ranges), ranges
    assert_whole(cache, commit, BIG)
    assert cli("verify", "task_001").code == 0


def test_resume_continues_from_bytes_a_killed_hf_hub_download_left(cli: Cli, hub: FakeHub,
                                                                   tmp_path: Path) -> None:
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    files = {**BIG, "a.safetensors": Content(DOWNLOAD_CHUNK_SIZE + (8 << 20), seed=11)}
    commit = hub.add_repo("org/model", files)
    cache = tmp_path / "cache"
    folder = cache / "models--org--model"
    hub.bandwidth_per_conn = 8_000_000
    proc = subprocess.Popen([sys.executable, "-c", HF_GET, "org/model", "a.safetensors"],
                            env=hf_env(hub, cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # it writes in chunks of DOWNLOAD_CHUNK_SIZE: killed after the first one
    assert wait_for(lambda: any(size >= DOWNLOAD_CHUNK_SIZE
                                for size in incomplete(folder).values()), 30)
    proc.kill()
    proc.wait()
    hub.bandwidth_per_conn = 0
    [name] = incomplete(folder)           # huggingface_hub's own name: <etag>.<8 hex>.incomplete
    assert name.count(".") == 2, name
    hub.reset_log()
    r = cli("download", "org/model", "--hf-cache", str(cache), "--tool", "python")
    assert r.code == 0, r.text
    ranges = [rec.range for rec in hub.records("GET") if rec.file == "a.safetensors"]
    # not a byte of huggingface_hub's head again (one range or several, as -x chooses)
    starts = [int(r.split("=")[1].split("-")[0]) for r in ranges]
    assert ranges and min(starts) == DOWNLOAD_CHUNK_SIZE, ranges
    assert_whole(cache, commit, files)


def test_the_blob_lock_held_by_another_program_is_waited_for(cli: Cli, hub: FakeHub,
                                                             tmp_path: Path) -> None:
    from filelock import FileLock
    from huggingface_hub.file_download import repo_folder_name

    files = {"config.json": b"{}", "model.safetensors": Content(100_000, seed=4)}
    commit = hub.add_repo("org/model", files)
    cache = tmp_path / "cache"
    etag = hub.file_info("org/model", "model.safetensors").sha256
    lock = FileLock(str(cache / ".locks" / repo_folder_name(repo_id="org/model", repo_type="model")
                        / f"{etag}.lock"))
    lock.acquire()                    # as hf_hub_download holds it while it writes that blob
    try:
        proc = cli.popen("download", "org/model", "--hf-cache", str(cache), "--tool", "python")
        assert wait_for(lambda: hub.file_downloads("config.json") == 1, 30)
        time.sleep(1.0)
        assert hub.file_downloads("model.safetensors") == 0 and proc.poll() is None
    finally:
        lock.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert hub.file_downloads("model.safetensors") == 1
    assert_whole(cache, commit, files)


def test_batches_into_a_hub_cache_on_each_disk(cli: Cli, hub: FakeHub, tmp_path: Path) -> None:
    from tests.test_batch import MARKER
    files: dict[str, Any] = {f"data/shard-{i}.parquet": Content(400_000, seed=20 + i)
                             for i in range(4)}
    files["README.md"] = b"# data\n"
    commit = hub.add_repo("org/data", files, repo_type="dataset")
    disk1, disk2 = tmp_path / "disk1", tmp_path / "disk2"
    space = ["--dataset", "--available-space", "1000K"]
    out = tmp_path / "plan.json"
    r = cli("plan-batch", "org/data", *space, "--hf-cache", str(disk1), "--output", str(out))
    assert r.code == 0, r.text
    batches = [b["paths"] for b in json.loads(out.read_text())["batches"]]
    assert len(batches) == 2
    r = cli("batch-download", "org/data", *space, "--hf-cache", str(disk1), "--tool", "python")
    assert r.code == 0, r.text
    r = cli("batch-continue", "task_001", "2", "--hf-cache", str(disk2), "--tool", "python")
    assert r.code == 0, r.text
    for number, (disk, paths) in enumerate(((disk1, batches[0]), (disk2, batches[1])), 1):
        folder = disk / "datasets--org--data"
        snapshot = folder / "snapshots" / commit
        # the marker beside the snapshot, which holds the batch's files and nothing else
        marker = json.loads((folder / MARKER).read_text())
        assert [e["batch"] for e in marker["batches"]] == [number]
        assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                      if p.is_symlink()) == sorted(paths)
        found = probe(disk, "org/data", "dataset", "main", paths)
        assert found["files"] == {p: str(snapshot / p) for p in paths}
        assert found["warnings"] == []
    assert cli("verify", "task_001", "--batch", "2").code == 0
    r = cli("batch-status", "task_001", "--json")
    assert [row["state"] for row in json.loads(r.out)["batches"]] == ["completed"] * 2
