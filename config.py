"""The effective settings and where each came from: flag > environment > default.

The token is never stored here: only where it would come from (see `token_source`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from hub_http import ApiPolicy, Timeouts
from utils import UsageError, parse_size

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_MIRROR = "https://hf-mirror.com"
# The data folders default to the ones beside main.py (this flat layout keeps config.py there
# too), not the working folder: a cron job started from $HOME finds the tasks a shell started.
HERE = Path(__file__).resolve().parent
# The Hub's CDN refuses a single GET of more than 50 GB; ranged requests work.
DEFAULT_MAX_SINGLE_GET = 50 * 10**9


@dataclass(frozen=True)
class Setting:
    name: str
    env: str | None
    default: Any
    convert: Callable[[str], Any] = str
    doc: str = ""


def _path(value: str | Path) -> Path:
    return Path(os.path.abspath(Path(value).expanduser()))


def _endpoint(value: str) -> str:
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise UsageError(f"invalid endpoint {value!r}", hint="use a URL such as https://hf-mirror.com")
    return value


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number <= 100:
        raise UsageError(f"invalid percentage {value!r}", hint="use a number between 1 and 100")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < float("inf"):
        raise UsageError(f"invalid number of seconds {value!r}", hint="use a positive number such as 1.5")
    return number


def _timeouts(value: str) -> Timeouts:
    """"SEC" (connect and read) or "CONNECT,READ"."""
    parts = str(value).split(",")
    try:
        numbers = [_seconds(v.strip()) for v in parts]
    except UsageError:
        numbers = []
    if len(numbers) not in (1, 2):
        raise UsageError(f"invalid timeout {value!r}",
                         hint="use seconds, e.g. 30, or CONNECT,READ such as 10,60")
    return Timeouts(numbers[0], numbers[-1])


def _bool(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _candidates(value: str) -> tuple[str, ...]:
    return tuple(_endpoint(v) for v in str(value).split(",") if v.strip())


def _hf_cache(value: str) -> str:
    """"" or 0/off: no cache mode; 1/on: the cache huggingface_hub uses (HF_HUB_CACHE, else
    HF_HOME/hub); anything else: that folder."""
    text = str(value).strip()
    if text.lower() in ("", "0", "false", "no", "off"):
        return ""
    if text.lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import constants
        text = constants.HF_HUB_CACHE
    return os.path.abspath(os.path.expanduser(text))


SETTINGS: tuple[Setting, ...] = (
    Setting("metadata_dir", "METADATA_DIR", HERE / "metadata", _path, "task and dataset records"),
    Setting("downloads_dir", "DOWNLOADS_DIR", HERE / "downloads", _path,
            "where repos are downloaded"),
    Setting("logs_dir", "LOGS_DIR", HERE / "logs", _path, "download.log and its rotations"),
    Setting("endpoint", "HF_ENDPOINT", DEFAULT_ENDPOINT, _endpoint, "the Hub or a mirror"),
    Setting("tool", "HFDL_TOOL", "auto", str, "aria2c, wget, python or auto"),
    Setting("disk_reserve", "HFDL_DISK_RESERVE", "1G", parse_size, "free space always kept"),
    Setting("disk_warn_percent", "HFDL_DISK_WARN_PERCENT", "90", _percent,
            "warn when the disk is this full"),
    Setting("no_mirror", "HFDL_NO_MIRROR", "0", _bool, "never switch to the mirror by itself"),
    Setting("mirror_candidates", "HFDL_MIRROR_CANDIDATES", f"{DEFAULT_ENDPOINT},{DEFAULT_MIRROR}",
            _candidates, "tried in order when no endpoint is configured"),
    Setting("max_single_get", "HFDL_MAX_SINGLE_GET", str(DEFAULT_MAX_SINGLE_GET), parse_size,
            "bigger files are fetched in ranges"),
    Setting("retry_base_delay", "HFDL_RETRY_BASE_DELAY", "1.0", _seconds,
            "seconds before the first retry (doubling after)"),
    Setting("api_timeout", "HFDL_API_TIMEOUT", "10,60", _timeouts,
            "Hub API calls: seconds to connect, to wait for an answer (CONNECT,READ or one)"),
    Setting("max_retry_wait", "HFDL_MAX_RETRY_WAIT", "600", _seconds,
            "the longest wait a 429's Retry-After may impose, in seconds"),
    Setting("hf_cache", "HFDL_HF_CACHE", "", _hf_cache,
            "download into the Hugging Face hub cache at this folder (1: huggingface_hub's)"),
    Setting("progress_interval", "HFDL_PROGRESS_INTERVAL", "5", _seconds,
            "seconds between progress lines when stderr is not a terminal"),
    Setting("log_interval", "HFDL_LOG_INTERVAL", "1", _seconds,
            "minutes between progress lines in download.log"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def _from_env(s: Setting, text: str) -> Any:
    """Convert an environment value; a bad one names its variable (the user may not know it
    is set)."""
    try:
        return s.convert(text)
    except UsageError as exc:
        raise UsageError(f"{exc} in {s.env}", hint=exc.hint) from None


class Config:
    """Resolved settings; `source(name)` tells where each value came from."""

    def __init__(self, flags: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._values: dict[str, tuple[Any, str]] = {}
        for s in SETTINGS:
            flag = (flags or {}).get(s.name)
            if flag is not None:
                value = s.convert(str(flag)) if isinstance(flag, (str, Path)) else flag
                self._values[s.name] = (value, "flag")
            elif s.env and environ.get(s.env):
                self._values[s.name] = (_from_env(s, environ[s.env]), f"env {s.env}")
            else:
                self._values[s.name] = (s.convert(s.default), "default")

    def get(self, name: str) -> Any:
        return self._values[name][0]

    def source(self, name: str) -> str:
        return self._values[name][1]

    def set(self, name: str, value: Any, source: str) -> None:
        self._values[name] = (value, source)

    @property
    def metadata_dir(self) -> Path:
        return self.get("metadata_dir")

    @property
    def downloads_dir(self) -> Path:
        return self.get("downloads_dir")

    @property
    def logs_dir(self) -> Path:
        return self.get("logs_dir")

    @property
    def endpoint(self) -> str:
        return self.get("endpoint")

    @property
    def endpoint_configured(self) -> bool:
        """True when the user chose the endpoint (so no mirror auto-detection)."""
        return self.source("endpoint") != "default"

    def api_policy(self) -> ApiPolicy:
        """How Hub API calls time out and retry (see hub_http)."""
        return ApiPolicy(timeouts=self.get("api_timeout"), base_delay=self.get("retry_base_delay"),
                         max_wait=self.get("max_retry_wait"))

    # Kept for scripts written against the seed README.
    def set_metadata_dir(self, path: str | Path) -> None:
        self.set("metadata_dir", _path(path), "set_metadata_dir()")

    def set_downloads_dir(self, path: str | Path) -> None:
        self.set("downloads_dir", _path(path), "set_downloads_dir()")

    def set_logs_dir(self, path: str | Path) -> None:
        self.set("logs_dir", _path(path), "set_logs_dir()")

    def rows(self) -> list[dict[str, str]]:
        """Every setting with its value and source, for `config`; never the token."""
        rows = []
        for s in SETTINGS:
            value, source = self._values[s.name]
            if isinstance(value, tuple):
                value = ",".join(value)
            if s.name == "hf_cache" and not value:
                value = "off"
            rows.append({"name": s.name, "value": str(value), "source": source,
                         "env": s.env or "", "doc": s.doc})
        rows.append({"name": "token", "value": token_source(), "source": "",
                     "env": "HF_TOKEN", "doc": "shown as its source only"})
        return rows


class _Check(Protocol):
    error: str | None


# Measures which candidates answer: (the first that did or None, the checks made), given the
# candidates and a timeout in seconds; system_monitor.pick_endpoint is the real one.
Probe = Callable[[list[str], float], "tuple[str | None, Sequence[_Check]]"]
PROBE_TIMEOUT = 5.0


WITHHELD = "auto-detected, without the token"     # the endpoint's source when the token stays home


def resolve_endpoint(cfg: Config, task_endpoint: str | None = None, *, probe: Probe,
                     has_token: bool = False) -> tuple[str, str | None]:
    """The endpoint to use, and a note for the user when it switched to a mirror by itself.

    A configured endpoint wins; then the one the task last ran with; else, unless no_mirror, the
    first of the mirror candidates that answers (mirror auto-detection), remembered in `cfg`.
    A token only goes to an endpoint the user named (or the first candidate): with a token, an
    endpoint chosen any other way is used without it (`token_allowed` says so)."""
    if cfg.endpoint_configured:
        return cfg.endpoint, None
    candidates = list(cfg.get("mirror_candidates"))
    if task_endpoint:
        if has_token and task_endpoint.rstrip("/") != candidates[0]:
            cfg.set("endpoint", task_endpoint, WITHHELD)
            return task_endpoint, (f"the task ran on {task_endpoint}, which you did not name: "
                                   f"your token is not sent there (name it with --endpoint "
                                   f"{task_endpoint} to send it)")
        return task_endpoint, None
    if cfg.get("no_mirror"):
        return candidates[0], None        # the primary endpoint, never switched away from
    chosen, checks = probe(candidates, PROBE_TIMEOUT)
    if chosen is None:
        return candidates[0], None
    note = None
    source = "auto-detected"
    if chosen != candidates[0]:
        note = (f"{candidates[0]} did not answer ({checks[0].error}); using the mirror {chosen} "
                f"(set HF_ENDPOINT or --endpoint to choose, --no-mirror to turn this off)")
        if has_token:
            source = WITHHELD
            note += (f"; your token is not sent to a mirror you did not name (name it with "
                     f"--endpoint {chosen} to send it)")
    cfg.set("endpoint", chosen, source)
    return chosen, note


def token_allowed(cfg: Config) -> bool:
    """False when the endpoint was picked by auto-detection and the token must stay home."""
    return cfg.source("endpoint") != WITHHELD


def token_source() -> str:
    """Where the token would come from, without reading it into anything kept."""
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN environment variable"
    path = _token_path()
    if path.is_file() and path.stat().st_size > 0:
        return f"saved by 'hf auth login' ({path})"
    return "none (public repos only)"


def has_token() -> bool:
    """Whether a token is set (cheap: huggingface_hub is not imported)."""
    return not token_source().startswith("none")


def _token_path() -> Path:
    if os.environ.get("HF_TOKEN_PATH"):
        return Path(os.environ["HF_TOKEN_PATH"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "token"


_config: Config | None = None


def get_config() -> Config:
    """The process-wide settings (created from the environment on first use)."""
    global _config
    if _config is None:
        _config = Config()
    return _config


def load_config(flags: Mapping[str, Any] | None = None) -> Config:
    """Build the settings from flags and the environment and make them process-wide."""
    global _config
    _config = Config(flags)
    return _config

