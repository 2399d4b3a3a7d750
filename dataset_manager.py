"""The Hub side: resolve a revision to a commit, list files, and the registry in datasets.json.

Hub API calls go straight over HTTP (hub_http): huggingface_hub's client took longer to import
than listing a 13-file repo, and kept an object per entry of the listing.
"""
from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import quote

from utils import (SCHEMA_VERSION, HFDError, HubError, MetadataError, UsageError, now_iso,
                   hub_name_problem, path_selected, read_json, safe_relpath,
                   write_json_atomic)

if TYPE_CHECKING:
    from task_manager import Task

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass(frozen=True, slots=True)      # slots: a 100k-file listing is 100k of these
class RemoteFile:
    """One file of a repo at one commit, as the tree listing gives it."""

    path: str
    size: int
    blob_id: str                 # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None = None    # LFS content hash

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def hash_kind(self) -> str:
        """sha256 for LFS files, the git blob sha1 for the others."""
        return "sha256" if self.lfs else "sha1"

    @property
    def expected_hash(self) -> str:
        return self.sha256 if self.sha256 else self.blob_id


@dataclass(frozen=True)
class Listing:
    repo_id: str
    repo_type: str
    revision: str
    commit: str
    files: list[RemoteFile]
    refused: list[tuple[str, str]] = field(default_factory=list)  # (name, why)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def file_url(endpoint: str, repo_id: str, repo_type: str, commit: str, path: str) -> str:
    """{endpoint}/[datasets/]{repo}/resolve/{commit}/{path}, quoted as huggingface_hub does."""
    return (f"{endpoint.rstrip('/')}/{_URL_PREFIX[repo_type]}{repo_id}/resolve/"
            f"{quote(commit, safe='')}/{quote(path, safe='/')}")


def repo_key(repo_id: str, repo_type: str) -> str:
    return f"{repo_type}:{repo_id}"


def validate_repo_id(repo_id: str) -> str:
    parts = repo_id.strip().strip("/").split("/")
    if not repo_id.strip() or len(parts) > 2 or any(not p or p in (".", "..") for p in parts):
        raise UsageError(f"invalid repo id {repo_id!r}",
                         hint="use NAME or ORG/NAME, e.g. gpt2 or databricks/databricks-dolly-15k")
    return "/".join(parts)


# ---------------------------------------------------------------- Hub access

_API_TYPE = {"model": "models", "dataset": "datasets", "space": "spaces"}


def _api_url(endpoint: str, repo_id: str, repo_type: str, what: str, revision: str) -> str:
    return (f"{endpoint.rstrip('/')}/api/{_API_TYPE[repo_type]}/{repo_id}/{what}/"
            f"{quote(revision, safe='')}")


def _get_json(url: str, token: str | None) -> tuple[Any, Any]:
    import config
    import hub_http
    return hub_http.get_json(url, token, config.get_config().api_policy())


def hub_token() -> str | None:
    """HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), else the token that 'hf auth login' saved, as
    huggingface_hub finds them; the library itself (~0.3 s to import) only when there may be
    more to it than the environment: a token file, OIDC, Colab."""
    import os
    if not os.environ.get("HF_OIDC_RESOURCE"):
        env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "")
        env = env.replace("\r", "").replace("\n", "").strip()
        if env:
            return env
        from huggingface_hub import constants       # light: paths from the environment
        if not os.path.exists(constants.HF_TOKEN_PATH) and "google.colab" not in sys.modules:
            return None
    from huggingface_hub import get_token
    try:
        return get_token()
    except Exception:  # a broken OIDC setup must not stop public downloads
        return None


def resolve_commit(repo_id: str, repo_type: str, revision: str, endpoint: str,
                   token: str | None) -> str:
    """Resolve a branch, tag or commit to the commit sha."""
    with _hub_errors(repo_id, repo_type, revision, endpoint, token):
        check_repo_id(repo_id)
        info, _ = _get_json(_api_url(endpoint, repo_id, repo_type, "revision", revision), token)
    sha = info.get("sha") if isinstance(info, dict) else None
    if not sha or not isinstance(sha, str):
        raise HubError(f"{endpoint} gave no commit for {repo_id}@{revision}",
                       hint="check that --endpoint points at a Hugging Face Hub or mirror")
    return sha


