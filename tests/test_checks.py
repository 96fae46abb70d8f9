"""The checks beyond the loader, on real files and a real PATH."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from codexnet.checks import (
    MIN_TOKEN_LENGTH,
    pinned_codex,
    resolve_codex_bin,
    state_dir_problem,
    token_problem,
)


def test_a_missing_state_dir_is_created_private_only_when_asked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert state_dir_problem(state, create=False) is None
    assert not state.exists()  # --check-config has no side effects
    assert state_dir_problem(state, create=True) is None
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert list(state.iterdir()) == []  # the write probe leaves nothing behind


def test_missing_parents_are_created_under_a_writable_ancestor(tmp_path: Path) -> None:
    state = tmp_path / "state" / "proxy-laptop"
    assert state_dir_problem(state, create=True) is None
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_nothing_can_be_created_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    problem = state_dir_problem(tmp_path / "f" / "a" / "state", create=True)
    target = tmp_path / "f" / "a" / "state"
    assert problem == f"{target}: cannot be created: {tmp_path / 'f'} is not a directory"
    assert state_dir_problem(tmp_path / "f" / "state", create=False) is not None


def test_a_file_is_not_a_state_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert state_dir_problem(tmp_path / "f", create=True) == f"{tmp_path / 'f'}: not a directory"


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("x" * MIN_TOKEN_LENGTH, None),
        ("x" * (MIN_TOKEN_LENGTH - 1), "shorter than 16 characters"),
        (" " + "x" * 40, "has leading or trailing whitespace"),
        ("x" * 40 + "\n", "has leading or trailing whitespace"),
    ],
)
def test_token_problem(token: str, problem: str | None) -> None:
    found = token_problem(token)
    assert found == problem if problem is None else (found or "").startswith(problem)


def test_codex_bin_resolves_on_path_or_as_a_path(tmp_path: Path) -> None:
    tool = tmp_path / "my-codex"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert resolve_codex_bin("my-codex", {"PATH": str(tmp_path)}) == str(tool)
    assert resolve_codex_bin(str(tool), {"PATH": ""}) == str(tool)
    assert resolve_codex_bin("my-codex", {"PATH": "/nonexistent"}) is None
    tool.chmod(0o644)
    assert resolve_codex_bin(str(tool), {"PATH": ""}) is None  # not executable


def test_the_default_name_falls_back_to_the_pinned_codex() -> None:
    found = resolve_codex_bin("codex", {"PATH": "/nonexistent"})
    assert found == (str(pinned_codex()) if pinned_codex().exists() else None)
