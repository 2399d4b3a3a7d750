"""The user's disk: no write, rename or delete through a symlink below the target folder, clean
and verify never destroy a file the user changed, partials out of the repo's namespace, and Hub
names the disk cannot hold (or a terminal should not print) refused with one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakehub import Content, content_read
from tests.helpers import TOOLS, assert_same_tree, tree_files

FILES = {"ok.txt": b"fine\n", "sub/x.bin": Content(300_000, 7)}


def expected_hash(hub, repo: str, path: str) -> str:
    entry = hub.file_info(repo, path)
    return entry.sha256 if entry.lfs else entry.oid


def victim(tmp_path: Path) -> Path:
    """A file outside the target folder that the download must never touch."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "x.bin").write_bytes(b"precious user data")
    return outside / "x.bin"


def refused_line(r) -> bool:
    return "symlink" in r.out + r.err


# ================================================================ 7. symlinks below the target

@pytest.mark.parametrize("tool", TOOLS)
def test_a_symlinked_subfolder_is_refused_and_the_rest_downloads(cli, hub, tmp_path, tool):
    hub.add_repo("s", FILES)
    target = tmp_path / "target"
    target.mkdir()
    precious = victim(tmp_path)
    (target / "sub").symlink_to(precious.parent)
    r = cli("download", "s", "--local-dir", str(target), "--tool", tool)
    assert r.code == 3, r.text
    assert precious.read_bytes() == b"precious user data"
    assert (target / "ok.txt").read_bytes() == b"fine\n"
    assert refused_line(r) and "sub" in r.out + r.err


@pytest.mark.parametrize("where", ["beside", "hidden"])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_symlink_planted_at_the_partial_name_is_never_followed(cli, hub, tmp_path, tool, where):
    hub.add_repo("s", FILES)
    target = tmp_path / "target"
    precious = victim(tmp_path)
    name = f"x.bin.{expected_hash(hub, 's', 'sub/x.bin')[:10]}.incomplete"
    # "beside": where versions before .hfdl/ kept partials; "hidden": where they are now
    plant = target / ("sub" if where == "beside" else ".hfdl/partial/sub") / name
    plant.parent.mkdir(parents=True)
    plant.symlink_to(precious)
    r = cli("download", "s", "--local-dir", str(target), "--tool", tool)
    assert precious.read_bytes() == b"precious user data"
    assert (target / "ok.txt").read_bytes() == b"fine\n"
    if where == "beside":          # not ours to follow or adopt: the file downloads as usual
        assert r.code == 0, r.text
        assert (target / "sub/x.bin").stat().st_size == 300_000
    else:                          # the file fails with the reason, the rest downloads
        assert r.code == 3 and refused_line(r), r.text
        assert not (target / "sub/x.bin").exists()


def test_clean_delete_files_does_not_delete_through_a_symlinked_folder(cli, hub, tmp_path):
    hub.add_repo("s", FILES)
    target = tmp_path / "target"
    assert cli("download", "s", "--local-dir", str(target), "--tool", "python").code == 0
    outside = tmp_path / "outside"
    (target / "sub").rename(outside)                 # the same bytes, now outside the target
    (target / "sub").symlink_to(outside)
    r = cli("clean", "--delete-files")
    assert r.code == 0, r.text
    assert (outside / "x.bin").stat().st_size == 300_000
    assert not (target / "ok.txt").exists()
    assert "kept 1 files" in r.out


# ================================================================ 8. clean and verify keep user changes

def test_clean_deletes_only_files_unchanged_since_download(cli, hub, tmp_path):
    files = {"a.txt": b"aaaa", "b.bin": Content(200_000, 3), "c.txt": b"cccc", "d/e.txt": b"e"}
    hub.add_repo("c", files)
    target = tmp_path / "target"
    assert cli("download", "c", "--local-dir", str(target), "--tool", "python").code == 0
    (target / "a.txt").write_bytes(b"AAAA")          # same size, the user's bytes
    (target / "b.bin").write_bytes(b"shorter")       # another size
    r = cli("clean", "--delete-files")
    assert r.code == 0, r.text
    assert "2 files deleted" in r.out and "kept 2 files changed since download" in r.out
    assert sorted(tree_files(target)) == ["a.txt", "b.bin"]
    assert (target / "a.txt").read_bytes() == b"AAAA"


