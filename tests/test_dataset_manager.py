"""dataset_manager in-process against the fake Hub: listings, filters, repo ids, the Hub's errors
turned into our own (message, hint, exit status), and the registry."""
from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import dataset_manager as dm
from task_manager import Task
from tests.fakehub import Content, FakeHub, FileData
from utils import ExitStatus, HFDError, HubError, MetadataError, UsageError

TOKEN = "hf_reader"
FILES: dict[str, FileData] = {
    "config.json": b'{"n_layer": 2}', "sub/deep/notes.txt": b"deep\n",
    "model.safetensors": Content(4096, seed=1), "tokenizer.json": b"{}",
}


def hub_error(endpoint: str, *, repo_id: str = "org/model", repo_type: str = "model",
              revision: str = "main", token: str | None = None,
              resolve_only: bool = False) -> HFDError:
    """The error that listing (or only resolving) a repo raises."""
    with pytest.raises(HFDError) as info:
        if resolve_only:
            dm.resolve_commit(repo_id, repo_type, revision, endpoint, token)
        else:
            dm.list_files(repo_id, repo_type, revision, endpoint, token)
    return info.value


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound by us, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ================================================================ names and URLs


@pytest.mark.parametrize("repo_id,clean", [
    ("gpt2", "gpt2"), ("org/name", "org/name"), (" org/name/ ", "org/name"),
    ("databricks/databricks-dolly-15k", "databricks/databricks-dolly-15k"),
])
def test_validate_repo_id_good(repo_id: str, clean: str) -> None:
    assert dm.validate_repo_id(repo_id) == clean


@pytest.mark.parametrize("repo_id", ["", "  ", "/", "../x", "org/..", ".", "a/b/c", "a//b"])
def test_validate_repo_id_bad(repo_id: str) -> None:
    with pytest.raises(UsageError) as info:
        dm.validate_repo_id(repo_id)
    assert "invalid repo id" in str(info.value) and "ORG/NAME" in (info.value.hint or "")
    assert info.value.exit_status == ExitStatus.USAGE


def test_file_url_quotes_as_huggingface_hub_does() -> None:
    url = dm.file_url("http://h/", "org/ds", "dataset", "abc", "dir with space/na #1.txt")
    assert url == "http://h/datasets/org/ds/resolve/abc/dir%20with%20space/na%20%231.txt"
    assert dm.file_url("http://h", "gpt2", "model", "refs/pr/1", "a.bin") == \
        "http://h/gpt2/resolve/refs%2Fpr%2F1/a.bin"


# ================================================================ listings


def test_list_files_gives_sizes_hashes_and_the_commit(hub: FakeHub) -> None:
    sha = hub.add_repo("org/model", FILES)
    listing = dm.list_files("org/model", "model", "main", hub.url, None)
    assert (listing.repo_id, listing.revision, listing.commit) == ("org/model", "main", sha)
    got = {f.path: f for f in listing.files}
    assert sorted(got) == sorted(FILES)                  # files only: no "sub" or "sub/deep"
    for path, f in got.items():
        entry = hub.file_info("org/model", path)
        assert (f.size, f.blob_id) == (entry.size, entry.oid)
        assert f.sha256 == (entry.sha256 if entry.lfs else None)
        assert f.expected_hash == (entry.sha256 if entry.lfs else entry.oid)
        assert f.hash_kind == ("sha256" if entry.lfs else "sha1")
    assert got["model.safetensors"].lfs and not got["config.json"].lfs
    assert listing.total_size == sum(f.size for f in listing.files) > 4096
    assert listing.refused == []


def test_the_tree_is_listed_at_the_resolved_commit(hub: FakeHub) -> None:
    first = hub.add_repo("org/model", FILES)
    hub.add_tag("org/model", "v1")
    hub.add_commit("org/model", {"new.txt": b"new"}, delete=["tokenizer.json"])
    hub.reset_log()
    old = dm.list_files("org/model", "model", "v1", hub.url, None)
    assert old.commit == first and old.revision == "v1"
    assert sorted(f.path for f in old.files) == sorted(FILES)
    trees = [r.path for r in hub.records(path_contains="/tree/")]
    # the commit, never the moving name: a push between the two calls cannot mix two versions
    assert trees and all(f"/tree/{first}" in p for p in trees)
    new = dm.list_files("org/model", "model", "main", hub.url, None)
    assert new.commit != first and "new.txt" in {f.path for f in new.files}


