"""The token and other secrets stay ours (issue 10, points 1-6): the tools never see the token,
the aria2c RPC port is checked before its secret is sent, no secret file outlives a kill -9,
logs are private and hold no signed link, and redirects never carry the token off the endpoint.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fakehub import Content, FakeHub
from tests.helpers import Cli, assert_same_tree, tool_processes, wait_for

TOKEN = "hf_TESTtokenDoNotLeak0123456789"


def gated(hub: FakeHub, files: dict | None = None) -> dict:
    """org/gated with an LFS file (served by the CDN) and a regular one (served by the hub)."""
    files = files or {"w.bin": Content(400_000, 11), "config.json": b"{}"}
    hub.add_repo("org/gated", files, gated=True)
    hub.add_token(TOKEN, access={"org/gated"})
    return files


def sent_by_python(headers: dict[str, str]) -> bool:
    """Our http_pool says `keep-alive` and no Want-Digest; wget says `Keep-Alive`, aria2c sends
    Want-Digest and no Connection header."""
    return headers.get("connection") == "keep-alive" and "want-digest" not in headers


class Listener:
    """A second origin standing in for a hostile host: records every request, answers 404 (or
    a 302 to `bounce`)."""

    def __init__(self, bounce: str | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                outer.requests.append((self.command, self.path,
                                       {k.lower(): v for k, v in self.headers.items()}))
                if outer.bounce:
                    self.send_response(302)
                    self.send_header("Location", outer.bounce)
                else:
                    self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _any

            def log_message(self, *_a: object) -> None:
                pass

        self.bounce = bounce
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def with_token(self) -> list[str]:
        return [path for _m, path, h in self.requests if "authorization" in h]


@pytest.fixture
def evil() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


# ================================================================ 1. the tools never see the token

@pytest.mark.parametrize("tool", ["aria2c", "wget"])
def test_tools_never_get_the_token(cli: Cli, hub: FakeHub, tool: str) -> None:
    files = gated(hub)
    r = cli("download", "org/gated", "--tool", tool, env={"HF_TOKEN": TOKEN})
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "org--gated", files)
    with_token = [rec for rec in hub.records() if "authorization" in rec.headers]
    assert with_token, "the token was never used"
    # the API calls come from our own process (hub_http, urllib: "Connection: close"); the tools
    # fetch files only
    files_with_token = [rec for rec in with_token if rec.kind != "api"]
    assert all(sent_by_python(rec.headers) for rec in files_with_token), \
        [(rec.path, rec.headers) for rec in files_with_token if not sent_by_python(rec.headers)]
    assert any(rec.kind == "api" for rec in with_token)
    assert hub.count(server="cdn") > 0          # the LFS file still went through the tool
    log_text = (cli.root / "logs" / "download.log").read_text()
    assert "1 files that need the token went through python" in log_text


def test_aria2c_rpc_secret_is_not_sent_to_a_stranger_on_its_port(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tools
    from utils import ToolError
    got: list[bytes] = []
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", 0))
    stranger.listen(8)
    port = stranger.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = stranger.accept()
                with conn:
                    conn.settimeout(1)
                    with contextlib.suppress(OSError):
                        got.append(conn.recv(4096))

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(tools, "_free_port", lambda: port)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tools.tempfile, "tempdir", None)
    children = tools.ChildSet()
    try:
        with pytest.raises(ToolError):
            tools.Aria2Daemon(children, stall_timeout=10, jobs=1)
    finally:
        children.kill_all()
        stranger.close()
    assert got == [], got
    assert list(tmp_path.iterdir()) == []


# ================================================================ 2. auto-detected mirror

def test_auto_detected_mirror_never_gets_the_token(cli: Cli, hub: FakeHub) -> None:
    hub.add_repo("gpt2", {"config.json": b"{}"})
    gated(hub)
    guard, down = socket.socket(), socket.socket()
    for s in (guard, down):
        s.bind(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{guard.getsockname()[1]}"      # nothing may leave 127.0.0.1
    first = f"http://127.0.0.1:{down.getsockname()[1]}"
    del cli.env["HF_ENDPOINT"]
    cli.env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, NO_PROXY="127.0.0.1,localhost",
                   HFDL_MIRROR_CANDIDATES=f"{first},{hub.url}", HF_TOKEN=TOKEN)
    try:
        r = cli("download", "gpt2", "--tool", "python")
        assert r.code == 0, r.text
        assert "your token is not sent" in r.err and f"--endpoint {hub.url}" in r.err, r.err
        r = cli("download", "org/gated", "--tool", "python")
    finally:
        guard.close()
        down.close()
    assert r.code == 1, r.text
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "gated" in errors[0], r.err
    assert f"hint: your token was not sent to {hub.url}" in r.err
    assert f"--endpoint {hub.url}" in r.err
    assert not [rec.path for rec in hub.records() if "authorization" in rec.headers]
    # named, it gets the token
    r = cli("download", "org/gated", "--tool", "python", "--endpoint", hub.url)
    assert r.code == 0, r.text


def test_resolve_endpoint_withholds_the_token_from_a_mirror() -> None:
    import config

    class Check:
        error = "timed out"

    cfg = config.Config({}, environ={"HFDL_MIRROR_CANDIDATES": "http://a,http://b"})
    probe = lambda cands, timeout: ("http://b", [Check()])      # noqa: E731
    endpoint, note = config.resolve_endpoint(cfg, probe=probe, has_token=True)
    assert endpoint == "http://b" and "--endpoint http://b" in (note or "")
    assert not config.token_allowed(cfg)
    cfg = config.Config({}, environ={"HFDL_MIRROR_CANDIDATES": "http://a,http://b"})
    assert config.resolve_endpoint(cfg, "http://b", probe=probe, has_token=True)[0] == "http://b"
    assert not config.token_allowed(cfg)
    cfg = config.Config({}, environ={"HFDL_MIRROR_CANDIDATES": "http://a,http://b"})
    config.resolve_endpoint(cfg, probe=probe, has_token=False)
    assert config.token_allowed(cfg)


# ================================================================ 3. nothing secret left on disk

def test_kill_9_leaves_no_secret_and_the_next_run_cleans_dead_runs(cli: Cli, hub: FakeHub,
                                                                  tmp_path: Path) -> None:
    files = gated(hub, {"w.bin": Content(6_000_000, 12), "config.json": b"{}"})
    hub.bandwidth_per_conn = 500_000
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"HF_TOKEN": TOKEN, "TMPDIR": str(tmp)}
    proc = cli.popen("download", "org/gated", "--tool", "aria2c", "-x", "1", env=env)
    try:
        assert wait_for(lambda: bool(tool_processes(f"--stop-with-process={proc.pid}")) and
                        hub.bytes_served("w.bin") > 200_000, timeout=30), "aria2c never ran"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert wait_for(lambda: not tool_processes(f"--stop-with-process={proc.pid}"), timeout=10)
    for p in tmp.rglob("*"):
        if p.is_file():
            text = p.read_text(errors="replace")
            assert "rpc-secret" not in text and TOKEN not in text, p
    dead = subprocess.Popen(["true"])
    dead.wait()
    planted = tmp / f"hfdl-wget-{dead.pid}-abc123"
    planted.mkdir()
    (planted / "wgetrc").write_text("header = Authorization: Bearer x\n")
    hub.bandwidth_per_conn = None
    r = cli("download", "org/gated", "--tool", "aria2c", env=env)
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "org--gated", files)
    assert not planted.exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith("hfdl-")] == []


# ================================================================ 4. private logs, no signed links

@pytest.mark.parametrize("tool", ["aria2c", "wget", "python"])
def test_logs_are_private_and_hold_no_signed_link(cli: Cli, hub: FakeHub, tool: str) -> None:
    files = gated(hub)
    hub.add_fault("expire", "w.bin")          # an error that names the signed link
    r = cli("download", "org/gated", "--tool", tool, "-vv", env={"HF_TOKEN": TOKEN})
    assert r.code == 0, r.text
    assert_same_tree(cli.downloads / "org--gated", files)
    logs = cli.root / "logs"
    assert stat.S_IMODE(os.stat(logs).st_mode) == 0o700
    log = logs / "download.log"
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    texts = [log.read_text(), r.err] + [p.read_text(errors="replace")
                                        for p in cli.metadata.rglob("*") if p.is_file()]
    for text in texts:
        for needle in ("Signature", "Expires", "X-Amz", "Key-Pair-Id", TOKEN):
            assert needle not in text, needle
        assert not re.search(r"https?://\S*\?", text), text


def test_an_existing_log_becomes_private(cli: Cli, hub: FakeHub) -> None:
    hub.add_repo("gpt2", {"config.json": b"{}"})
    (cli.root / "logs").mkdir(mode=0o755)
    (cli.root / "logs" / "download.log").write_text("old\n")
    os.chmod(cli.root / "logs" / "download.log", 0o644)
    assert cli("download", "gpt2", "--tool", "python").code == 0
    assert stat.S_IMODE(os.stat(cli.root / "logs" / "download.log").st_mode) == 0o600


# ================================================================ 5. origin check

def test_redirect_with_a_backslash_never_carries_the_token(cli: Cli, hub: FakeHub,
                                                           evil: Listener) -> None:
    gated(hub)
    hub_port = hub.url.rsplit(":", 1)[1]
    # urlsplit reads the host as 127.0.0.1:<hub port>; urllib3 connects to the evil port
    hub.add_fault("redirect", "config.json", count=None, where="resolve", methods=("GET", "HEAD"),
                  location=f"http://127.0.0.1:{evil.port}\\@127.0.0.1:{hub_port}/x")
    r = cli("download", "org/gated", "--tool", "python", env={"HF_TOKEN": TOKEN})
    assert r.code == 3, r.text
    assert evil.with_token() == []
    assert "suspicious" in r.err


def test_a_chain_that_left_the_endpoint_never_gets_the_token_back(cli: Cli, hub: FakeHub) -> None:
    gated(hub)
    back = Listener(bounce=f"{hub.url}/came-back")
    try:
        hub.add_fault("redirect", "config.json", count=None, where="resolve",
                      methods=("GET", "HEAD"), location=f"http://127.0.0.1:{back.port}/away")
        r = cli("download", "org/gated", "--tool", "python", env={"HF_TOKEN": TOKEN})
    finally:
        back.close()
    assert r.code == 3, r.text
    assert back.with_token() == []
    came_back = hub.records(path_contains="/came-back")
    assert came_back and all("authorization" not in rec.headers for rec in came_back)


# ================================================================ 6. GET redirected elsewhere

@pytest.mark.parametrize("tool", ["aria2c", "wget", "python"])
def test_get_redirected_to_another_port_carries_no_token(cli: Cli, hub: FakeHub, evil: Listener,
                                                         tool: str) -> None:
    gated(hub)
    # HEAD answers on the endpoint; the GET of the bytes goes to another port of the same host
    hub.add_fault("redirect", "config.json", count=None, where="cdn", methods=("GET",),
                  location=f"http://127.0.0.1:{evil.port}/x")
    r = cli("download", "org/gated", "--tool", tool, env={"HF_TOKEN": TOKEN})
    assert r.code == 3, r.text
    assert evil.requests, "the redirect was not followed"
    assert evil.with_token() == []
