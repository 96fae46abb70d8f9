"""The proxy's workspace: paths from the chat stay inside allowed_roots; files land safely."""

from __future__ import annotations

from pathlib import Path

import pytest

from codexnet.proxy.workspace import MAX_NAME_CHARS, Workspace, WorkspaceError, safe_file_name


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    project, other, outside = tmp_path / "project", tmp_path / "other", tmp_path / "outside"
    for d in (project / "src", other, outside):
        d.mkdir(parents=True)
    (project / "README.md").write_text("hello")
    (outside / "secret.txt").write_text("secret")
    return project, other, outside


@pytest.fixture
def ws(roots: tuple[Path, Path, Path], tmp_path: Path) -> Workspace:
    project, other, _ = roots
    state = tmp_path / "state"
    state.mkdir()
    return Workspace(project, (project, other), state)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../outside/secret.txt", r"'../outside/secret.txt' is outside the allowed directories"),
        ("src/../../outside/secret.txt", "is outside the allowed directories"),
        ("/etc/passwd", r"'/etc/passwd' is outside the allowed directories \(.*project, .*other\)"),
        ("link-out/secret.txt", "is outside the allowed directories"),
        ("bad\0name", "a path cannot contain NUL or line breaks"),
        ("two\nlines", "a path cannot contain NUL or line breaks"),
        ("x" * 1025, "a path is at most 1024 characters"),
        ("missing.txt", "'missing.txt' does not exist"),
        ("src", "'src' is not a file"),
        ("", "no path given"),
    ],
)
def test_a_file_outside_or_odd_is_one_clear_line(
    ws: Workspace, roots: tuple[Path, Path, Path], path: str, message: str
) -> None:
    project, _, outside = roots
    (project / "link-out").symlink_to(outside)
    with pytest.raises(WorkspaceError, match=message):
        ws.file(path, None)


def test_files_inside_any_root_resolve(ws: Workspace, roots: tuple[Path, Path, Path]) -> None:
    project, other, _ = roots
    (other / "notes.txt").write_text("n")
    (project / "to-other").symlink_to(other)  # a link that stays inside is fine
    assert ws.file("README.md", None) == project / "README.md"
    assert ws.file("README.md", str(project / "src") + "/..") == project / "README.md"
    assert ws.file("to-other/notes.txt", None) == other / "notes.txt"
    assert ws.file(str(other / "notes.txt"), None) == other / "notes.txt"
    assert ws.read(project / "README.md", 1, 3) == (b"ell", 5)


def test_directories(ws: Workspace, roots: tuple[Path, Path, Path]) -> None:
    project, other, outside = roots
    assert ws.directory("src") == project / "src"
    assert ws.directory(str(other)) == other
    assert ws.working_dir(None) == project
    assert ws.working_dir(str(project / "src")) == project / "src"
    with pytest.raises(WorkspaceError, match="is outside the allowed directories"):
        ws.directory(str(outside))
    with pytest.raises(WorkspaceError, match=r"'README\.md' is not a directory"):
        ws.directory("README.md")
    with pytest.raises(WorkspaceError, match="'nope' does not exist"):
        ws.directory("nope")


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("report.txt", "report.txt"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("a/b\\c.txt", "a_b_c.txt"),
        ("nul\0byte.txt", "nul_byte.txt"),
        ("two\nlines\r.txt", "two_lines_.txt"),
        ("..", "file"),
        ("   ", "file"),
        ("", "file"),
        (None, "file"),
    ],
)
def test_sent_file_names_become_one_safe_name(sent: str | None, expected: str) -> None:
    assert safe_file_name(sent, "file").name == expected


def test_a_300_character_name_is_cut_keeping_its_suffix() -> None:
    safe = safe_file_name("ä" * 300 + ".tar.gz", "file")
    assert safe.changed
    assert safe.name.endswith(".gz")
    assert len(safe.name) <= MAX_NAME_CHARS
    assert len(safe.name.encode()) <= 240
    assert safe_file_name("report.txt", "file").changed is False


def test_placing_never_overwrites_and_stays_in_telegram_files(
    ws: Workspace, roots: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    project, _, _ = roots
    staged = ws.staging("t1", 0)
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"new")
    first = ws.place(staged, project, "README.md")
    second = ws.place(staged, project, "README.md")
    third = ws.place(staged, project, "archive")
    fourth = ws.place(staged, project, "archive")
    assert first == project / "telegram-files" / "README.md"
    assert second == project / "telegram-files" / "README-1.md"
    assert (third.name, fourth.name) == ("archive", "archive-1")
    assert (project / "README.md").read_text() == "hello"  # the project's own file untouched
    assert second.read_bytes() == b"new"
    ws.discard_staging("t1")
    assert not staged.exists()
    assert second.read_bytes() == b"new"  # a link, not the staging file itself


def test_a_telegram_files_link_out_of_the_roots_is_refused(
    ws: Workspace, roots: tuple[Path, Path, Path]
) -> None:
    project, _, outside = roots
    (project / "telegram-files").symlink_to(outside)
    staged = ws.staging("t2", 0)
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"x")
    before = snapshot(outside)
    with pytest.raises(WorkspaceError, match="leads outside the allowed directories"):
        ws.place(staged, project, "evil.txt")
    assert snapshot(outside) == before


def test_a_name_that_is_a_symlink_already_is_not_followed(
    ws: Workspace, roots: tuple[Path, Path, Path]
) -> None:
    project, _, outside = roots
    (project / "telegram-files").mkdir()
    (project / "telegram-files" / "trap.txt").symlink_to(outside / "secret.txt")
    staged = ws.staging("t3", 0)
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"overwrite?")
    placed = ws.place(staged, project, "trap.txt")
    assert placed.name == "trap-1.txt"
    assert (outside / "secret.txt").read_text() == "secret"


def test_diffs_are_kept_by_task(ws: Workspace) -> None:
    assert ws.save_diff("t4", "diff --git a/x b/x\n") == 19
    assert ws.diff_path("t4").read_text().startswith("diff --git")
    with pytest.raises(WorkspaceError):
        ws.diff_path("../../etc/passwd")
    ws.prune_diffs(keep=set())
    assert not ws.diff_path("t4").exists()
