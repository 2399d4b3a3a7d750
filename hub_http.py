"""The HTTP client huggingface_hub uses for our Hub API calls: connect and read timeouts on
every request, and retries with backoff (429 honouring a capped Retry-After, 5xx, network
errors), installed through the library's own hook, `huggingface_hub.set_client_factory`.

Also the cap on any server-asked wait (`capped_wait`), which file transfers share.
"""
from __future__ import annotations

import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import httpx2

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

    Not an httpx error on purpose: huggingface_hub's own backoff (on tree pages) must not
    retry what we already retried."""

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


def _client_class() -> type:
    import httpx2

    class HubClient(httpx2.Client):
        """Every request gets our timeouts (huggingface_hub passes timeout=None, meaning
        none) and is retried here; the last failure raises ApiGaveUp."""

        policy: ApiPolicy = ApiPolicy()

        def send(self, request: httpx2.Request, **kw: Any) -> httpx2.Response:  # type: ignore[override]
            p = self.policy
            t = p.timeouts
            request.extensions["timeout"] = httpx2.Timeout(
                t.read, connect=t.connect).as_dict()
            tries = 0
            while True:
                tries += 1
                try:
                    response = super().send(request, **kw)
                except httpx2.TransportError as exc:
                    why = _transport_reason(exc, t)
                    if tries >= p.tries:
                        raise ApiGaveUp(f"{why} ({tries} tries)") from exc
                    delay = _backoff(p, tries)
                else:
                    if response.status_code not in RETRY_STATUSES:
                        return response
                    response.close()
                    why = f"HTTP {response.status_code}"
                    if tries >= p.tries:
                        raise ApiGaveUp(f"{why} ({tries} tries)", response.status_code)
                    delay = _backoff(p, tries)
                    asked = retry_after_header(response.headers)
                    if response.status_code == 429:
                        delay, line = capped_wait(asked if asked is not None else 5.0,
                                                  p.max_wait)
                        log.warning("%s", line)
                log.info("API request %s %s failed (%s); retry %d of %d in %.1f s",
                         request.method, request.url.copy_with(query=None), why, tries,
                         p.tries - 1, delay)
                time.sleep(delay)     # SIGTERM / ^C interrupt it (their handlers raise)

    return HubClient


def _transport_reason(exc: BaseException, t: Timeouts) -> str:
    import httpx2
    if isinstance(exc, httpx2.ConnectTimeout):
        return f"no connection within {t.connect:g} s"
    if isinstance(exc, httpx2.TimeoutException):
        return f"no answer within {t.read:g} s"
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_installed: ApiPolicy | None = None
_lock = threading.Lock()


def install(policy: ApiPolicy) -> None:
    """Make huggingface_hub use a client with this policy (again only when it changed)."""
    global _installed
    with _lock:
        if _installed == policy:
            return
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import hf_request_event_hook
        cls = _client_class()

        def factory() -> Any:
            client = cls(event_hooks={"request": [hf_request_event_hook]},
                         follow_redirects=True)
            client.policy = policy
            return client

        set_client_factory(factory)
        _installed = policy