def list_files(repo_id: str, repo_type: str, revision: str, endpoint: str,
               token: str | None, include: Iterable[str] | None = None,
               exclude: Iterable[str] | None = None) -> Listing:
    """Resolve the revision once, then list the tree at that commit, page by page (each page
    turned into RemoteFiles at once: no per-entry objects of a client library are kept)."""
    import hub_http
    commit = resolve_commit(repo_id, repo_type, revision, endpoint, token)
    files: list[RemoteFile] = []
    refused: list[tuple[str, str]] = []
    url: str | None = _api_url(endpoint, repo_id, repo_type, "tree", commit) + \
        "?recursive=true&expand=false"
    with _hub_errors(repo_id, repo_type, revision, endpoint, token):
        while url:
            page, headers = _get_json(url, token)
            if not isinstance(page, list):
                raise ValueError(f"a tree page that is not a list ({type(page).__name__})")
            for entry in page:
                _add_entry(entry, files, refused)
            url = hub_http.next_page(headers, url)
    files = _refuse_file_folder_clashes(files, refused)
    files = [f for f in files if path_selected(f.path, include, exclude)]
    return Listing(repo_id, repo_type, revision, commit, files, refused)


def _add_entry(entry: Any, files: list[RemoteFile], refused: list[tuple[str, str]]) -> None:
    """One tree entry: a file becomes a RemoteFile, or is refused with the reason; folders
    are skipped."""
    if not isinstance(entry, dict) or entry.get("type") != "file":
        return
    name, size, oid, lfs = entry.get("path"), entry.get("size"), entry.get("oid"), entry.get("lfs")
    sha256 = lfs.get("oid") if isinstance(lfs, dict) else None
    if not isinstance(name, str) or not isinstance(oid, str) or not isinstance(size, int) \
            or isinstance(size, bool) or size < 0 or not (sha256 is None or isinstance(sha256, str)):
        raise ValueError(f"a tree entry without a name, size or hash: {str(entry)[:200]}")
    try:
        path = safe_relpath(name)
    except ValueError as exc:
        refused.append((name, str(exc)))
        return
    problem = hub_name_problem(path)
    if problem:
        refused.append((name, problem))
        return
    files.append(RemoteFile(path, size, oid, sha256))


_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b$")


class RepoIdError(ValueError):
    """A repo id huggingface_hub's validate_repo_id refuses (the same rules and words)."""


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") > 1:
        raise RepoIdError("Repo id must be in the form 'repo_name' or 'namespace/repo_name': "
                          f"'{repo_id}'. Use `repo_type` argument if needed.")
    if not _REPO_ID.match(repo_id):
        raise RepoIdError("Repo id must use alphanumeric chars, '-', '_' or '.'. The name cannot "
                          "start or end with '-' or '.' and the maximum length is 96: "
                          f"'{repo_id}'.")
    if "--" in repo_id or ".." in repo_id:
        raise RepoIdError(f"Cannot have -- or .. in repo_id: '{repo_id}'.")
    if repo_id.endswith(".git"):
        raise RepoIdError(f"Repo_id cannot end by '.git': '{repo_id}'.")


def _refuse_file_folder_clashes(files: list[RemoteFile],
                                refused: list[tuple[str, str]]) -> list[RemoteFile]:
    """A name that is both a file and a folder (`a` and `a/b`) cannot exist on a disk: the
    file is refused, the folder's files kept."""
    folders = {p for f in files for p in _parents(f.path)}
    for f in files:
        if f.path in folders:
            refused.append((f.path, "the repo also has a folder of that name"))
    return [f for f in files if f.path not in folders]


def _parents(path: str) -> Iterable[str]:
    parts = path.split("/")
    return ("/".join(parts[:i]) for i in range(1, len(parts)))


