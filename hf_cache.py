"""The Hugging Face hub cache layout (`download --hf-cache`): where a repo's snapshot, blobs and
refs live, and turning the files of a finished download into blobs with relative symlinks.

A cache-mode task downloads into `<cache>/models--ORG--NAME/snapshots/<commit>/`. Its partials
live where huggingface_hub keeps its own (`blobs/<etag>.incomplete`, see partial.Partial), written
under huggingface_hub's blob lock; a checked file becomes `blobs/<etag>` (sha256 for LFS files,
the git blob sha1 for the others) and the snapshot gets a relative symlink to it. The names come
from huggingface_hub's own helpers, so the layout follows the library that transformers,
diffusers and vLLM load from.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from dataset_manager import RemoteFile
from partial import Partial
from utils import CACHE_REPO_PREFIXES, UnsafePathError, cache_repo_of, safe_join, safe_target

REPO_PREFIXES = CACHE_REPO_PREFIXES


def default_cache() -> Path:
    """The cache huggingface_hub itself uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache)."""
    from huggingface_hub import constants
    return Path(os.path.abspath(os.path.expanduser(constants.HF_HUB_CACHE)))


def repo_folder(cache: Path, repo_id: str, repo_type: str) -> Path:
    """<cache>/models--ORG--NAME (datasets--, spaces--), named by huggingface_hub."""
    from huggingface_hub.file_download import repo_folder_name
    return Path(cache) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def snapshot_dir(cache: Path, repo_id: str, repo_type: str, commit: str) -> Path:
    """The folder a cache-mode task downloads into: the snapshot of one commit."""
    return repo_folder(cache, repo_id, repo_type) / "snapshots" / commit


def is_snapshot(local_dir: Path) -> bool:
    """Is this task folder a snapshot of the hub cache (so its files become blobs + symlinks)?"""
    return cache_repo_of(Path(local_dir)) is not None


def blob_path(local_dir: Path, f: RemoteFile) -> Path:
    """blobs/<etag> of a snapshot's file (the etag the Hub sends: what huggingface_hub names
    blobs by)."""
    return Path(local_dir).parent.parent / "blobs" / f.expected_hash


def symlinks_supported(local_dir: Path) -> bool:
    """Whether the cache's filesystem takes symlinks (huggingface_hub's own probe, which also
    honours HF_HUB_DISABLE_SYMLINKS)."""
    return _symlinks_in(Path(local_dir).parent.parent)


def _symlinks_in(repo: Path) -> bool:
    from huggingface_hub.file_download import are_symlinks_supported
    return are_symlinks_supported(repo)


def write_ref(local_dir: Path, revision: str, commit: str, log: logging.Logger) -> None:
    """refs/<revision> holds the commit, when the revision is a name (as huggingface_hub does:
    nothing for the commit itself). Written once the snapshot is complete."""
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision
    try:
        _cache_commit_hash_for_specific_revision(str(Path(local_dir).parent.parent), revision,
                                                 commit)
    except (OSError, ValueError) as exc:
        log.warning("cannot write refs/%s in the cache: %s", revision, exc)


def _link(blob: Path, final: Path) -> None:
    """final -> relative path to blob, atomically (a temp name, then os.replace)."""
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.hfdl-link")
    os.symlink(os.path.relpath(blob, final.parent), tmp)
    try:
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def blob_lock(partial: Partial, stop: threading.Event,
              log: logging.Logger) -> Iterator[bool]:
    """Hold huggingface_hub's lock of the partial's blob (.locks/<repo folder>/<etag>.lock, the
    one hf_hub_download holds while it writes that blob), so two programs never write the same
    blob at once. Yields False if the run stops while another program holds it; a partial
    outside the hub cache needs no lock (yields True)."""
    if partial.lock is None:
        yield True
        return
    from filelock import FileLock, Timeout
    partial.lock.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(partial.lock), mode=0o664)      # group-writable, as huggingface_hub's
    said = False
    while not stop.is_set():
        try:
            lock.acquire(timeout=0.5)
        except Timeout:
            if not said:
                said = True
                log.info("%s: waiting for another program writing this blob (%s)",
                         partial.relpath, partial.lock)
            continue
        try:
            yield True
        finally:
            lock.release()
        return
    yield False


def link_blob(blob: Path, final: Path) -> None:
    """A checked blob into the snapshot: a relative symlink at `final`, or, where the
    filesystem has no symlinks, the blob moved there, as huggingface_hub does with a new blob."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if _symlinks_in(blob.parent.parent):
        _link(blob, final)
    else:
        os.replace(blob, final)


def _kind(path: Path) -> str:
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "absent"
    return "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"


