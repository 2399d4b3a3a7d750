"""http_pool: kept-alive connections shared by threads, stale ones replaced, proxies and
tunnels as the environment says."""
from __future__ import annotations

import base64
import http.client
import socket
import threading
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from http_pool import Pool
from tests.fakehub import FakeHub

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
              "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


class Recorder:
    """A listener on 127.0.0.1 that records the request head of each connection and answers
    `reply` (then closes the connection)."""

    def __init__(self, reply: bytes) -> None:
        self.reply, self.heads = reply, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                self.heads.append(head.decode("latin-1"))
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    yield r
    r.close()


def test_threads_share_kept_alive_connections(hub: FakeHub) -> None:
    hub.add_repo("org/m", {"a.txt": b"x" * 1000})
    pool = Pool(5, 5)
    url = f"{hub.url}/api/models/org/m"

    def get() -> None:
        with pool.request("GET", url, {}) as resp:
            assert resp.status_code == 200 and resp.read1(1 << 20)
            while resp.read1(1 << 20):
                pass

    for _ in range(3):
        workers = [threading.Thread(target=get) for _ in range(4)]
        [w.start() for w in workers]
        [w.join() for w in workers]
    assert pool.made <= 4                       # 12 requests, at most 4 at once
    assert sum(len(v) for v in pool._idle.values()) == pool.made


def test_a_connection_the_server_closed_while_idle_is_replaced(hub: FakeHub) -> None:
    hub.add_repo("org/m", {"a.txt": b"x"})
    pool = Pool(5, 5)
    url = f"{hub.url}/api/models/org/m"
    with pool.request("GET", url, {}) as resp:
        while resp.read1(1 << 20):
            pass
    [conn] = [c for idle in pool._idle.values() for c in idle]
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)        # as a server's idle timeout would
    with pool.request("GET", url, {}) as resp:
        assert resp.status_code == 200
    assert pool.made == 2


def test_an_unread_big_body_closes_its_connection(hub: FakeHub) -> None:
    hub.add_repo("org/m", {"big.safetensors": b"y" * 500_000}, lfs=lambda path, size: True)
    pool = Pool(5, 5)
    with pool.request("GET", f"{hub.url}/org/m/resolve/main/big.safetensors", {}) as hop:
        assert hop.status_code == 302           # a small body: read, the connection kept
        cdn = hop.headers["Location"]
    with pool.request("GET", cdn, {}) as resp:
        assert resp.status_code == 200 and resp.read1(10)     # the rest is left unread
    ports = [key[2] for key, idle in pool._idle.items() if idle]
    assert ports == [urlsplit(hub.url).port], ports           # the CDN's was closed


def test_http_through_a_proxy_sends_the_absolute_url_and_its_credentials(
        monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://ann:s3%40cr@127.0.0.1:{recorder.port}")
    with Pool(5, 5).request("GET", "http://files.example/a/b?x=1", {}) as resp:
        assert resp.status_code == 200
    head = recorder.heads[0]
    assert head.startswith("GET http://files.example/a/b?x=1 HTTP/1.1\r\n"), head
    auth = base64.b64encode(b"ann:s3@cr").decode()
    assert f"Proxy-Authorization: Basic {auth}" in head


def test_https_through_a_proxy_opens_a_tunnel(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(b"HTTP/1.1 200 Connection established\r\n\r\n")   # then closes: no TLS
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://ann:pw@127.0.0.1:{rec.port}")
        with pytest.raises((OSError, http.client.HTTPException)):
            Pool(5, 5).request("GET", "https://cdn.example:8443/f", {})
        head = rec.heads[0]
        assert head.startswith("CONNECT cdn.example:8443 HTTP/1."), head
        assert "Proxy-Authorization: Basic " + base64.b64encode(b"ann:pw").decode() in head
    finally:
        rec.close()


def test_no_proxy_goes_direct(monkeypatch: pytest.MonkeyPatch, hub: FakeHub,
                              recorder: Recorder) -> None:
    hub.add_repo("org/m", {"a.txt": b"x"})
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{recorder.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with Pool(5, 5).request("GET", f"{hub.url}/api/models/org/m", {}) as resp:
        assert resp.status_code == 200
    assert recorder.heads == []


def test_a_proxy_it_cannot_speak_to_is_refused_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(http.client.InvalidURL, match="unsupported proxy scheme socks5"):
        Pool(5, 5).request("GET", "http://files.example/a", {})


def test_a_connect_timeout_is_told_apart_from_a_stall() -> None:
    from http_pool import ConnectTimeout
    server = socket.create_server(("127.0.0.1", 0))
    try:                                        # accepts, never answers: a read timeout
        with pytest.raises(TimeoutError) as info:
            Pool(5, 0.3).request("GET", f"http://127.0.0.1:{server.getsockname()[1]}/", {})
        assert not isinstance(info.value, ConnectTimeout)
    finally:
        server.close()