class _hub_errors:
    """Turn huggingface_hub and transport errors into one clear HubError."""

    def __init__(self, repo_id: str, repo_type: str, revision: str, endpoint: str,
                 token: str | None) -> None:
        self.repo_id, self.repo_type, self.revision = repo_id, repo_type, revision
        self.endpoint, self.token = endpoint, token

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Never swallows: our own errors, ^C and SIGTERM (main's Terminated) pass through
        # unchanged, the rest are translated.
        if exc is None or isinstance(exc, HFDError) or not isinstance(exc, Exception):
            return
        raise _translate(exc, self) from exc


def _translate(exc: BaseException, ctx: _hub_errors) -> HFDError:
    """As huggingface_hub's hf_raise_for_status reads the Hub's answer (X-Error-Code first)."""
    import hub_http
    what = f"{ctx.repo_type} {ctx.repo_id}"
    type_flag = {"model": "", "dataset": " --dataset", "space": " --repo-type space"}
    if isinstance(exc, hub_http.ApiError):
        if exc.code == "GatedRepo":
            if ctx.token:
                return HubError(f"{what} is gated and your token has no access to it",
                                hint=f"ask for access at {ctx.endpoint}/"
                                     f"{_URL_PREFIX[ctx.repo_type]}{ctx.repo_id}, then try again")
            return HubError(f"{what} is gated: a token is needed",
                            hint="accept its terms on the Hub, then set HF_TOKEN=hf_... "
                                 "or run 'hf auth login'")
        if exc.code == "RevisionNotFound":
            return HubError(f"revision {ctx.revision!r} not found in {what}",
                            hint="use a branch, tag or commit that exists (--revision)")
        if exc.code == "RepoNotFound" or (
                exc.status == 401 and exc.message != "Invalid credentials in Authorization header"):
            hint = ("check the name" + ("" if ctx.repo_type != "model" else
                                         "; for a dataset add --dataset") +
                    ("; if it is private, set HF_TOKEN or run 'hf auth login'" if not ctx.token
                     else "; if it is private, check that your token can read it"))
            return HubError(f"{what} not found at {ctx.endpoint}", hint=hint)
        if exc.status == 401:
            return HubError("the Hub refused the token (invalid credentials)",
                            hint="check HF_TOKEN or run 'hf auth login' again")
        return HubError(f"{ctx.endpoint} answered an error for {what}: {exc}",
                        hint="try again later, or use a mirror with --endpoint")
    if isinstance(exc, RepoIdError):
        return UsageError(f"invalid repo id or revision: {exc}".splitlines()[0],
                          hint="use NAME or ORG/NAME" + type_flag.get(ctx.repo_type, ""))
    if isinstance(exc, hub_http.ApiGaveUp) and exc.status is not None:
        return HubError(f"{ctx.endpoint} answered an error for {what}: {exc}",
                        hint="try again later, or use a mirror with --endpoint")
    if isinstance(exc, hub_http.ApiGaveUp):
        return HubError(f"cannot reach {ctx.endpoint}: {exc} (asking for {what})",
                        hint="check the network or proxy (HTTPS_PROXY), try again later, or use "
                             "another endpoint: --endpoint https://hf-mirror.com")
    if _is_transport_error(exc):
        return HubError(f"cannot reach {ctx.endpoint}: {_short(exc)}",
                        hint="check the network or proxy (HTTPS_PROXY), "
                             "or use a mirror: --endpoint https://hf-mirror.com")
    return HubError(f"unexpected answer from {ctx.endpoint}: {_short(exc)}")


def _is_transport_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return isinstance(exc, OSError) or mod.startswith(("httpx", "httpcore", "requests", "urllib3"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------- the registry

_registry_lock = threading.Lock()


def registry_path(metadata_dir: Path) -> Path:
    return Path(metadata_dir) / "datasets.json"


_REGISTRY_HINT = ("run 'python main.py fix-progress' to rebuild it from the tasks (the damaged "
                  "file is kept as datasets.json.corrupt)")


def load_registry(metadata_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = read_json(registry_path(metadata_dir),
                         default={"schema_version": SCHEMA_VERSION, "datasets": {}})
    except MetadataError as exc:
        raise MetadataError(str(exc), hint=_REGISTRY_HINT) from None
    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not all(isinstance(d, dict) for d in datasets.values()):
        raise MetadataError(f"metadata file {registry_path(metadata_dir)} has no valid "
                            f"'datasets' object", hint=_REGISTRY_HINT)
    return datasets


def register(metadata_dir: Path, listing: Listing, description: str | None = None) -> dict:
    """Add or refresh a repo in datasets.json; returns its entry."""
    from filelock import FileLock
    path = registry_path(metadata_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _registry_lock, FileLock(str(path) + ".lock"):
        datasets = load_registry(metadata_dir)
        key = repo_key(listing.repo_id, listing.repo_type)
        entry = datasets.get(key, {"added_at": now_iso(), "description": ""})
        entry.update({
            "repo_id": listing.repo_id, "repo_type": listing.repo_type,
            "revision": listing.revision, "commit": listing.commit,
            "file_count": len(listing.files), "total_size": listing.total_size,
            "updated_at": now_iso(),
        })
        if description is not None:
            entry["description"] = description
        datasets[key] = entry
        write_json_atomic(path, {"schema_version": SCHEMA_VERSION, "datasets": datasets})
    return entry


def registered_type(metadata_dir: Path, repo_id: str) -> str | None:
    """The type a repo was registered with (add-dataset, download), when only one type holds
    that name; None when it is not registered, or is under two types (then the default holds)."""
    if not registry_path(metadata_dir).exists():
        return None
    types = {d.get("repo_type") for d in load_registry(metadata_dir).values()
             if d.get("repo_id") == repo_id}
    only = types.pop() if len(types) == 1 else None
    return only if only in REPO_TYPES else None


def registry_ok(metadata_dir: Path) -> bool:
    try:
        load_registry(metadata_dir)
    except HFDError:
        return False
    return True


def rebuild_registry(metadata_dir: Path, tasks: Iterable[Task]) -> int:
    """fix-progress: a corrupt datasets.json is rebuilt from the repos of the tasks."""
    datasets: dict[str, dict[str, Any]] = {}
    for t in sorted(tasks, key=lambda t: t.id):
        if not t.repo_id or t.repo_type not in REPO_TYPES:
            continue
        datasets[repo_key(t.repo_id, t.repo_type)] = {
            "repo_id": t.repo_id, "repo_type": t.repo_type, "revision": t.revision,
            "commit": t.commit, "file_count": t.files_total,
            "total_size": t.bytes_total, "description": "",
            "added_at": t.created_at, "updated_at": now_iso()}
    path = registry_path(metadata_dir)
    if path.exists():
        path.replace(path.with_name(path.name + ".corrupt"))
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION, "datasets": datasets})
    return len(datasets)


def select_files(listing: Listing, names: list[str], include: Iterable[str],
                 exclude: Iterable[str]) -> tuple[tuple[str, ...], Listing]:
    """`download REPO FILE...`: the exact paths named (each must be in the listing; a misspelt
    one gets a suggestion), kept when --include/--exclude allow them. Returns them as
    root-anchored patterns (`/` + the escaped path) and the listing narrowed to them."""
    import dataclasses
    import difflib
    import glob
    include, exclude = tuple(include), tuple(exclude)
    present = {f.path for f in listing.files}
    refused = dict(listing.refused)
    for name in names:
        if name in refused:
            raise UsageError(f"{listing.repo_id} has a file {name!r} that cannot be saved: "
                             f"{refused[name]}")
        if name not in present:
            close = difflib.get_close_matches(name, sorted(present), n=1)
            raise UsageError(f"{listing.repo_id} has no file {name!r} at {listing.revision}",
                             hint=f"did you mean {close[0]}?" if close else
                             f"'python main.py download {listing.repo_id} --dry-run' lists the "
                             f"files")
    wanted = [f for f in dict.fromkeys(names) if path_selected(f, include, exclude)]
    if not wanted:
        raise UsageError("none of the files named matches the --include/--exclude filters",
                         hint="drop the filters, or name other files")
    anchored = tuple("/" + glob.escape(f) for f in wanted)
    kept = [f for f in listing.files if path_selected(f.path, anchored, exclude)]
    return anchored, dataclasses.replace(listing, files=kept, refused=[])