def link_snapshot(files: Iterable[RemoteFile], done: set[str], local_dir: Path,
                  log: logging.Logger) -> int:
    """Make the snapshot point into blobs/: each completed file (`done`) still a regular file
    is moved to its blob and replaced by a symlink; each other file whose blob is already
    there with the right size gets its symlink (the run's adoption then checks its hash).
    Without symlink support (some network filesystems) files stay real files, as
    huggingface_hub leaves them. Returns how many links were made."""
    local_dir = Path(local_dir)
    if not symlinks_supported(local_dir):
        return _copy_shared(list(files), done, local_dir, log)
    files = list(files)
    _drop_stale_partials(files, local_dir)
    made = 0
    for f in files:
        try:
            final = safe_target(local_dir, f.path)
        except (UnsafePathError, ValueError):
            continue
        blob = blob_path(local_dir, f)
        kind = _kind(final)
        if kind == "file" and f.path in done:
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, blob)            # a file at its final name is whole and checked
        elif kind != "absent" or _size(blob) != f.size:
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        _link(blob, final)
        made += 1
    if made:
        log.info("%s: %d files linked to their blobs", local_dir, made)
    return made


def _drop_stale_partials(files: list[RemoteFile], local_dir: Path) -> None:
    """Our partials of blobs another program (hf_hub_download) has finished since: of no use."""
    blobs = local_dir.parent.parent / "blobs"
    try:
        names = {n[:-len(".incomplete")] for n in os.listdir(blobs) if n.endswith(".incomplete")}
    except OSError:
        return
    for f in files:
        if f.expected_hash in names and _size(blobs / f.expected_hash) == f.size:
            with contextlib.suppress(ValueError):
                Partial(local_dir, f.path, f.expected_hash).discard()


_WARNED: set[str] = set()


def _copy_shared(files: list[RemoteFile], done: set[str], local_dir: Path,
                 log: logging.Logger) -> int:
    """No symlinks here: the files stay real files in the snapshot, as huggingface_hub leaves
    them (no blobs/), and a file sharing its content with a finished one gets a copy of it."""
    cache = str(local_dir.parent.parent.parent)
    if cache not in _WARNED:
        _WARNED.add(cache)
        log.warning("%s: this filesystem has no symlinks: files are kept as real files in the "
                    "snapshot, as huggingface_hub does (revisions do not share their blobs)", cache)
    have: dict[str, str] = {}
    for f in files:
        if f.path in done and _kind(safe_join(local_dir, f.path)) == "file":
            have.setdefault(f.expected_hash, f.path)
    copied = 0
    for f in files:
        source = have.get(f.expected_hash)
        if f.path in done or source is None:
            continue
        try:
            final = safe_target(local_dir, f.path)
        except (UnsafePathError, ValueError):
            continue
        if _kind(final) != "absent":
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.hfdl-copy")
        shutil.copyfile(safe_join(local_dir, source), tmp)
        os.replace(tmp, final)
        copied += 1
    return copied


def _size(path: Path) -> int | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def unlink_unchecked(local_dir: Path, paths: Iterable[str]) -> None:
    """Links to blobs that failed their check (still to fetch): removed, so the download
    writes its own file there (nothing is written through a symlink)."""
    for path in paths:
        final = safe_join(Path(local_dir), path)
        if _kind(final) == "link":
            os.unlink(final)


def one_per_blob(files: Mapping[str, RemoteFile], todo: list[str]) -> list[str]:
    """The files to fetch when several share a blob: the first of each (the others are linked
    to it afterwards)."""
    seen: set[str] = set()
    first = []
    for path in todo:
        etag = files[path].expected_hash
        if etag not in seen:
            seen.add(etag)
            first.append(path)
    return first


# ---------------------------------------------------------------- hf download --local-dir

LOCAL_META_MARK = "hf_local_metadata.json"      # in the task folder: the commit last recorded


def local_metadata_path(local_dir: Path, path: str) -> Path:
    """.cache/huggingface/download/<path>.metadata, as huggingface_hub's
    get_local_download_paths names it (tests check they agree); computed here because that
    helper, and its writer, take a file lock per file: 0.6 ms each, a minute for 100,000 files."""
    return safe_join(Path(local_dir) / ".cache" / "huggingface" / "download", path + ".metadata")