def test_verify_reports_a_changed_file_and_moves_it_aside_only_with_fix(cli, hub, tmp_path):
    hub.add_repo("v", {"a.txt": b"aaaa", "b.txt": b"bbbb"})
    target = tmp_path / "target"
    assert cli("download", "v", "--local-dir", str(target), "--tool", "python").code == 0
    (target / "a.txt").write_bytes(b"mine")
    r = cli("verify", "task_001")
    assert r.code == 3 and "HASH MISMATCH" in r.out and "--fix" in r.out, r.text
    assert (target / "a.txt").read_bytes() == b"mine"          # reported, not deleted
    r = cli("verify", "task_001", "--fix")
    assert r.code == 3 and "moved a.txt aside to a.txt.hfdl-modified-" in r.out, r.text
    aside = [p for p in target.iterdir() if p.name.startswith("a.txt.hfdl-modified-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"mine"
    assert not (target / "a.txt").exists()
    assert cli("resume", "task_001").code == 0
    assert (target / "a.txt").read_bytes() == b"aaaa"
    assert aside[0].read_bytes() == b"mine"


# ================================================================ 9. partials out of the repo's namespace

@pytest.mark.parametrize("tool", TOOLS)
def test_a_repo_file_named_like_a_partial_is_not_clobbered(cli, hub, tmp_path, tool):
    hub.add_repo("p", {"aa.txt": b"the real aa"})
    twin = f"aa.txt.{expected_hash(hub, 'p', 'aa.txt')[:10]}.incomplete"
    files = {"aa.txt": b"the real aa", twin: b"a file of the repo, not a partial"}
    hub.add_repo("p", files)
    target = tmp_path / "target"
    r = cli("download", "p", "--local-dir", str(target), "--tool", tool)
    assert r.code == 0, r.text
    assert_same_tree(target, files)
    assert not (target / ".hfdl").exists()           # a finished download leaves no side folder
    assert cli("verify", "task_001").code == 0


def test_an_old_style_partial_beside_the_final_name_is_continued(cli, hub, tmp_path):
    data = Content(2_000_000, 5)
    hub.add_repo("o", {"big.bin": data})
    target = tmp_path / "target"
    target.mkdir()
    head = content_read(data, 0, 1_500_000)
    old = target / f"big.bin.{expected_hash(hub, 'o', 'big.bin')[:10]}.incomplete"
    old.write_bytes(head)
    r = cli("download", "o", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert_same_tree(target, {"big.bin": data})
    assert hub.bytes_served("big.bin") < 600_000              # continued, not started over


def test_repo_files_under_the_side_folder_are_refused(cli, hub, tmp_path):
    hub.add_repo("h", {".hfdl/partial/x.bin": b"x", "ok.txt": b"fine\n"})
    target = tmp_path / "target"
    r = cli("download", "h", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert "skipped '.hfdl/partial/x.bin'" in r.err
    assert sorted(tree_files(target)) == ["ok.txt"]


# ================================================================ 10. names a disk or a terminal cannot take

def test_a_name_too_long_for_the_filesystem_is_refused_and_the_rest_downloads(cli, hub, tmp_path):
    long = "d/" + "x" * 300 + ".bin"
    hub.add_repo("l", {long: b"long", "ok.txt": b"fine\n"})
    target = tmp_path / "target"
    r = cli("download", "l", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert "longer than the filesystem allows" in r.err
    assert sorted(tree_files(target)) == ["ok.txt"]


def test_a_name_that_is_both_a_file_and_a_folder_refuses_the_file(cli, hub, tmp_path):
    hub.add_repo("f", {"a": b"file a", "a/b": b"file in folder a", "ok.txt": b"fine\n"})
    target = tmp_path / "target"
    r = cli("download", "f", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert "skipped 'a': the repo also has a folder of that name" in r.err
    assert sorted(tree_files(target)) == ["a/b", "ok.txt"]


def test_names_with_control_characters_are_refused_and_printed_escaped(cli, hub, tmp_path):
    evil = "title\x1b]0;pwned\x07.txt"
    files = {evil: b"e", "new\nline.txt": b"n", "ok.txt": b"fine\n"}
    hub.add_repo("e", files)
    target = tmp_path / "target"
    r = cli("download", "e", "--local-dir", str(target), "--tool", "python")
    assert r.code == 0, r.text
    assert "\x1b" not in r.out + r.err and "\x07" not in r.out + r.err
    assert "new\nline" not in r.out + r.err
    assert "control characters" in r.err and "\\x1b" in r.err and "new\\nline.txt" in r.err
    assert sorted(tree_files(target)) == ["ok.txt"]
    for log in (cli.root / "logs").glob("*.log"):
        assert "\x1b" not in log.read_text(errors="replace")


def test_printable_escapes_only_control_characters() -> None:
    from utils import printable
    assert printable("a\x1b[31mb\nc\x9bd é.txt") == "a\\x1b[31mb\\nc\\x9bd é.txt"
    assert printable("plain/name.bin") == "plain/name.bin"
