"""Docs are tests: the shell blocks of a Markdown file, split into the commands a reader would type.

Pure parsing here (no pytest, no fake Hub): tests/test_docs.py runs what this returns.

    for block in extract_blocks(Path("README.md")):
        for cmd in split_commands(block):
            ...   # cmd.kind: "run" (python main.py ...), "cd", "export", "skip"

A block may be preceded (blank lines allowed) by marker comments, visible in the doc source:

    <!-- doc-test: skip (needs the real Hub: why) -->       the block is not run
    <!-- doc-test: exit 4 (why) -->                          every command of the block exits 4
    <!-- doc-test: exit 1 on "cancel task_001" (why) -->     only the commands containing that text
    <!-- doc-test: fresh (why) -->                           the block starts from empty data folders
    <!-- doc-test: move SRC DST (why) -->                    before the block, a folder moves (a disk swap)

A `crontab` block holds crontab lines: the five time fields are dropped and the command is run.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

SHELL_LANGS = {"bash", "sh", "console", "shell", "crontab"}
_FENCE = re.compile(r"^```\s*(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
_EXIT = re.compile(r'^exit\s+(\d+)(?:\s+on\s+"([^"]+)")?\s*(?:\((.*)\))?$')
_SKIP = re.compile(r"^skip\s*\((.+)\)$")
_FRESH = re.compile(r"^fresh\s*\((.+)\)$")
_MOVE = re.compile(r"^move\s+(\S+)\s+(\S+)\s*\((.+)\)$")
_PROMISE = re.compile(r"#\s*->\s*(\S+)")
_CRON_FIELDS = re.compile(r"^\s*((?:\S+\s+){5})(.*)$")
# Commands of the reader's system, not of this tool: recognised, reported, never run.
NOT_OURS = {
    "sudo": "installs system packages", "apt-get": "installs system packages", "apt": "installs system packages",
    "pip": "installs Python packages", "git": "fetches the source", "hf": "logs in to the real Hub",
    "crontab": "edits the reader's crontab",
}
_SEPARATORS = {";", "&&", "||"}


class DocError(ValueError):
    """A doc block the runner cannot understand (a bad marker, an unknown command form)."""


@dataclass(frozen=True)
class ExitMarker:
    status: int
    only: str | None  # None: every command of the block
    why: str


@dataclass
class Block:
    doc: str
    line: int          # the line of the block's first command line (after the fence)
    lang: str
    lines: list[str]
    skip: str | None = None
    fresh: bool = False
    moves: list[tuple[str, str]] = field(default_factory=list)
    exits: list[ExitMarker] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass(frozen=True)
class Command:
    line: int
    text: str                   # the command as written (one logical line, continuations joined)
    kind: str                   # "run" | "cd" | "export" | "skip"
    argv: tuple[str, ...] = ()  # for "run": the arguments after `python main.py`; for "cd": (dir,)
    env: tuple[tuple[str, str], ...] = ()   # VAR=value prefixes, or the export's assignments
    why: str = ""               # for "skip": why it is not run
    stdout: str | None = None   # `> FILE` / `>> FILE`
    append: bool = False
    merge_stderr: bool = False  # `2>&1`
    promises: tuple[str, ...] = ()  # files the doc promises in a `# -> PATH` comment
    capture: str | None = None  # `VAR=$(python main.py ...)`: stdout becomes $VAR, a folder

    @property
    def argv_text(self) -> str:
        """The arguments after `python main.py`, as a shell would quote them."""
        return shlex.join(self.argv)


def extract_blocks(path: Path, name: str | None = None) -> list[Block]:
    """The shell blocks of a Markdown file, with their markers and line numbers."""
    doc = name or path.name
    blocks: list[Block] = []
    markers: list[str] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m, fence = _MARKER.match(lines[i]), _FENCE.match(lines[i])
        if m:
            markers.append(m.group(1))
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise DocError(f"{doc}:{i + 1}: a code block that is never closed")
            if fence.group(1) in SHELL_LANGS:
                blocks.append(_block(doc, i + 2, fence.group(1), lines[i + 1:end], markers))
            elif markers:
                raise DocError(f"{doc}:{i + 1}: a doc-test marker before a block that is not a shell block")
            markers, i = [], end
        elif lines[i].strip():
            if markers:
                raise DocError(f"{doc}:{i + 1}: a doc-test marker not followed by a shell block")
        i += 1
    return blocks


def _block(doc: str, line: int, lang: str, body: list[str], markers: list[str]) -> Block:
    block = Block(doc, line, lang, body)
    for text in markers:
        if m := _SKIP.match(text):
            block.skip = m.group(1)
        elif m := _FRESH.match(text):
            block.fresh = True
        elif m := _MOVE.match(text):
            block.moves.append((m.group(1), m.group(2)))
        elif m := _EXIT.match(text):
            if not m.group(3):
                raise DocError(f"{doc}:{line}: `doc-test: exit` must say why, in parentheses")
            block.exits.append(ExitMarker(int(m.group(1)), m.group(2), m.group(3)))
        else:
            raise DocError(f"{doc}:{line}: unknown doc-test marker {text!r}")
    return block


def expected_exit(block: Block, cmd: Command) -> int:
    for marker in block.exits:
        if marker.only is None or marker.only in cmd.text:
            return marker.status
    return 0


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) with `\\` continuations joined; blank lines dropped."""
    out: list[tuple[int, str]] = []
    start, parts = 0, []
    for n, raw in enumerate(block.lines, block.line):
        if not parts:
            start = n
        if raw.rstrip().endswith("\\"):
            parts.append(raw.rstrip()[:-1])
            continue
        parts.append(raw)
        text = " ".join(p.strip() for p in parts)
        parts = []
        if text:
            out.append((start, text))
    if parts:
        raise DocError(f"{block.doc}:{start}: a `\\` continuation at the end of the block")
    return out


