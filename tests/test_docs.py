"""Docs are tests: every shell block of README.md and BATCH_DOWNLOAD_GUIDE.md runs against the fake Hub.

One item per command, id `DOC:LINE` (`DOC:LINE#2` for the second command of a line), in the docs'
order, in one scratch folder per document (its own metadata, downloads and logs folders). An item
run alone first replays the commands before it, so `pytest tests/test_docs.py -k 'README.md:146'`
works. How a block is split and what its markers mean: tests/docs_runner.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.docs_runner import Block, Command, DocError, expected_exit, extract_blocks, split_commands
from tests.fakehub import Content, FakeHub
from tests.helpers import ROOT, clean_env

DOCS = ("README.md", "BATCH_DOWNLOAD_GUIDE.md")
TOKEN = "hf_docs_token"  # HF_TOKEN of every command: meta-llama/Llama-3.1-8B is gated

# ---------------------------------------------------------------- the substitution table
# The docs name real repos, real sizes and real mount points; the test runs them against these.

# Real repo names -> the small fake repos the fake Hub serves under the same names.
REPOS: dict[str, dict[str, Any]] = {
    "gpt2": dict(files={"config.json": b'{"model_type": "gpt2"}', "tokenizer.json": b"{}", "vocab.json": b"{}",
                        "model.safetensors": Content(64_000, seed=1), "onnx/decoder_model.onnx": Content(20_000, seed=2)}),
    "test-model": dict(files={"config.json": b"{}", "model.safetensors": Content(10_000, seed=3)}),
    "databricks/databricks-dolly-15k": dict(repo_type="dataset", files={
        "README.md": b"# dolly\n", "databricks-dolly-15k.jsonl": b'{"instruction": "q", "response": "a"}\n' * 50}),
    "meta-llama/Llama-3.1-8B": dict(gated=True, files={
        "config.json": b"{}", "model-00001-of-00002.safetensors": Content(30_000, seed=4),
        "model-00002-of-00002.safetensors": Content(20_000, seed=5), "README.md": b"# llama\n",
        "original/params.json": b"{}", "original/consolidated.00.pth": Content(30_000, seed=6)}),
    "bigscience/bloom": dict(files={"config.json": b"{}", "model.safetensors": Content(50_000, seed=7)}),
    # 12 shards of 10 kB in 3 folders: `--available-space 10T` -> SIZES -> 3 batches of 4 shards.
    "big-org/corpus": dict(repo_type="dataset", files={
        "README.md": b"# corpus\n",
        **{f"data/part-{i // 4:02d}/shard-{i:05d}.parquet": Content(10_000, seed=10 + i) for i in range(12)}}),
}
# Sizes, scaled down (a token equal to the key is replaced).
SIZES = {"10T": "50K", "2T": "1M"}
# Revisions: the doc's short sha of gpt2 -> the full sha of the fake gpt2's commit (filled in at start).
REVISIONS = {"607a30d": "gpt2@main"}
# Absolute paths and URLs (a token, or the value of `--opt=` / `VAR=`, that starts with the key).
# {scratch} is the document's scratch folder, {hub} the fake Hub's URL. Mount points are created.
PATHS = {"/data/": "{scratch}/data/", "/mnt/data": "{scratch}/mnt/data", "/media/usb": "{scratch}/media/usb",
         "/path/to/": "{scratch}/path/to/", "/tmp/": "{scratch}/tmp/", "/var/log/": "{scratch}/var/log/",
         "/shared/": "{scratch}/shared/", "https://hf-mirror.com": "{hub}"}
MOUNT_POINTS = ("mnt/data", "media/usb", "path/to/hf-downloader")

# Files a command promises (besides the doc's own `# -> PATH` comments), relative to the scratch
# folder: keyed by the command as written (after `python main.py`).
PROMISES = {
    "download gpt2": ["downloads/gpt2/config.json", "downloads/gpt2/onnx/decoder_model.onnx"],
    "download databricks/databricks-dolly-15k --dataset":
        ["downloads/databricks--databricks-dolly-15k/databricks-dolly-15k.jsonl"],
    "download meta-llama/Llama-3.1-8B --include '*.safetensors' '*.json' --exclude 'original/*'":
        ["downloads/meta-llama--Llama-3.1-8B/config.json",
         "downloads/meta-llama--Llama-3.1-8B/model-00002-of-00002.safetensors",
         "!downloads/meta-llama--Llama-3.1-8B/original", "!downloads/meta-llama--Llama-3.1-8B/README.md"],
    "download gpt2 --revision 607a30d --local-dir /data/gpt2 --tool wget -j 8": ["data/gpt2/model.safetensors"],
    "download bigscience/bloom --dry-run": ["!downloads/bigscience--bloom/config.json"],
    "plan-batch big-org/corpus --dataset --available-space 10T --local-dir /mnt/data/corpus --output plan.json": ["plan.json"],
    "plan-batch big-org/corpus --dataset --available-space 10T --local-dir /mnt/data/corpus --output corpus-plan.json":
        ["corpus-plan.json"],
    "batch-download big-org/corpus --dataset --available-space 10T --local-dir /mnt/data/corpus":
        ["mnt/data/corpus/.hf-downloader-batch.json", "mnt/data/corpus/data/part-00/shard-00000.parquet"],
    "batch-continue task_001 2": ["mnt/data/corpus/data/part-01/shard-00004.parquet"],
    "batch-download big-org/corpus --dataset --available-space 10T --hf-cache /mnt/data/hf-cache":
        ["mnt/data/hf-cache/datasets--big-org--corpus/.hf-downloader-batch.json"],
    "batch-continue task_001 2 --hf-cache /media/usb/hf-cache":
        ["media/usb/hf-cache/datasets--big-org--corpus/.hf-downloader-batch.json"],
    "--metadata-dir /path/to/metadata --downloads-dir /path/to/downloads download gpt2":
        ["path/to/downloads/gpt2/config.json", "path/to/metadata/tasks.json"],
    "--metadata-dir /tmp/metadata --downloads-dir /tmp/downloads download test-model":
        ["tmp/downloads/test-model/config.json", "tmp/metadata/tasks.json"],
}

# Recipes expected to fail until a known fix lands (strict xfail: they fail the run once they
# pass, and the entry goes). Keyed by the command as written, with the reason. Empty today.
PENDING: dict[str, str] = {}

TIMEOUT = 60


# ---------------------------------------------------------------- the items

@dataclass(frozen=True)
class Item:
    doc: str
    index: int
    block: Block
    cmd: Command
    first_of_block: bool

    @property
    def world_key(self) -> tuple[str, int]:
        """Commands share a world per document; a `fresh` block starts its own."""
        return (self.doc, self.block.line if self.block.fresh else 0)


def _items() -> list[Item]:
    items: list[Item] = []
    for doc in DOCS:
        for block in extract_blocks(ROOT / doc):
            for n, cmd in enumerate(split_commands(block)):
                items.append(Item(doc, len([i for i in items if i.doc == doc]), block, cmd, n == 0))
    return items


def _ids(items: list[Item]) -> list[str]:
    ids, seen = [], {}
    for item in items:
        base = f"{item.doc}:{item.cmd.line}"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return ids


ITEMS = _items()
IDS = _ids(ITEMS)


def _params() -> list[Any]:
    params = []
    for item, id_ in zip(ITEMS, IDS):
        if item.cmd.kind == "skip":          # installs and the suite itself: see the test below
            continue
        reason = PENDING.get(item.cmd.argv_text) if item.cmd.kind == "run" else None
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(item, id=id_, marks=marks))
    return params


# ---------------------------------------------------------------- one document's world

@dataclass
class World:
    scratch: Path
    hub: FakeHub
    env: dict[str, str]
    cwd: Path
    done: int = 0
    outcomes: dict[int, BaseException | None] = field(default_factory=dict)

    def sub(self, word: str) -> str:
        if word in SIZES:
            return SIZES[word]
        if word in REVISIONS:
            return self.revisions[word]
        for prefix in ("--", ""):
            name, eq, value = word.partition("=") if prefix and word.startswith("--") else ("", "", word)
            for real, fake in PATHS.items():
                if value == real.rstrip("/") or value.startswith(real):
                    value = fake.format(scratch=self.scratch, hub=self.hub.url) + value[len(real):]
                    return f"{name}{eq}{value}"
        return word

    @property
    def revisions(self) -> dict[str, str]:
        return {short: self.hub.repo(ref.split("@")[0]).branches[ref.split("@")[1]]
                for short, ref in REVISIONS.items()}


def _new_world(tmp_root: Path, doc: str, hub: FakeHub, n: int) -> World:
    scratch = tmp_root / f"{doc.replace('.', '_')}-{n}"
    for mount in MOUNT_POINTS:
        (scratch / mount).mkdir(parents=True, exist_ok=True)
    env = clean_env(scratch, hub.url)
    env.update({"METADATA_DIR": str(scratch / "metadata"), "DOWNLOADS_DIR": str(scratch / "downloads"),
                "LOGS_DIR": str(scratch / "logs"), "HF_TOKEN": TOKEN, "HFDL_PROGRESS_INTERVAL": "60"})
    return World(scratch, hub, env, scratch)


@pytest.fixture(scope="module")
def docs_hub() -> Any:
    with FakeHub() as hub:
        for name, spec in REPOS.items():
            hub.add_repo(name, spec["files"], repo_type=spec.get("repo_type", "model"),
                         gated=spec.get("gated", False))
        hub.add_token(TOKEN, user="docs")
        yield hub


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory, docs_hub: FakeHub) -> dict[str, Any]:
    return {"root": tmp_path_factory.mktemp("docs"), "hub": docs_hub}


def _world(worlds: dict[str, Any], item: Item) -> World:
    if item.world_key not in worlds:
        worlds[item.world_key] = _new_world(worlds["root"], item.doc, worlds["hub"], len(worlds))
    return worlds[item.world_key]


def _run(world: World, item: Item) -> None:
    cmd, block = item.cmd, item.block
    if block.skip:
        pytest.skip(f"marked in the doc: {block.skip}")
    if item.first_of_block:
        for src, dst in block.moves:
            os.rename(world.sub(src), world.sub(dst))
    if cmd.kind == "skip":
        pytest.skip(f"not run: {cmd.text} ({cmd.why})")
    if cmd.kind == "export":
        world.env.update({k: world.sub(v) for k, v in cmd.env})
        return
    if cmd.kind == "cd":
        target = Path(world.sub(cmd.argv[0])) if cmd.argv else world.scratch
        world.cwd = target if target.is_absolute() else world.cwd / target
        assert world.cwd.is_dir(), f"cd: no folder {world.cwd}"
        return
    argv = [sys.executable, str(ROOT / "main.py"), *map(world.sub, cmd.argv)]
    env = {**world.env, **{k: world.sub(v) for k, v in cmd.env}}
    stdout: Any = subprocess.PIPE
    target = Path(world.sub(cmd.stdout or ""))
    target = target if target.is_absolute() else world.cwd / target
    if cmd.stdout:
        stdout = open(target, "a" if cmd.append else "w")
    try:
        proc = subprocess.run(argv, cwd=world.cwd, env=env, stdout=stdout, text=True, timeout=TIMEOUT,
                              stderr=subprocess.STDOUT if cmd.merge_stderr else subprocess.PIPE)
    finally:
        if stdout is not subprocess.PIPE:
            stdout.close()
    output = f"$ {cmd.text}\n(cwd {world.cwd})\n{proc.stdout or ''}{proc.stderr or ''}"
    assert "Traceback" not in output, output
    assert proc.returncode == expected_exit(block, cmd), output
    if cmd.stdout:
        assert target.stat().st_size > 0, f"nothing written to {target}\n{output}"
    if cmd.capture:          # DIR=$(python main.py download REPO -q): stdout is one folder
        lines = proc.stdout.splitlines()
        assert len(lines) == 1 and Path(lines[0]).is_dir(), output
        world.env[cmd.capture] = lines[0]
    _check_promises(world, item, output)


def _check_promises(world: World, item: Item, output: str) -> None:
    promised = list(PROMISES.get(item.cmd.argv_text, [])) + list(item.cmd.promises)
    for rel in promised:
        absent = rel.startswith("!")
        path = Path(world.sub(rel.lstrip("!")))
        path = path if path.is_absolute() else world.scratch / path
        assert path.exists() != absent, f"{'unexpected' if absent else 'missing'}: {path}\n{output}"


@pytest.mark.parametrize("item", _params())
def test_doc_command(item: Item, worlds: dict[str, Any]) -> None:
    world = _world(worlds, item)
    # Replay the commands before it in its world (when it is run alone, e.g. with -k).
    for earlier in ITEMS:
        if earlier.world_key == item.world_key and world.done <= earlier.index < item.index:
            _replay(world, earlier)
    world.done = item.index + 1
    crontab_cwd = world.cwd
    try:
        _run(world, item)
    finally:
        if item.block.lang == "crontab":
            world.cwd = crontab_cwd  # each crontab line runs in its own shell


def _replay(world: World, item: Item) -> None:
    try:
        _run(world, item)
    except BaseException:  # noqa: BLE001 - a skipped or failed earlier command: keep going, as a reader would
        pass
    world.done = item.index + 1


def test_commands_not_run_are_only_installs_and_the_suite() -> None:
    """What the docs show but the runner does not run: package installs and the test command
    (which is this suite). Anything else must run, or be marked in the doc with its reason."""
    not_run = {i.cmd.text.split()[0] + (" -m pytest" if "pytest" in i.cmd.text else "")
               for i in ITEMS if i.cmd.kind == "skip"}
    assert not_run <= {"sudo", "apt-get", "pip", "python -m pytest"}, not_run
    assert not [i for i in ITEMS if i.block.skip], "a doc block is marked skip"


def test_every_doc_has_commands() -> None:
    for doc in DOCS:
        assert any(i.doc == doc and i.cmd.kind == "run" for i in ITEMS), doc


def test_promises_and_pending_name_commands_of_the_docs() -> None:
    """A renamed recipe must not silently drop its checks."""
    written = {i.cmd.argv_text for i in ITEMS if i.cmd.kind == "run"}
    assert not (set(PROMISES) - written), set(PROMISES) - written
    assert not (set(PENDING) - written), set(PENDING) - written


# ---------------------------------------------------------------- the runner itself

def _block_of(tmp_path: Path, text: str) -> list[Block]:
    (tmp_path / "DOC.md").write_text(text)
    return extract_blocks(tmp_path / "DOC.md")


def test_runner_splits_commands_as_a_shell_would(tmp_path: Path) -> None:
    blocks = _block_of(tmp_path, """intro