def test_the_listing_follows_the_link_pages_with_the_token(hub: FakeHub) -> None:
    """Listed straight over HTTP (hub_http): every page of the Link chain, in order, each
    with the token; a folder entry is not a file."""
    hub.tree_page_size = 7
    files = {f"d{i % 3}/f{i:02d}.txt": b"%d" % i for i in range(40)}
    hub.add_repo("org/private", files, private=True)
    hub.add_token(TOKEN, access={"org/private"})
    hub.reset_log()
    listing = dm.list_files("org/private", "model", "main", hub.url, TOKEN)
    assert sorted(f.path for f in listing.files) == sorted(files)
    assert len({f.path for f in listing.files}) == 40
    pages = hub.records(path_contains="/tree/")
    assert len(pages) > 40 // 7 and all(r.status == 200 for r in pages)
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in pages)


def test_a_tree_page_that_is_not_a_listing_is_an_unexpected_answer(
        stub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Stub, "status", 200)
    monkeypatch.setattr(_Stub, "body", b'{"sha": "' + b"a" * 40 + b'", "error": null}')
    err = hub_error(stub)
    assert type(err) is HubError and str(err).startswith(f"unexpected answer from {stub}")


def test_a_dataset_listing(hub: FakeHub) -> None:
    sha = hub.add_repo("org/ds", {"data/train.csv": b"a,b\n1,2\n"}, repo_type="dataset")
    listing = dm.list_files("org/ds", "dataset", "main", hub.url, None)
    assert listing.commit == sha and [f.path for f in listing.files] == ["data/train.csv"]


@pytest.mark.parametrize("include,exclude,expected", [
    (["*.json"], None, ["config.json", "tokenizer.json"]),
    (None, ["*.json"], ["model.safetensors", "sub/deep/notes.txt"]),
    (["*.json", "sub/*"], ["tokenizer.*"], ["config.json", "sub/deep/notes.txt"]),
    (["*.xyz"], None, []),
])
def test_include_exclude(hub: FakeHub, include: list[str] | None, exclude: list[str] | None,
                         expected: list[str]) -> None:
    hub.add_repo("org/model", FILES)
    listing = dm.list_files("org/model", "model", "main", hub.url, None, include, exclude)
    assert sorted(f.path for f in listing.files) == expected


def test_unsafe_names_are_refused_with_a_reason(hub: FakeHub) -> None:
    hub.add_repo("org/evil", {"good.txt": b"ok", "../evil.txt": b"x", "/abs.txt": b"x"})
    listing = dm.list_files("org/evil", "model", "main", hub.url, None)
    assert [f.path for f in listing.files] == ["good.txt"]
    assert sorted(name for name, _ in listing.refused) == ["../evil.txt", "/abs.txt"]
    assert all(why for _, why in listing.refused)


# ================================================================ the Hub's errors


def test_unknown_repo(hub: FakeHub) -> None:
    err = hub_error(hub.url, repo_id="nobody/nothing")
    assert type(err) is HubError and err.exit_status == ExitStatus.ERROR
    assert str(err) == f"model nobody/nothing not found at {hub.url}"
    assert "--dataset" in (err.hint or "") and "HF_TOKEN" in (err.hint or "")


def test_unknown_dataset_with_a_token(hub: FakeHub) -> None:
    hub.add_token(TOKEN)
    err = hub_error(hub.url, repo_id="nobody/nothing", repo_type="dataset", token=TOKEN)
    assert str(err) == f"dataset nobody/nothing not found at {hub.url}"
    assert "--dataset" not in (err.hint or "") and "your token can read it" in (err.hint or "")


def test_private_repo_without_token_looks_unknown(hub: FakeHub) -> None:
    hub.add_repo("org/private", FILES, private=True)
    err = hub_error(hub.url, repo_id="org/private")
    assert type(err) is HubError and "not found" in str(err) and "HF_TOKEN" in (err.hint or "")


def test_gated_repo_without_token(hub: FakeHub) -> None:
    hub.add_repo("org/gated", FILES, gated=True)
    err = hub_error(hub.url, repo_id="org/gated")
    assert type(err) is HubError and err.exit_status == ExitStatus.ERROR
    assert str(err) == "model org/gated is gated: a token is needed"
    assert "HF_TOKEN" in (err.hint or "") and "hf auth login" in (err.hint or "")


def test_gated_repo_with_a_token_that_has_no_access(hub: FakeHub) -> None:
    hub.add_repo("org/gated", FILES, gated=True)
    hub.add_token("hf_other", user="bob", access=set())
    err = hub_error(hub.url, repo_id="org/gated", token="hf_other")
    assert str(err) == "model org/gated is gated and your token has no access to it"
    assert f"{hub.url}/org/gated" in (err.hint or "")


