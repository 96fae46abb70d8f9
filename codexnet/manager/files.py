"""Files between Telegram and the manager's disk.

In: a document or photo sent with a prompt is fetched with `getFile` and
`GET {telegram_api_base}/file/bot<token>/<file_path>`, streamed to
`state_dir/files/<task>/<index>` (never whole in memory) and hashed on the
way; it stays there until its task has ended, so a proxy that reconnects or
restarts can fetch it again. Telegram lets bots fetch files of up to 20 MB:
a larger one is refused before anything is fetched.

Out: a file from a machine (`/get`) or a turn's diff is written to
`state_dir/outgoing/` first and then streamed to `sendDocument` from disk;
Telegram takes documents of up to 50 MB.

The download URL holds the bot token: it is never logged, and no httpx error
text (which could name it) is passed on.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from codexnet.backoff import backoff
from codexnet.manager.store import Attachment
from codexnet.manager.telegram import TelegramClient, TelegramError

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES: Final = 20 * 1024 * 1024  # getFile's limit
MAX_UPLOAD_BYTES: Final = 50 * 1024 * 1024  # sendDocument's limit
DOWNLOAD_CHUNK: Final = 256 * 1024
DOWNLOAD_ATTEMPTS: Final = 3
DOWNLOAD_BACKOFF_S: Final = (1.0, 3.0)


class FileProblem(Exception):
    """A file cannot be used; the message is one line for the chat."""


def megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB"


def attachment_of(message: dict[str, Any]) -> Attachment | None:
    """The document or photo of a message (the largest size of a photo), if any."""
    document = message.get("document")
    if isinstance(document, dict) and isinstance(document.get("file_id"), str):
        return Attachment(
            task_id="",
            index=0,
            kind="document",
            file_id=document["file_id"],
            name=str(document.get("file_name") or ""),
            size=_size(document),
        )
    photo = message.get("photo")
    if isinstance(photo, list):
        sizes = [p for p in photo if isinstance(p, dict) and isinstance(p.get("file_id"), str)]
        if sizes:
            largest = max(sizes, key=lambda p: _int(p.get("width")) * _int(p.get("height")))
            return Attachment("", 0, "photo", largest["file_id"], "", _size(largest))
    return None


def refusal(attachment: Attachment) -> str | None:
    """Why an announced file cannot be taken at all (before anything is fetched)."""
    what = attachment.name or "The photo"
    if attachment.size > MAX_DOWNLOAD_BYTES:
        return (
            f"{what} is {megabytes(attachment.size)}; Telegram lets bots fetch files of up to "
            "20 MB, so nothing was run."
        )
    if attachment.size == 0:
        return f"{what or 'The file'} is empty; nothing was run."
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _size(file: dict[str, Any]) -> int:
    """Its announced `file_size` (optional in the Bot API: -1 when not given)."""
    size = file.get("file_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else -1


class Files:
    def __init__(self, tg: TelegramClient, http: httpx.AsyncClient, state_dir: Path) -> None:
        self._tg = tg
        self._http = http
        self._root = state_dir / "files"
        self._outgoing = state_dir / "outgoing"

    def path(self, task_id: str, index: int) -> Path:
        return self._root / task_id / str(index)

    async def discard(self, task_id: str) -> None:
        """The task has ended: its files are no longer needed."""
        await trio.to_thread.run_sync(shutil.rmtree, self._root / task_id, True)

    async def prune(self, keep: set[str]) -> None:
        """At start: files of tasks that ended while we were not looking, and leftovers."""

        def prune() -> None:
            for folder in (self._root, self._outgoing):
                if folder.is_dir():
                    for path in folder.iterdir():
                        if folder is self._outgoing or path.name not in keep:
                            shutil.rmtree(path, ignore_errors=True)

        await trio.to_thread.run_sync(prune)

    # ------------------------------------------------------------------ in

    async def download(self, attachment: Attachment) -> tuple[int, str]:
        """Fetch it from Telegram to its path; (size, sha256). Raises `FileProblem`."""
        what = attachment.name or "the photo"
        try:
            info = await self._tg.call("getFile", {"file_id": attachment.file_id})
        except TelegramError as exc:
            if exc.matches("file is too big"):
                raise FileProblem(
                    f"{what} is over 20 MB; Telegram lets bots fetch files of up to 20 MB, "
                    "so nothing was run."
                ) from None
            raise FileProblem(
                f"Could not fetch {what} from Telegram ({exc.description}); nothing was run."
            ) from None
        file_path = info.get("file_path") if isinstance(info, dict) else None
        if not isinstance(file_path, str) or not file_path:
            raise FileProblem(f"Telegram gave no download for {what}; nothing was run.")
        path = self.path(attachment.task_id, attachment.index)
        await trio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
        failures = 0
        while True:
            try:
                return await self._download_once(file_path, path, what)
            except _Retry as exc:
                failures += 1
                if failures >= DOWNLOAD_ATTEMPTS:
                    raise FileProblem(
                        f"Could not fetch {what} from Telegram ({exc}); nothing was run."
                    ) from None
                log.warning("download of a file failed (%s); trying again", exc)
                await trio.sleep(backoff(DOWNLOAD_BACKOFF_S, failures - 1))

    async def _download_once(self, file_path: str, path: Path, what: str) -> tuple[int, str]:
        sha = hashlib.sha256()
        size = 0
        expected: int | None = None
        try:
            async with (
                self._http.stream(
                    "GET", self._tg.file_url(file_path), timeout=httpx.Timeout(30.0)
                ) as response,
                await trio.open_file(path, "wb") as out,
            ):
                if response.status_code != 200:
                    raise _Retry(f"HTTP {response.status_code}")
                length = response.headers.get("content-length")
                expected = int(length) if length and length.isdigit() else None
                if expected is not None and expected > MAX_DOWNLOAD_BYTES:
                    raise FileProblem(f"{what} is over 20 MB; nothing was run.")
                async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise FileProblem(f"{what} is over 20 MB; nothing was run.")
                    sha.update(chunk)
                    await out.write(chunk)
        except httpx.HTTPError as exc:
            got = f"{megabytes(size)} of {megabytes(expected)}" if expected else megabytes(size)
            raise _Retry(f"the download broke off after {got}: {type(exc).__name__}") from None
        if expected is not None and size != expected:
            raise _Retry(f"the download stopped at {megabytes(size)} of {megabytes(expected)}")
        if size == 0:
            raise FileProblem(f"{what} is empty; nothing was run.")
        return size, sha.hexdigest()

    # ------------------------------------------------------------------ out

    def outgoing(self) -> Path:
        """A fresh path for a file on its way to the chat (the caller removes it)."""
        self._outgoing.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._outgoing / uuid.uuid4().hex


class _Retry(Exception):
    """A download failed in a way another attempt may not."""
