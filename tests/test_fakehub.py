"""The Hub double must fool the real clients: huggingface_hub, aria2c and wget (see HUB_API.md).

Everything talks to 127.0.0.1 only. huggingface_hub reads its settings at import time, so they are set
before importing it, and every call passes `endpoint=` explicitly.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"            # hf_xet is installed: it must never be used here
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # a token stored on this machine must not leak into requests
os.environ.pop("HF_TOKEN", None)

import hashlib
import http.client
import math
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import httpx2
import pytest
import requests
import urllib3
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.fakehub import BLOCK, Content, FakeHub, Virtual, content_bytes, content_read, content_sha256, demo_hub, lfs_pointer
from tests.helpers import sha256_file

MODEL = "org/model"
GATED = "org/gated"
PRIVATE = "org/private"
DOLLY = "databricks/databricks-dolly-15k"
BIG = Content(5 * 1024 * 1024, seed=1)       # LFS, served by the CDN
CONFIG = b'{"model_type": "gpt2", "n_layer": 12}'  # regular, served through /api/resolve-cache/
ODD_NAME = "dir with space/na\u00efve #1.txt"


def model_files() -> dict[str, bytes | Content]:
    files: dict[str, bytes | Content] = {"config.json": CONFIG, "model.safetensors": BIG, "README.md": b"# model\n",
                                         "onnx/model.onnx": Content(4096, seed=2), "onnx/sub/deep.txt": b"deep",
                                         ODD_NAME: b"odd"}
    files.update({f"data/shard-{i:02d}.txt": b"row %d\n" % i for i in range(22)})
    return files


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch: pytest.MonkeyPatch) -> None:
    # In case huggingface_hub was imported before this module set the environment.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub(hub: FakeHub) -> FakeHub:
    """conftest's empty hub, with this module's repos and tokens."""
    hub.add_repo(MODEL, model_files())
    hub.add_repo(GATED, {"config.json": CONFIG, "weights.bin": Content(2048, seed=3)}, gated=True)
    hub.add_repo(PRIVATE, {"config.json": CONFIG}, private=True)
    hub.add_repo(DOLLY, {"databricks-dolly-15k.jsonl": b'{"instruction": "hi"}\n' * 100}, repo_type="dataset")
    hub.add_token("hf_alice", user="alice", access="*")
    hub.add_token("hf_bob", user="bob", access=set())
    return hub


@pytest.fixture
def api(hub: FakeHub) -> HfApi:
    return HfApi(endpoint=hub.url, token=False)


def resolve_url(hub: FakeHub, path: str, repo: str = MODEL) -> str:
    return f"{hub.url}/{repo}/resolve/main/{quote(path)}"


def expected_order(paths: list[str], prefix: str = "") -> list[str]:
    """Independent spec of the recursive order: at each level dirs first (each followed by its
    contents), then files, each group sorted by code point."""
    level = [p[len(prefix):] for p in paths if p.startswith(prefix)]
    dirs = sorted({p.split("/")[0] for p in level if "/" in p})
    files = sorted(p for p in level if "/" not in p)
    out: list[str] = []
    for d in dirs:
        out.append(prefix + d)
        out += expected_order(paths, prefix + d + "/")
    return out + [prefix + f for f in files]


# ---------------------------------------------------------------- content helpers

def test_content_is_deterministic_and_rangeable() -> None:
    c = Content(3 * BLOCK + 123, seed=7)
    whole = content_bytes(c)
    assert len(whole) == c.size and whole == content_bytes(Content(c.size, seed=7))
    assert hashlib.sha256(whole).hexdigest() == content_sha256(c)
    for a, n in [(0, 10), (BLOCK - 5, 10), (2 * BLOCK - 1, BLOCK + 2), (c.size - 3, 10)]:
        assert content_read(c, a, n) == whole[a:a + n]
    assert whole[:BLOCK] != whole[BLOCK:2 * BLOCK]  # blocks differ: a misplaced block changes the sha256
    assert content_bytes(Content(100, seed=8)) != whole[:100]


# ---------------------------------------------------------------- API via huggingface_hub

def test_repo_info_sha_and_siblings(hub: FakeHub, api: HfApi) -> None:
    info = api.model_info(MODEL, files_metadata=True)
    assert info.sha == hub.repo(MODEL).branches["main"]
    siblings = {s.rfilename: s for s in info.siblings}
    assert list(siblings) == sorted(model_files())
    big = siblings["model.safetensors"]
    assert big.size == BIG.size and big.lfs.sha256 == content_sha256(BIG) and big.lfs.pointer_size == len(lfs_pointer(big.lfs.sha256, BIG.size))
    cfg = siblings["config.json"]
    assert cfg.lfs is None and cfg.blob_id == hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()
    ds = api.dataset_info(DOLLY)
    assert ds.id == DOLLY and ds.sha == hub.repo(DOLLY, "dataset").branches["main"]


def test_list_repo_tree_follows_link_pages(hub: FakeHub, api: HfApi) -> None:
    hub.tree_page_size = 7
    entries = list(api.list_repo_tree(MODEL, recursive=True))
    files = model_files()
    dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
    assert [e.path for e in entries] == expected_order(list(files))
    assert len(entries) == len(files) + len(dirs) > 20
    assert hub.count("GET", "/tree/main") == math.ceil(len(entries) / 7)
    assert hub.count("GET", "cursor=") == math.ceil(len(entries) / 7) - 1
    by_path = {e.path: e for e in entries}
    for path, data in files.items():
        raw = content_bytes(data)
        e = by_path[path]
        assert e.size == len(raw)
        if path.endswith((".safetensors", ".onnx")):
            sha = hashlib.sha256(raw).hexdigest()
            pointer = lfs_pointer(sha, len(raw))
            assert e.lfs.sha256 == sha and e.lfs.size == len(raw) and e.lfs.pointer_size == len(pointer)
            assert e.blob_id == hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
        else:
            assert e.lfs is None and e.blob_id == hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
    assert all(not hasattr(by_path[d], "size") for d in dirs)  # RepoFolder


def test_tree_link_is_absolute_and_subpath_is_one_segment(hub: FakeHub, api: HfApi) -> None:
    hub.tree_page_size = 2
    r = requests.get(f"{hub.url}/api/models/{MODEL}/tree/main/onnx%2Fsub", params={"recursive": "false"})
    assert r.status_code == 200 and [e["path"] for e in r.json()] == ["onnx/sub/deep.txt"]
    r = requests.get(f"{hub.url}/api/models/{MODEL}/tree/main", params={"recursive": "true"})
    assert r.links["next"]["url"].startswith(hub.url + f"/api/models/{MODEL}/tree/main?")
    assert [e.path for e in api.list_repo_tree(MODEL, path_in_repo="onnx")] == ["onnx/sub", "onnx/model.onnx"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(MODEL, path_in_repo="nope"))


def test_tree_expand_uses_its_own_page_size(hub: FakeHub, api: HfApi) -> None:
    hub.tree_page_size_expand = 3
    entries = list(api.list_repo_tree(MODEL, path_in_repo="data", expand=True))
    assert len(entries) == 22 and hub.count("GET", "/tree/") == 8
    assert entries[0].last_commit.oid == hub.repo(MODEL).branches["main"] and entries[0].security.safe


def test_paths_info_drops_missing(hub: FakeHub, api: HfApi) -> None:
    got = api.get_paths_info(MODEL, ["config.json", "missing.txt", "onnx", "model.safetensors"])
    assert [p.path for p in got] == ["config.json", "onnx", "model.safetensors"]
    assert got[2].lfs.sha256 == content_sha256(BIG)


def test_revisions_tags_prs_and_old_commits(hub: FakeHub, api: HfApi, tmp_path: Path) -> None:
    old = hub.repo(MODEL).branches["main"]
    hub.add_tag(MODEL, "v1.0")
    new = hub.add_commit(MODEL, files={"config.json": b'{"v": 2}'}, delete=["README.md"])
    hub.add_branch(MODEL, "refs/pr/1", old)
    assert api.model_info(MODEL, revision="main").sha == new
    assert api.model_info(MODEL, revision="refs/pr/1").sha == old
    assert api.model_info(MODEL, revision="v1.0").sha == old
    refs = api.list_repo_refs(MODEL, include_pull_requests=True)
    assert [t.name for t in refs.tags] == ["v1.0"] and refs.pull_requests[0].ref == "refs/pr/1"
    get = lambda rev: Path(hf_hub_download(MODEL, "config.json", revision=rev, endpoint=hub.url,
                                           cache_dir=tmp_path / rev, token=False)).read_bytes()
    assert get(old) == CONFIG and get("v1.0") == CONFIG and get("main") == b'{"v": 2}'
    assert "README.md" not in {e.path for e in api.list_repo_tree(MODEL, revision=new)}
    assert "README.md" in {e.path for e in api.list_repo_tree(MODEL, revision=old)}


# ---------------------------------------------------------------- downloads via huggingface_hub

def test_hf_hub_download_lfs_and_regular_without_leaking_token(hub: FakeHub, tmp_path: Path) -> None:
    for name in ["model.safetensors", "config.json", ODD_NAME]:
        path = hf_hub_download(MODEL, name, endpoint=hub.url, cache_dir=tmp_path / "c", token="hf_alice")
        assert Path(path).read_bytes() == content_bytes(model_files()[name])
        assert hub.file_downloads(name) == 1
    local = hf_hub_download(MODEL, "model.safetensors", endpoint=hub.url, local_dir=tmp_path / "l", token=False)
    assert sha256_file(local) == content_sha256(BIG)
    cdn = hub.records(server="cdn")
    assert cdn and all("authorization" not in r.headers for r in cdn)
    assert all(r.headers.get("authorization") == "Bearer hf_alice" for r in hub.records(path_contains="resolve")[:6])
    assert hub.count("GET", "/api/resolve-cache/") == 2  # regular files: 307 to the same origin


def test_snapshot_download_dataset(hub: FakeHub, tmp_path: Path) -> None:
    folder = snapshot_download(DOLLY, repo_type="dataset", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert (Path(folder) / "databricks-dolly-15k.jsonl").read_bytes() == b'{"instruction": "hi"}\n' * 100


@pytest.mark.parametrize("token,status,exc", [(False, 401, GatedRepoError), ("hf_bob", 403, GatedRepoError)])
def test_gated_repo_errors(hub: FakeHub, tmp_path: Path, token: str | bool, status: int, exc: type) -> None:
    with pytest.raises(exc) as info:
        hf_hub_download(GATED, "config.json", endpoint=hub.url, cache_dir=tmp_path, token=token)
    assert info.value.response.status_code == status
    with pytest.raises(exc):
        HfApi(endpoint=hub.url, token=token).model_info(GATED, revision="main")
    assert HfApi(endpoint=hub.url, token=token).model_info(GATED).gated == "manual"  # plain info stays public
    path = hf_hub_download(GATED, "weights.bin", endpoint=hub.url, cache_dir=tmp_path, token="hf_alice")
    assert Path(path).read_bytes() == content_bytes(Content(2048, seed=3))


@pytest.mark.parametrize("repo,token,status", [("org/missing", False, 401), ("org/missing", "hf_bob", 404),
                                               (PRIVATE, False, 401), (PRIVATE, "hf_bob", 404)])
def test_repo_not_found(hub: FakeHub, tmp_path: Path, repo: str, token: str | bool, status: int) -> None:
    with pytest.raises(RepositoryNotFoundError) as info:
        hf_hub_download(repo, "config.json", endpoint=hub.url, cache_dir=tmp_path, token=token)
    assert info.value.response.status_code == status and not isinstance(info.value, GatedRepoError)
    assert info.value.response.headers["X-Error-Code"] == "RepoNotFound"


def test_revision_entry_and_credential_errors(hub: FakeHub, api: HfApi, tmp_path: Path) -> None:
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(MODEL, "config.json", revision="nope", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(MODEL, "missing.bin", endpoint=hub.url, cache_dir=tmp_path, token=False)
    r = requests.head(resolve_url(hub, "missing.bin"))
    assert r.status_code == 404 and r.headers["X-Repo-Commit"] == hub.repo(MODEL).branches["main"]
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub.url, token="hf_unknown").model_info(MODEL)
    assert info.value.response.status_code == 401 and not isinstance(info.value, RepositoryNotFoundError)
    assert info.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert PRIVATE in HfApi(endpoint=hub.url, token="hf_alice").model_info(PRIVATE).id


# ---------------------------------------------------------------- raw HTTP semantics

def test_resolve_redirects_and_headers(hub: FakeHub) -> None:
    r = requests.head(resolve_url(hub, "model.safetensors"), allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"].startswith(hub.cdn_url + "/lfs/")
    assert r.headers["X-Linked-Etag"] == f'"{content_sha256(BIG)}"' and r.headers["X-Linked-Size"] == str(BIG.size)
    for h in ["X-Repo-Commit", "X-Request-Id", "X-Powered-By", "Access-Control-Expose-Headers"]:
        assert h in r.headers
    r = requests.get(resolve_url(hub, "config.json"), allow_redirects=False)
    assert r.status_code == 307 and r.headers["Location"].startswith("/api/resolve-cache/models/org/model/")
    r = requests.get(resolve_url(hub, "model.safetensors"), headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == content_read(BIG, 0, 10)
    assert "X-Repo-Commit" not in r.headers and "filename=\"model.safetensors\";" in r.headers["Content-Disposition"]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_ranges_and_conditional(hub: FakeHub, name: str) -> None:
    data = content_bytes(model_files()[name])
    url, n = resolve_url(hub, name), len(data)
    cases = [("bytes=5-14", 206, data[5:15], f"bytes 5-14/{n}"), ("bytes=7-", 206, data[7:], f"bytes 7-{n - 1}/{n}"),
             ("bytes=-4", 206, data[-4:], f"bytes {n - 4}-{n - 1}/{n}"), (f"bytes={n}-", 416, b"", f"bytes */{n}"),
             ("bytes=0-1,5-6", 200, data, None)]
    for rng, status, body, content_range in cases:
        r = requests.get(url, headers={"Range": rng})
        assert (r.status_code, r.content, r.headers.get("Content-Range")) == (status, body, content_range), rng
    etag = requests.get(url).headers["ETag"]
    assert requests.get(url, headers={"If-None-Match": etag}).status_code == 304  # resolve-cache / CDN
    assert requests.head(url, headers={"If-None-Match": etag}, allow_redirects=False).status_code == 304


def test_raw_serves_the_lfs_pointer(hub: FakeHub) -> None:
    r = requests.get(f"{hub.url}/{MODEL}/raw/main/model.safetensors")
    assert r.status_code == 200 and r.content == lfs_pointer(content_sha256(BIG), BIG.size)
    assert r.headers["ETag"] == f'"{hub.file_info(MODEL, "model.safetensors").oid}"'


def test_odd_paths_are_listed_without_crashing(hub: FakeHub) -> None:
    # Clients must refuse such names; the double must still list them so that can be tested.
    hub.add_repo("evil", {"../up.txt": b"z", "/etc/passwd": b"x", "a//b": b"y", "ok.txt": b"k"})
    r = requests.get(f"{hub.url}/api/models/evil/tree/main", params={"recursive": "true"})
    assert {e["path"] for e in r.json() if e["type"] == "file"} == {"../up.txt", "/etc/passwd", "a//b", "ok.txt"}


def test_cdn_checks_signature(hub: FakeHub) -> None:
    loc = requests.head(resolve_url(hub, "model.safetensors")).headers["Location"]
    r = requests.get(loc.replace("Signature=", "Signature=0"))
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content


# ---------------------------------------------------------------- faults and knobs

def test_fault_reset_aborts_then_is_spent(hub: FakeHub) -> None:
    hub.add_fault("reset", "model.safetensors", after_bytes=100_000)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(resolve_url(hub, "model.safetensors"))
    (rec,) = hub.records(server="cdn")
    assert rec.fault == "reset" and rec.bytes_sent == 100_000
    assert requests.get(resolve_url(hub, "model.safetensors")).content == content_bytes(BIG)


def test_fault_truncate_and_corrupt(hub: FakeHub) -> None:
    hub.add_fault("truncate", "config.json", after_bytes=10)
    conn = http.client.HTTPConnection(hub.url.removeprefix("http://"))
    loc = requests.head(resolve_url(hub, "config.json"), allow_redirects=False).headers["Location"]
    conn.request("GET", loc)
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == str(len(CONFIG))
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial == CONFIG[:10]
    hub.add_fault("corrupt", "*.safetensors", count=None)
    for _ in range(2):
        body = requests.get(resolve_url(hub, "model.safetensors")).content
        assert len(body) == BIG.size and body != content_bytes(BIG)


def test_fault_stall_is_released_on_stop(hub: FakeHub) -> None:
    hub.add_fault("stall", "model.safetensors", after_bytes=1000, seconds=30)
    r = requests.get(resolve_url(hub, "model.safetensors"), stream=True, timeout=(2, 0.3))
    assert len(r.raw.read(1000)) == 1000
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        r.raw.read(10)
    started = time.monotonic()
    hub.stop()  # must not wait for the 30 s stall
    assert time.monotonic() - started < 2


def test_fault_status_where(hub: FakeHub) -> None:
    hub.add_fault("status", "model.safetensors", status=503, where="resolve")
    assert requests.head(resolve_url(hub, "model.safetensors")).status_code == 302  # HEAD is not a body GET
    r = requests.get(resolve_url(hub, "model.safetensors"), allow_redirects=False)
    assert r.status_code == 503 and r.json()["error"]
    hub.add_fault("status", "model.safetensors", status=502, where="cdn")
    r = requests.get(resolve_url(hub, "model.safetensors"))
    assert r.status_code == 502 and r.history[0].status_code == 302
    assert requests.get(resolve_url(hub, "model.safetensors")).status_code == 200


def test_fault_429_headers(hub: FakeHub) -> None:
    hub.add_fault("429", "config.json", retry_after=7, count=2)
    for _ in range(2):
        r = requests.get(resolve_url(hub, "config.json"))
        assert r.status_code == 429 and r.headers["Retry-After"] == "7"
        assert r.headers["RateLimit"] == '"resolvers";r=0;t=7'
        assert r.headers["RateLimit-Policy"] == '"fixed window";"resolvers";q=3000;w=300'
    assert requests.get(resolve_url(hub, "config.json")).status_code == 200


def test_fault_expire(hub: FakeHub) -> None:
    hub.add_fault("expire", "model.safetensors")
    r = requests.get(resolve_url(hub, "model.safetensors"))
    assert r.status_code == 403 and b"Request has expired" in r.content
    assert requests.get(resolve_url(hub, "model.safetensors")).status_code == 200


def test_max_single_get(hub: FakeHub) -> None:
    hub.max_single_get = 1024 * 1024
    r = requests.get(resolve_url(hub, "model.safetensors"))
    assert r.status_code == 400 and b"Range" in r.content
    assert requests.get(resolve_url(hub, "model.safetensors"), headers={"Range": "bytes=0-"}).status_code == 206
    assert requests.get(resolve_url(hub, "config.json")).status_code == 200
    hub.require_range_for_large = False
    assert requests.get(resolve_url(hub, "model.safetensors"), headers={"Range": "bytes=0-"}).status_code == 400


def test_bandwidth_and_latency(hub: FakeHub) -> None:
    hub.bandwidth_per_conn, hub.latency = 2_000_000, 0.1
    started = time.monotonic()
    r = requests.get(resolve_url(hub, "model.safetensors"), headers={"Range": "bytes=0-399999"})
    # 2 responses x 0.1 s latency, plus 400 kB at 2 MB/s less the first chunk (sent at once)
    assert len(r.content) == 400_000 and time.monotonic() - started >= 0.2 + 0.1


def test_hf_hub_download_resumes_with_range_after_truncation(hub: FakeHub, tmp_path: Path) -> None:
    # huggingface_hub buffers 10 MiB (DOWNLOAD_CHUNK_SIZE) per chunk, so it can only resume at 10 MiB steps.
    big = Content(12 * 1024 * 1024, seed=9)
    hub.add_commit(MODEL, files={"big.safetensors": big})
    hub.add_fault("truncate", "big.safetensors", after_bytes=11 * 1024 * 1024)
    path = hf_hub_download(MODEL, "big.safetensors", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert sha256_file(path) == content_sha256(big)
    first, second = hub.records("GET", server="cdn")
    resumed_at = 11 * 1024 * 1024 // constants.DOWNLOAD_CHUNK_SIZE * constants.DOWNLOAD_CHUNK_SIZE
    assert first.fault == "truncate" and second.range == f"bytes={resumed_at}-" and second.status == 206


def test_hf_hub_download_does_not_retry_a_tcp_reset(hub: FakeHub, tmp_path: Path) -> None:
    # Quirk worth knowing: http_get retries RemoteProtocolError/timeouts but not httpx ReadError (RST).
    hub.add_fault("reset", "model.safetensors")
    with pytest.raises(httpx2.ReadError):
        hf_hub_download(MODEL, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path, token=False)


# ---------------------------------------------------------------- aria2c and wget

needs_tools = pytest.mark.skipif(not (shutil.which("aria2c") and shutil.which("wget")), reason="aria2c/wget missing")


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def aria2c(url: str, out: Path, *extra: str) -> list[str]:
    return ["aria2c", "--no-conf", "-q", "-x4", "-s4", "-k1M", "--dir", str(out.parent), "--out", out.name,
            *extra, url]


@needs_tools
def test_aria2c_segmented_download_through_302_and_307(hub: FakeHub, tmp_path: Path) -> None:
    hub.bandwidth_per_conn = 8_000_000  # slow enough that all 4 connections get a share
    run(aria2c(resolve_url(hub, "model.safetensors"), tmp_path / "m.safetensors"))
    assert sha256_file(tmp_path / "m.safetensors") == content_sha256(BIG)
    first = hub.records("GET")[0]
    assert first.server == "hub" and first.range is None  # aria2c's first request has no Range
    ranged = [r for r in hub.records("GET", server="cdn") if r.status == 206]
    assert len(ranged) >= 2 and all(r.range.startswith("bytes=") for r in ranged)
    # Each extra connection starts again from the Hub URL, so it gets its own 302 and signed link.
    assert any(r.range for r in hub.records("GET", "/resolve/", server="hub"))
    run(aria2c(resolve_url(hub, ODD_NAME), tmp_path / "odd.txt"))
    run(aria2c(resolve_url(hub, "config.json"), tmp_path / "config.json"))
    assert (tmp_path / "config.json").read_bytes() == CONFIG and (tmp_path / "odd.txt").read_bytes() == b"odd"


@needs_tools
def test_wget_through_302_and_307_and_resume(hub: FakeHub, tmp_path: Path) -> None:
    run(["wget", "-q", "-O", str(tmp_path / "m"), resolve_url(hub, "model.safetensors")])
    run(["wget", "-q", "-O", str(tmp_path / "c"), resolve_url(hub, "config.json")])
    assert sha256_file(tmp_path / "m") == content_sha256(BIG) and (tmp_path / "c").read_bytes() == CONFIG
    (tmp_path / "p").write_bytes(content_read(BIG, 0, 12345))
    hub.reset_log()
    run(["wget", "-q", "-c", "-O", str(tmp_path / "p"), resolve_url(hub, "model.safetensors")])
    assert sha256_file(tmp_path / "p") == content_sha256(BIG)
    assert [(r.server, r.status, r.range) for r in hub.records("GET")] == [
        ("hub", 302, "bytes=12345-"), ("cdn", 206, "bytes=12345-")]


@needs_tools
def test_aria2c_and_wget_forward_custom_headers_to_the_cdn(hub: FakeHub, tmp_path: Path) -> None:
    # Unlike huggingface_hub and requests, both tools replay --header on a cross-origin redirect:
    # a download manager must not hand them the token that way.
    auth = "--header=Authorization: Bearer hf_alice"
    run(aria2c(resolve_url(hub, "onnx/model.onnx"), tmp_path / "a", auth))
    run(["wget", "-q", "-O", str(tmp_path / "w"), auth, resolve_url(hub, "onnx/model.onnx")])
    cdn = hub.records(server="cdn")
    assert len(cdn) == 2 and all(r.headers.get("authorization") == "Bearer hf_alice" for r in cdn)
    # requests, like huggingface_hub, strips it (the port differs, so the origin does).
    requests.get(resolve_url(hub, "onnx/model.onnx"), headers={"Authorization": "Bearer hf_alice"})
    assert "authorization" not in hub.records(server="cdn")[-1].headers


# ---------------------------------------------------------------- scale and demo

def test_virtual_30tb_dataset_lists_fast(hub: FakeHub, api: HfApi, tmp_path: Path) -> None:
    files = {f"shards/{i // 1000:02d}/part-{i:05d}.parquet": Virtual(1_500_000_000) for i in range(20_000)}
    started = time.monotonic()
    hub.add_repo("big/corpus", files, repo_type="dataset")
    entries = list(api.list_repo_tree("big/corpus", repo_type="dataset", recursive=True))
    assert time.monotonic() - started < 10
    assert len(entries) == 20_000 + 21 and sum(getattr(e, "size", 0) for e in entries) == 30 * 10**12
    assert len({e.lfs.sha256 for e in entries if hasattr(e, "lfs")}) == 20_000
    name = "shards/03/part-03456.parquet"
    url = hf_hub_url("big/corpus", name, repo_type="dataset", endpoint=hub.url)
    assert get_hf_file_metadata(url, token=False).size == 1_500_000_000
    assert requests.get(url).status_code == 500
    hub.add_repo("small/virtual", {"notes.txt": Virtual(10)})  # a regular (non-LFS) virtual file
    url = resolve_url(hub, "notes.txt", repo="small/virtual")
    assert requests.head(url, allow_redirects=True).headers["Content-Length"] == "10"
    assert requests.get(url).status_code == 500


def test_demo_hub_serves_dolly(tmp_path: Path) -> None:
    demo = demo_hub()
    try:
        path = hf_hub_download(DOLLY, "databricks-dolly-15k.jsonl", repo_type="dataset", endpoint=demo.url,
                               cache_dir=tmp_path, token=False)
        assert Path(path).read_bytes().count(b"\n") == 200
    finally:
        demo.stop()
