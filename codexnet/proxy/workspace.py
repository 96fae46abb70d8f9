"""The machine's side of the workspace: which paths the chat may name, and files.

Every path that comes from the chat — `/get report.txt`, `/cd ../other`, the
name of a file someone sent — is resolved here, symlinks and `..` included,
and must land inside one of the proxy's `allowed_roots` (default: codex_cwd).
Anything else is one `WorkspaceError` line for the chat, and nothing is read,
written or changed.

Files sent with a prompt arrive in a staging area under the proxy's
`state_dir` (`incoming/<task>/<index>`), so a half-fetched file survives a
restart and is never seen in the working directory. Once complete, each is
linked into `<working directory>/telegram-files/` under a safe name, never
over an existing file (`report.txt` exists: `report-1.txt`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Final

import attrs

from codexnet.protocol import path_problem

FILES_DIR: Final = "telegram-files"
MAX_NAME_CHARS: Final = 120  # well under the 255 bytes a file name may have
MAX_NAME_BYTES: Final = 240
MAX_SUFFIX_CHARS: Final = 16
TASK_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")


class WorkspaceError(Exception):
    """A path the chat named cannot be used; the message is one line for the chat."""


@attrs.frozen
class SafeName:
    name: str
    changed: bool  # the sent name had to be changed (unsafe characters, too long, empty)


def safe_file_name(sent: str | None, fallback: str) -> SafeName:
    """A file name that stays one name in one directory: no `/`, NUL, control
    characters or line breaks, not `.`/`..`, at most MAX_NAME_CHARS (its suffix kept)."""
    original = sent or ""
    name = unicodedata.normalize("NFC", original)
    name = "".join("_" if ch in "/\\" or unicodedata.category(ch)[0] == "C" else ch for ch in name)
    name = name.strip().strip(".").strip()
    if not name:
        return SafeName(fallback, changed=bool(original))
    if len(name) > MAX_NAME_CHARS or len(name.encode()) > MAX_NAME_BYTES:
        stem, dot, suffix = name.rpartition(".")
        if not dot or not stem or len(suffix) > MAX_SUFFIX_CHARS:
            stem, suffix = name, ""
        keep = MAX_NAME_CHARS - len(suffix) - 1
        while keep > 0 and len(f"{stem[:keep]}.{suffix}".encode()) > MAX_NAME_BYTES:
            keep -= 1
        name = f"{stem[:keep].rstrip()}.{suffix}" if suffix else stem[:keep].rstrip()
    return SafeName(name, changed=name != original)


def _check_text(path: str) -> None:
    if not path:
        raise WorkspaceError("no path given")
    problem = path_problem(path)
    if problem is not None:
        raise WorkspaceError(problem)


def _show(path: str) -> str:
    return repr(path if len(path) <= 80 else path[:77] + "...")


class Workspace:
    def __init__(self, codex_cwd: Path, roots: tuple[Path, ...], state_dir: Path) -> None:
        self.codex_cwd = codex_cwd
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)
        self.state_dir = state_dir

    # ------------------------------------------------------------------ paths

    def inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)

    def _resolve(self, path: str, base: Path) -> Path:
        """`path` (relative to `base`, or absolute) with symlinks and `..` resolved."""
        _check_text(path)
        real = Path(os.path.realpath(base / Path(path).expanduser()))
        if not self.inside(real):
            roots = ", ".join(str(root) for root in self.roots)
            raise WorkspaceError(f"{_show(path)} is outside the allowed directories ({roots})")
        return real

    def working_dir(self, cwd: str | None) -> Path:
        """The directory a turn runs in: `cwd` (as /cd stored it), else codex_cwd."""
        if not cwd:
            real = Path(os.path.realpath(self.codex_cwd))
            if not real.is_dir():
                raise WorkspaceError(f"codex_cwd {str(self.codex_cwd)!r} is not a directory")
            return real
        return self.directory(cwd)

    def directory(self, path: str) -> Path:
        """A directory named in the chat (`/cd`): relative to codex_cwd, or absolute."""
        real = self._resolve(path, self.codex_cwd)
        if not real.is_dir():
            what = "does not exist" if not real.exists() else "is not a directory"
            raise WorkspaceError(f"{_show(path)} {what}")
        return real

    def file(self, path: str, cwd: str | None) -> Path:
        """A file named in the chat (`/get`): relative to the working directory, or absolute."""
        real = self._resolve(path, self.working_dir(cwd))
        if not real.is_file():
            what = "does not exist" if not real.exists() else "is not a file"
            raise WorkspaceError(f"{_show(path)} {what}")
        return real

    def read(self, path: Path, offset: int, length: int) -> tuple[bytes, int]:
        """`length` bytes of `path` from `offset`, and its size now (blocking: run in a thread).

        Opened without following a symlink swapped in since it was resolved.
        """
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, max(0, length), max(0, offset)), size
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ diffs

    def diff_path(self, task_id: str) -> Path:
        if not TASK_ID.fullmatch(task_id):
            raise WorkspaceError("no such task")
        return self.state_dir / "diffs" / f"{task_id}.diff"

    def save_diff(self, task_id: str, diff: str) -> int:
        """Keep a turn's diff for the chat's Diff button; its size in bytes (blocking)."""
        data = diff.encode()
        path = self.diff_path(task_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return len(data)

    def prune_diffs(self, keep: set[str]) -> None:
        """Forget the diffs of tasks no longer known (tombstones expire after days)."""
        folder = self.state_dir / "diffs"
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ files sent

    def staging(self, task_id: str, index: int) -> Path:
        if not TASK_ID.fullmatch(task_id):
            raise WorkspaceError("bad task id")
        return self.state_dir / "incoming" / task_id / str(index)

    def discard_staging(self, task_id: str) -> None:
        if TASK_ID.fullmatch(task_id):
            shutil.rmtree(self.state_dir / "incoming" / task_id, ignore_errors=True)

    def place(self, staged: Path, cwd: Path, name: str) -> Path:
        """Put a fetched file into `cwd/telegram-files/` as `name` (made unique); its path.

        Blocking (run it in a thread). The folder is resolved and checked like
        any path from the chat (a `telegram-files` symlink pointing out of the
        allowed roots is refused), then the file is created relative to the
        opened folder with O_EXCL|O_NOFOLLOW: it never replaces anything, and
        nothing swapped in after the check can redirect it.
        """
        folder = cwd / FILES_DIR
        if not folder.is_symlink():
            folder.mkdir(mode=0o755, exist_ok=True)
        real = Path(os.path.realpath(folder))
        if not self.inside(real) or not real.is_dir():
            raise WorkspaceError(f"{FILES_DIR}/ in {cwd} leads outside the allowed directories")
        dir_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            stem, dot, suffix = name.rpartition(".")
            if not dot or not stem:
                stem, dot, suffix = name, "", ""
            for n in range(1000):
                candidate = name if n == 0 else f"{stem}-{n}{dot}{suffix}"
                try:
                    _link_or_copy(staged, candidate, dir_fd)
                except FileExistsError:
                    continue
                return real / candidate
        finally:
            os.close(dir_fd)
        raise WorkspaceError(f"too many files named {name!r} in {FILES_DIR}/")


def _link_or_copy(staged: Path, name: str, dir_fd: int) -> None:
    """Make `name` (in `dir_fd`) hold `staged`'s bytes; FileExistsError if it exists."""
    try:
        os.link(staged, name, dst_dir_fd=dir_fd)  # no copy, never over an existing name
        return
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in _NO_LINK:
            raise
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as out, staged.open("rb") as src:
        shutil.copyfileobj(src, out, 1024 * 1024)


# link() refused for reasons a copy does not have: another filesystem, no hard links there.
_NO_LINK: Final = {errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
