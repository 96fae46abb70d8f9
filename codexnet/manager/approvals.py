"""Codex approval requests as Telegram buttons: Approve, Approve for session, Deny.

The question goes to the task's chat with three buttons whose `callback_data`
is `a:<key>:<choice>` (a few bytes; Telegram allows 64). The first allowed
person to press decides; the decision goes back to the app-server through the
proxy, and the message is edited to say who decided what. A stale or
repeated press gets a short toast. With no answer within `timeout_s` the
request is denied, and the chat says so.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio

from codexnet.manager.telegram import NO_KEYBOARD, TelegramClient, TelegramError
from codexnet.protocol import ApprovalRequest

log = logging.getLogger(__name__)

CHOICES: Final = {
    "y": ("accept", "✅ Approved"),
    "s": ("acceptForSession", "✅ Approved for this session"),
    "n": ("decline", "🚫 Denied"),
}
STALE: Final = "This request is no longer pending."

Decide = Callable[[str, str, str], Awaitable[bool]]  # (task_id, approval_id, decision)


@attrs.define(eq=False)
class _Pending:
    chat_id: int
    request: ApprovalRequest
    text: str
    message_id: int | None = None
    decided: trio.Event = attrs.Factory(trio.Event)


def describe(request: ApprovalRequest) -> str:
    if request.kind == "command":
        head = f"🔐 Codex wants to run:\n\n{request.summary}"
    elif request.kind in ("file_change", "permissions"):
        head = f"🔐 Codex wants to {request.summary}"
    elif request.kind == "elicitation":
        head = f"🔐 A tool asks: {request.summary}"
    else:
        head = f"🔐 Codex asks for approval: {request.summary}"
    return f"{head}\n\n{request.detail}" if request.detail else head


def keyboard(key: str) -> dict[str, Any]:
    return {
        "inline_keyboard": [
            [
                {"text": "✅ Approve", "callback_data": f"a:{key}:y"},
                {"text": "✅ For session", "callback_data": f"a:{key}:s"},
                {"text": "🚫 Deny", "callback_data": f"a:{key}:n"},
            ]
        ]
    }


def _who(user: dict[str, Any]) -> str:
    if user.get("username"):
        return f"@{user['username']}"
    return str(user.get("first_name") or user.get("id"))


class Approvals:
    def __init__(self, tg: TelegramClient, decide: Decide, *, timeout_s: float) -> None:
        self._tg = tg
        self._decide = decide
        self.timeout_s = timeout_s
        self._keys = (format(n, "x") for n in itertools.count(1))
        self._pending: dict[str, _Pending] = {}

    async def ask(self, chat_id: int, request: ApprovalRequest) -> None:
        """Ask the chat and wait for a press or the timeout (run as a background task)."""
        key = next(self._keys)
        pending = _Pending(chat_id, request, describe(request))
        self._pending[key] = pending
        try:
            try:
                message = await self._tg.call(
                    "sendMessage",
                    {"chat_id": chat_id, "text": pending.text, "reply_markup": keyboard(key)},
                )
                pending.message_id = message["message_id"]
            except TelegramError as exc:
                log.error("chat %s: could not ask for approval: %s", chat_id, exc.description)
            with trio.move_on_after(self.timeout_s):
                await pending.decided.wait()
            if not pending.decided.is_set():
                pending.decided.set()
                minutes = (
                    f"{self.timeout_s / 60:g} min"
                    if self.timeout_s >= 60
                    else (f"{self.timeout_s:g} s")
                )
                await self._decide(request.task_id, request.approval_id, "decline")
                await self._close(pending, f"⌛ No answer within {minutes}: denied.")
        finally:
            del self._pending[key]

    async def expire_task(self, task_id: str) -> None:
        """The task ended: its open questions are moot."""
        for pending in list(self._pending.values()):
            if pending.request.task_id == task_id and not pending.decided.is_set():
                pending.decided.set()
                await self._close(pending, "The task ended before an answer.")

    async def on_press(self, query: dict[str, Any], key: str, choice: str) -> None:
        """A button press from an allowed user (the caller checked who pressed)."""
        pending = self._pending.get(key)
        if pending is None or pending.decided.is_set() or choice not in CHOICES:
            await self._tg.toast(query, STALE)
            return
        pending.decided.set()
        decision, label = CHOICES[choice]
        delivered = await self._decide(
            pending.request.task_id, pending.request.approval_id, decision
        )
        if not delivered:
            await self._tg.toast(
                query, "The machine is offline; the request could not be answered."
            )
            await self._close(pending, "⚠️ Could not deliver the decision: the proxy is offline.")
            return
        await self._tg.toast(query, label)
        await self._close(pending, f"{label} by {_who(query.get('from') or {})}.")

    async def _close(self, pending: _Pending, outcome: str) -> None:
        if pending.message_id is None:
            await self._send(pending.chat_id, outcome)
            return
        try:
            await self._tg.call(
                "editMessageText",
                {
                    "chat_id": pending.chat_id,
                    "message_id": pending.message_id,
                    "text": f"{pending.text}\n\n{outcome}",
                    "reply_markup": NO_KEYBOARD,
                },
            )
        except TelegramError as exc:
            log.info("approval message edit failed (%s); sending the outcome", exc.description)
            await self._send(pending.chat_id, outcome)

    async def _send(self, chat_id: int, text: str) -> None:
        try:
            await self._tg.call("sendMessage", {"chat_id": chat_id, "text": text})
        except TelegramError as exc:
            log.error("chat %s: %s", chat_id, exc.description)