def test_gated_repo_with_access_lists(hub: FakeHub) -> None:
    hub.add_repo("org/gated", FILES, gated=True)
    hub.add_token(TOKEN, access={"org/gated"})
    assert len(dm.list_files("org/gated", "model", "main", hub.url, TOKEN).files) == len(FILES)


def test_unknown_revision(hub: FakeHub) -> None:
    hub.add_repo("org/model", FILES)
    err = hub_error(hub.url, revision="v9")
    assert type(err) is HubError and str(err) == "revision 'v9' not found in model org/model"
    assert "--revision" in (err.hint or "")


def test_a_token_the_hub_does_not_know(hub: FakeHub) -> None:
    hub.add_repo("org/model", FILES)
    err = hub_error(hub.url, token="hf_wrong")
    assert type(err) is HubError and "refused the token" in str(err)


def test_a_name_huggingface_hub_refuses_is_a_usage_error(hub: FakeHub) -> None:
    err = hub_error(hub.url, resolve_only=True, repo_id="bad name!", repo_type="dataset")
    assert type(err) is UsageError and err.exit_status == ExitStatus.USAGE
    assert str(err).startswith("invalid repo id or revision") and "\n" not in str(err)
    assert (err.hint or "").endswith("--dataset")


def test_unreachable_endpoint() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    err = hub_error(url)
    assert type(err) is HubError and err.exit_status == ExitStatus.ERROR
    assert str(err).startswith(f"cannot reach {url}: ") and "--endpoint" in (err.hint or "")
    assert err.__cause__ is not None                    # the log's traceback shows the original


class _Stub(BaseHTTPRequestHandler):
    """An endpoint that answers every GET with the class's status and body."""

    status, body = 500, b'{"error": "boom"}'

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status,body,message,hint", [
    (500, b'{"error": "boom"}', "answered an error for model org/model", "try again later"),
    (503, b"", "answered an error for model org/model", "try again later"),
    (200, b"<html>a login page</html>", "unexpected answer from", None),
    (200, b'{"id": "org/model"}', "gave no commit for org/model@main", "--endpoint"),
])
def test_an_endpoint_that_is_not_a_hub(stub: str, monkeypatch: pytest.MonkeyPatch, status: int,
                                       body: bytes, message: str, hint: str | None) -> None:
    monkeypatch.setattr(_Stub, "status", status)
    monkeypatch.setattr(_Stub, "body", body)
    err = hub_error(stub, resolve_only=True)
    assert type(err) is HubError and message in str(err) and stub in str(err)
    assert err.hint is None if hint is None else hint in (err.hint or "")


@pytest.mark.parametrize("exc", [UsageError("mine"), KeyboardInterrupt()])
def test_our_errors_and_ctrl_c_pass_through(exc: BaseException) -> None:
    with pytest.raises(type(exc)) as info:
        with dm._hub_errors("org/model", "model", "main", "http://h", None):
            raise exc
    assert info.value is exc


# ================================================================ the registry


def test_register_and_load(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/model", FILES)
    listing = dm.list_files("org/model", "model", "main", hub.url, None)
    assert dm.load_registry(tmp_path) == {}              # none yet: empty, not an error
    entry = dm.register(tmp_path, listing, description="tiny")
    again = dm.register(tmp_path, listing)               # a refresh keeps the description
    assert again["description"] == "tiny" and again["added_at"] == entry["added_at"]
    saved = dm.load_registry(tmp_path)["model:org/model"]
    assert (saved["commit"], saved["file_count"], saved["total_size"]) == \
        (listing.commit, len(FILES), listing.total_size)


def test_a_corrupt_registry_is_an_error_with_the_way_out(tmp_path: Path) -> None:
    dm.registry_path(tmp_path).write_text("{oops")
    with pytest.raises(MetadataError) as info:
        dm.load_registry(tmp_path)
    assert "datasets.json" in str(info.value) and "fix-progress" in (info.value.hint or "")
    assert not dm.registry_ok(tmp_path)
    task = {"id": "task_001", "repo_id": "org/model", "repo_type": "model", "revision": "main",
            "commit": "c0ffee", "files_total": 3, "bytes_total": 10}
    tasks = [Task.from_json(t, "tasks.json") for t in (task, {"id": "task_002"})]
    assert dm.rebuild_registry(tmp_path, tasks) == 1
    assert dm.registry_ok(tmp_path)
    assert (tmp_path / "datasets.json.corrupt").read_text() == "{oops"
    assert json.loads(dm.registry_path(tmp_path).read_text())["datasets"]["model:org/model"][
        "commit"] == "c0ffee"