_CAPTURE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=\$\(([^()]*)\)\s*(#.*)?$")


def split_commands(block: Block) -> list[Command]:
    """Every command of the block, in order (comments stripped, `;` `&&` `||` split)."""
    commands: list[Command] = []
    for line, text in logical_lines(block):
        if block.lang == "console":
            if not text.startswith("$ "):
                continue  # output shown in a console block
            text = text[2:]
        if block.lang == "crontab":
            if text.lstrip().startswith("#"):
                continue
            m = _CRON_FIELDS.match(text)
            if not m:
                raise DocError(f"{block.doc}:{line}: not a crontab line (five time fields, then the command)")
            text = m.group(2)
        captured = _CAPTURE.match(text)
        if captured:         # VAR=$(python main.py ...): run it, its stdout names a folder
            inner = _split(captured.group(2), f"{block.doc}:{line}")
            line_commands = [replace(_command(line, inner[0], f"{block.doc}:{line}"),
                                     text=text, capture=captured.group(1))]
        else:
            line_commands = [_command(line, words, f"{block.doc}:{line}")
                             for words in _split(text, f"{block.doc}:{line}")]
        if (promise := _PROMISE.search(text)) and line_commands:
            line_commands[-1] = replace(line_commands[-1], promises=(promise.group(1),))
        commands.extend(line_commands)
    return commands


def _split(text: str, where: str) -> list[list[str]]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError as e:
        raise DocError(f"{where}: {e}") from None
    groups: list[list[str]] = [[]]
    for tok in tokens:
        if tok in _SEPARATORS:
            groups.append([])
        elif tok in ("|", "&"):
            raise DocError(f"{where}: pipes and background jobs are not supported by the doc runner")
        else:
            groups[-1].append(tok)
    return [g for g in groups if g]


def _command(line: int, words: list[str], where: str) -> Command:
    text = " ".join(w if w in (">", ">>", ">&") else shlex.quote(w) for w in words).replace(" 2 >& 1", " 2>&1")
    words, redirect = _redirections(words, where)
    env: list[tuple[str, str]] = []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env.append((name, value))
    if not words:
        return Command(line, text, "export", env=tuple(env))  # `VAR=value` alone: as `export`
    head = words[0]
    if head == "export":
        pairs = [w.partition("=") for w in words[1:]]
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise DocError(f"{where}: `export` needs VAR=value")
        return Command(line, text, "export", env=tuple((n, v) for n, _, v in pairs))
    if head == "cd":
        return Command(line, text, "cd", argv=tuple(words[1:2]))
    if head in NOT_OURS:
        return Command(line, text, "skip", why=f"{head} {NOT_OURS[head]}: not this tool")
    if head in ("python", "python3") and words[1:3] == ["-m", "pytest"]:
        return Command(line, text, "skip", why="the test suite itself: not run inside itself")
    if head in ("python", "python3") and len(words) > 1 and words[1] == "main.py":
        return Command(line, text, "run", argv=tuple(words[2:]), env=tuple(env), **redirect)
    raise DocError(f"{where}: the doc runner does not know the command {head!r} (add it to NOT_OURS or mark the block)")


def _redirections(words: list[str], where: str) -> tuple[list[str], dict]:
    out: list[str] = []
    redirect: dict = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w in (">", ">>") and i + 1 < len(words):
            redirect.update(stdout=words[i + 1], append=w == ">>")
            i += 2
        elif w == "2" and words[i + 1:i + 3] == [">&", "1"]:
            redirect["merge_stderr"] = True
            i += 3
        elif w in ("<", ">", ">>", ">&"):
            raise DocError(f"{where}: a redirection the doc runner does not support")
        else:
            out.append(w)
            i += 1
    return out, redirect
