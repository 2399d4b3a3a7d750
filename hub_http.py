"""Our Hub API calls, straight over HTTP (urllib: importing huggingface_hub and its client
costs more than listing a 10k-file repo): connect and read timeouts on every request, retries
with backoff (429 honouring a capped Retry-After, 5xx, network errors), Link-header paging.

Also the cap on any server-asked wait (`capped_wait`), which file transfers share.
"""
from __future__ import annotations

import functools
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

log = logging.getLogger("hfdl")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Timeouts:
    """Seconds to connect and to wait for each read; shown as "CONNECT,READ"."""

    connect: float
    read: float

    def __str__(self) -> str:
        return f"{self.connect:g},{self.read:g}"


@dataclass(frozen=True)
class ApiPolicy:
    timeouts: Timeouts = Timeouts(10.0, 60.0)
    tries: int = 4                  # the first try included
    base_delay: float = 1.0         # before the first retry, doubling after
    max_wait: float = 600.0         # the longest a Retry-After may make us wait


class ApiGaveUp(Exception):
    """An API request failed `tries` times (timeouts, network errors, 429 or 5xx).

    Not an OSError on purpose: nothing above must retry what was already retried."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status            # the last HTTP status, None after a network error


def _secs(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.1f}"


def capped_wait(asked: float, cap: float) -> tuple[float, str]:
    """The wait for a server that asked for `asked` seconds, and the line saying why."""
    if asked > cap:
        return cap, (f"rate limited by the Hub: waiting {_secs(cap)} s (Retry-After asked "
                     f"{_secs(asked)} s; capped)")
    return asked, f"rate limited by the Hub: waiting {_secs(asked)} s (as Retry-After asked)"


def retry_after_header(headers: Mapping[str, str]) -> float | None:
    """Retry-After, else the `t=` of the Hub's RateLimit header."""
    value = headers.get("Retry-After")
    if value and value.strip().isdigit():
        return float(value)
    match = re.search(r"\bt=(\d+)", headers.get("RateLimit", "") or "")
    return float(match.group(1)) if match else None


def _backoff(policy: ApiPolicy, tries: int) -> float:
    return min(60.0, policy.base_delay * 2 ** (tries - 1)) * random.uniform(0.5, 1.5)


class ApiError(Exception):
    """The Hub answered an API request with an error status that is not retried (4xx)."""

    def __init__(self, status: int, reason: str, code: str, message: str) -> None:
        super().__init__(f"{status} {reason}" + (f": {message}" if message else ""))
        self.status, self.code, self.message = status, code, message   # X-Error-Code, its text


def get_json(url: str, token: str | None, policy: ApiPolicy) -> tuple[Any, Mapping[str, str]]:
    """GET a Hub API URL and parse its JSON: our timeouts, retries with backoff (429 honouring
    a capped Retry-After, 5xx, network errors), redirects followed (the token only to the same
    origin), proxies from the environment. Raises ApiGaveUp, ApiError, or ValueError for a
    body that is not JSON."""
    import json
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, headers={"User-Agent": "hf-downloader",
                                                   "Accept-Encoding": "identity"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = _opener(policy.timeouts)
    tries = 0
    while True:
        tries += 1
        status: int | None = None
        headers: Any = None
        try:
            with opener.open(request, timeout=policy.timeouts.connect) as response:
                return json.loads(response.read()), response.headers
        except urllib.error.HTTPError as exc:
            status, headers = exc.code, exc.headers
            if status not in RETRY_STATUSES:
                raise _api_error(exc) from None
            why = f"HTTP {status}"
        except (OSError, http_client_errors()) as exc:
            why = _transport_reason(exc, policy.timeouts)
        if tries >= policy.tries:
            raise ApiGaveUp(f"{why} ({tries} tries)", status)
        delay = _backoff(policy, tries)
        if status == 429 and headers is not None:
            asked = retry_after_header(headers)
            delay, line = capped_wait(asked if asked is not None else 5.0, policy.max_wait)
            log.warning("%s", line)
        log.info("API request GET %s failed (%s); retry %d of %d in %.1f s",
                 url.split("?")[0], why, tries, policy.tries - 1, delay)
        time.sleep(delay)     # SIGTERM / ^C interrupt it (their handlers raise)


def next_page(headers: Mapping[str, str], url: str) -> str | None:
    """The `rel="next"` URL of a Link header (a tree listing's next page), made absolute."""
    from urllib.parse import urljoin
    for part in (headers.get("Link") or "").split(","):
        match = re.match(r'\s*<([^>]*)>(.*)', part)
        if match and re.search(r'\brel="?next"?', match.group(2)):
            return urljoin(url, match.group(1))
    return None


def http_client_errors() -> type[Exception]:
    import http.client
    return http.client.HTTPException       # a malformed answer (not an OSError)


def _api_error(exc: Any) -> ApiError:
    import json
    code = exc.headers.get("X-Error-Code") or ""
    message = exc.headers.get("X-Error-Message") or ""
    if not message:
        try:
            body = json.loads(exc.read(65536) or b"null")
            message = str(body.get("error") or "") if isinstance(body, dict) else ""
        except (OSError, ValueError):
            message = ""
    return ApiError(exc.code, str(exc.reason or ""), code, message)


def _transport_reason(exc: BaseException, t: Timeouts) -> str:
    import urllib.error
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, TimeoutError):
        return f"no connection within {t.connect:g} s"     # urllib wraps errors of the connect
    if isinstance(exc, TimeoutError):
        return f"no answer within {t.read:g} s"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    text = str(reason).strip().splitlines()
    return text[0][:200] if text else type(reason).__name__


_openers: dict[Timeouts, Any] = {}


def _opener(t: Timeouts) -> Any:
    """A urllib opener whose connections connect within t.connect and read within t.read,
    verify TLS like requests does (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, else certifi), and keep
    the token on same-origin redirects only."""
    import http.client
    import urllib.request
    from urllib.parse import urlsplit
    if t in _openers:
        return _openers[t]

    def timed(base: type) -> Any:
        class Timed(base):  # type: ignore[valid-type,misc]
            def connect(self) -> None:
                super().connect()
                self.sock.settimeout(t.read)        # connected: from now on, the read timeout
        return Timed

    def origin(url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return parts.scheme, parts.netloc

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(timed(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(timed(http.client.HTTPSConnection), req, context=tls_context())

    class Redirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                             newurl: str) -> Any:
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None and origin(new.full_url) != origin(req.full_url):
                new.remove_header("Authorization")
            return new

    _openers[t] = urllib.request.build_opener(Http, Https, Redirect)
    return _openers[t]


@functools.lru_cache(maxsize=1)
def tls_context() -> Any:
    """The TLS context, made on the first https request (loading the CAs takes ~30 ms)."""
    import os
    import ssl
    cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    if not cafile:
        import certifi
        cafile = certifi.where()
    return ssl.create_default_context(cafile=cafile)