def record_local_metadata(local_dir: Path, task_folder: Path, commit: str,
                          files: Mapping[str, RemoteFile], completed: list[str],
                          fresh: Iterable[str], log: logging.Logger) -> int:
    """Write the `.cache/huggingface/download/<path>.metadata` files `hf download --local-dir`
    keeps (commit, etag, timestamp; huggingface_hub's own writer), so that it and
    snapshot_download(local_dir=...) see our files as up to date and fetch nothing.

    `fresh` (files this run completed) are always recorded; all completed files present on
    disk when the commit differs from the one last recorded for the task (a new commit, or a
    task from before these files), so a finished resume costs nothing. Returns how many."""
    from huggingface_hub._local_folder import _huggingface_dir
    from utils import MetadataError, read_json, write_json_atomic
    mark = Path(task_folder) / LOCAL_META_MARK
    try:
        last = read_json(mark, default={}).get("commit")
    except MetadataError:       # unreadable: record everything once more
        last = None
    done = set(completed)
    paths = [p for p in fresh if p in done]
    if last != commit:
        paths = [p for p in completed if _size(safe_join(Path(local_dir), p)) is not None]
    written = 0
    try:
        if paths:
            _huggingface_dir(Path(local_dir))          # hf's folder, .gitignore, CACHEDIR.TAG
        made: set[Path] = set()
        stamp = time.time()          # after every file's last write: hf finds them unchanged
        for path in paths:
            meta = local_metadata_path(Path(local_dir), path)
            if meta.parent not in made:
                meta.parent.mkdir(parents=True, exist_ok=True)
                made.add(meta.parent)
            with open(meta, "w") as out:
                out.write(f"{commit}\n{files[path].expected_hash}\n{stamp}\n")
            written += 1
    except (OSError, ValueError) as exc:      # a convenience for hf: never fails a download
        log.warning("cannot write hf download's metadata in %s: %s", local_dir, exc)
    with contextlib.suppress(OSError):
        write_json_atomic(mark, {"schema_version": 1, "commit": commit})
    return written


def remove_local_metadata(local_dir: Path, paths: Iterable[str]) -> None:
    """Remove hf's metadata of files deleted from local_dir (clean --delete-files), and its
    folder once it only holds hf's bookkeeping (.gitignore, CACHEDIR.TAG)."""
    root = Path(local_dir) / ".cache" / "huggingface"
    for path in paths:
        meta = safe_join(root / "download", path + ".metadata")
        for p in (meta, meta.with_suffix(".lock")):
            with contextlib.suppress(OSError):
                safe_target(Path(local_dir), os.path.relpath(p, local_dir)).unlink()
    try:
        safe_target(Path(local_dir), ".cache/huggingface/download")
    except (UnsafePathError, ValueError):
        return
    for folder, _dirs, _files in os.walk(root / "download", topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    if os.path.lexists(root / "download"):
        return
    for name in (".gitignore", ".gitignore.lock", "CACHEDIR.TAG"):
        with contextlib.suppress(OSError):
            os.unlink(root / name)
    for empty in (root, root.parent):
        with contextlib.suppress(OSError):
            os.rmdir(empty)


# ---------------------------------------------------------------- clean --delete-files

def _links_into(folder: Path, blobs: Path, skip: Path) -> set[str]:
    """The blob names the other snapshots of a repo point to (`skip`: the one being removed)."""
    used: set[str] = set()
    for snap in (folder / "snapshots").iterdir() if (folder / "snapshots").is_dir() else ():
        if snap == skip:
            continue
        for dirpath, _dirs, names in os.walk(snap):
            for name in names:
                p = os.path.join(dirpath, name)
                if os.path.islink(p):
                    target = os.path.realpath(p)
                    if os.path.dirname(target) == os.path.realpath(blobs):
                        used.add(os.path.basename(target))
    return used


def delete_snapshot(local_dir: Path, files: Iterable[RemoteFile],
                    unchanged: Callable[[Path, RemoteFile], bool]) -> tuple[int, list[str]]:
    """clean --delete-files of a cache-mode task: its snapshot's links (and files, where the
    filesystem has no symlinks), then the blobs no other snapshot uses, the refs naming this
    commit, and the folders left empty. A blob (or file) changed since the download is kept
    and listed, as `unchanged` says. Returns (files removed, paths kept)."""
    local_dir = Path(local_dir)
    folder, blobs = local_dir.parent.parent, local_dir.parent.parent / "blobs"
    removed, kept, ours = 0, [], {}
    for f in files:
        path = safe_join(local_dir, f.path)
        kind = _kind(path)
        if kind == "link" and os.path.realpath(path) == os.path.realpath(blob_path(local_dir, f)):
            ours[f.expected_hash] = f
            os.unlink(path)
            removed += 1
        elif kind == "file" and unchanged(path, f):
            os.unlink(path)
            removed += 1
        elif kind != "absent":
            kept.append(f.path)
    used = _links_into(folder, blobs, local_dir)
    for etag, f in ours.items():
        blob = blobs / etag
        if etag in used or not os.path.lexists(blob):
            continue
        if unchanged(blob, f):
            os.unlink(blob)
        else:
            kept.append(f.path)
    commit = local_dir.name
    for ref_dir, _dirs, names in os.walk(folder / "refs"):
        for name in names:
            ref = Path(ref_dir) / name
            with contextlib.suppress(OSError):
                if ref.read_text().strip() == commit:
                    ref.unlink()
    for top in (local_dir, folder / "refs", blobs):
        for dirpath, _dirs, _names in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
    for empty in (folder / "snapshots", folder):
        with contextlib.suppress(OSError):
            os.rmdir(empty)
    return removed, kept
