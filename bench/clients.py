"""HTTP clients alone on many small files: `python -m bench.clients [--jobs 32] [--count 3000]`.

Why the python transport uses http.client (http_pool.py): the same GETs (the hub's redirect,
then the file), each body written to a file and hashed, in N threads, through requests,
urllib3 and http.client, against the fake Hub with 20 ms before each response. Nothing of the
tool runs: this is each client's own cost. Measured idle, 3,000 files at 32 threads: requests 12.2 /
11.8 s, urllib3 6.7 / 7.1 s, http.client 4.6 / 5.4 s (32 curls: 4.3-4.5 s in bench.run).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from bench.measure import check_tree
from bench.scenarios import small_files
from tests.fakehub import FakeHub

Fetch = Callable[[str], Iterable[bytes]]      # a URL -> its body in chunks (redirects followed)


def via_requests() -> Fetch:
    import requests
    local = threading.local()

    def fetch(url: str) -> Iterator[bytes]:
        s = local.__dict__.setdefault("s", requests.Session())
        r = s.get(url, stream=True, allow_redirects=False, timeout=30)
        if r.is_redirect:
            r.close()
            r = s.get(urljoin(url, r.headers["Location"]), stream=True, timeout=30)
        with r:
            yield from r.iter_content(1 << 20)
    return fetch


def via_urllib3() -> Fetch:
    import urllib3
    pool = urllib3.PoolManager(maxsize=64)

    def fetch(url: str) -> Iterator[bytes]:
        r = pool.request("GET", url, preload_content=False, redirect=False, retries=False,
                         timeout=30)
        if r.status in (301, 302, 307, 308):
            r.drain_conn()
            r.release_conn()
            r = pool.request("GET", urljoin(url, r.headers["Location"]), preload_content=False,
                             redirect=False, retries=False, timeout=30)
        yield from r.stream(1 << 20)
        r.release_conn()
    return fetch


def via_http_client() -> Fetch:
    import http.client
    local = threading.local()

    def get(url: str) -> http.client.HTTPResponse:
        conns = local.__dict__.setdefault("conns", {})
        u = urlsplit(url)
        conn = conns.get(u.netloc) or conns.setdefault(
            u.netloc, http.client.HTTPConnection(u.netloc, timeout=30))
        conn.request("GET", f"{u.path}?{u.query}" if u.query else u.path,
                     headers={"Accept-Encoding": "identity"})
        return conn.getresponse()

    def fetch(url: str) -> Iterator[bytes]:
        r = get(url)
        if r.status in (301, 302, 307, 308):
            r.read()
            r = get(urljoin(url, r.getheader("Location") or ""))
        while chunk := r.read1(1 << 20):
            yield chunk
        r.close()
    return fetch


def run(fetch: Fetch, base: str, paths: list[str], out: str, jobs: int) -> float:
    todo = iter(paths)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                path = next(todo, None)
            if path is None:
                return
            dst = os.path.join(out, path)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            h = hashlib.sha256()
            with open(dst + ".part", "wb") as f:
                for chunk in fetch(f"{base}/{path}"):
                    f.write(chunk)
                    h.update(chunk)
            os.replace(dst + ".part", dst)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--count", type=int, default=3000)
    args = p.parse_args()
    files = small_files(args.count)
    bad = 0
    with FakeHub() as hub:
        hub.add_repo("bench/clients", files,
                     lfs=lambda path, size: path.endswith((".parquet", ".safetensors")))
        expected = {path: hub.file_info("bench/clients", path).sha256 for path in files}
        hub.latency = 0.02
        for name, make in (("requests", via_requests), ("urllib3", via_urllib3),
                           ("http.client", via_http_client)):
            with tempfile.TemporaryDirectory(prefix="hfdl-clients-") as out:
                wall = run(make(), f"{hub.url}/bench/clients/resolve/main", list(files), out,
                           args.jobs)
                problem = check_tree(Path(out), expected)
            bad += problem is not None
            print(f"{name:12} {args.count} files, {args.jobs} threads: {wall:6.2f} s"
                  f"{'' if problem is None else '  BYTES DIFFER: ' + problem}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