<!-- doc-test: exit 4 on "resume" (why) -->
```bash
sudo apt-get install x; pip install y && python main.py download a  # -> downloads/a/
python main.py download b --include '*.json' 'x # y' \\
    --exclude 'z/*'     # a comment
X=1 Y='a b' python main.py resume task_001
export METADATA_DIR=/tmp/m
cd sub
```

```crontab
# m h dom mon dow command
0 3 * * * cd /srv && python main.py list-tasks >> /srv/cron.log 2>&1
```
""")
    bash, cron = blocks
    assert (bash.id, bash.lang, cron.lang) == ("DOC.md:5", "bash", "crontab")
    cmds = split_commands(bash)
    assert [c.kind for c in cmds] == ["skip", "skip", "run", "run", "run", "export", "cd"]
    assert cmds[2].argv == ("download", "a") and cmds[2].promises == ("downloads/a/",)
    assert cmds[3].argv == ("download", "b", "--include", "*.json", "x # y", "--exclude", "z/*")
    assert cmds[3].line == 6 and cmds[4].line == 8
    assert cmds[4].env == (("X", "1"), ("Y", "a b")) and cmds[4].argv == ("resume", "task_001")
    assert [expected_exit(bash, c) for c in cmds[2:5]] == [0, 0, 4]
    assert cmds[5].env == (("METADATA_DIR", "/tmp/m"),) and cmds[6].argv == ("sub",)
    cd, run = split_commands(cron)
    assert (cd.kind, run.argv, run.stdout, run.append, run.merge_stderr) == (
        "cd", ("list-tasks",), "/srv/cron.log", True, True)


@pytest.mark.parametrize("text", [
    "<!-- doc-test: exit 4 -->\n```bash\npython main.py list-tasks\n```\n",          # no reason
    "<!-- doc-test: sometimes -->\n```bash\npython main.py list-tasks\n```\n",        # unknown marker
    "<!-- doc-test: skip (x) -->\n\ntext\n```bash\npython main.py list-tasks\n```\n",  # not before the block
    "```bash\ncurl https://example.org\n```\n",                                     # unknown command
    "```bash\npython main.py list-tasks | head\n```\n",                            # a pipe
])
def test_runner_refuses_what_it_cannot_run_faithfully(tmp_path: Path, text: str) -> None:
    with pytest.raises(DocError):
        for block in _block_of(tmp_path, text):
            split_commands(block)
