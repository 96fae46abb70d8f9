"""Codex approval requests as Telegram buttons: Approve, Approve for session, Deny.

Each question is keyed by (task, approval id): however often the proxy sends
it again (it does after every reconnect while the question is open), the chat
gets it once. It is stored before it is asked, with an unguessable button key
(`a:<key>:<choice>`, a few bytes; Telegram allows 64), so its buttons keep
working across a manager restart, and the timeout keeps counting from when it
was first asked.

The first allowed person to press decides, in the chat the question is in.
The decision is stored, then sent to the proxy, and sent again after every
reconnect until the proxy acknowledges it; the message is edited to say who
decided what. A stale or repeated press gets a short toast. With no answer
within `timeout_s` the request is denied, and the chat says so.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.outbox import Outbox, Priority
from codexnet.manager.render import Chunk
from codexnet.manager.replies import Replies
from codexnet.manager.store import ApprovalRecord, ManagerStore, TaskRecord
from codexnet.manager.telegram import NO_KEYBOARD, TelegramError
from codexnet.protocol import ApprovalRequest

log = logging.getLogger(__name__)

CHOICES: Final = {
    "y": ("accept", "✅ Approved"),
    "s": ("acceptForSession", "✅ Approved for this session"),
    "n": ("decline", "🚫 Denied"),
}
STALE: Final = "This request is no longer pending."
NOT_HERE: Final = "This button belongs to another chat."
ENDED: Final = "The task ended before an answer."

SendDecision = Callable[[ApprovalRecord], Awaitable[None]]


def describe(kind: str, summary: str, detail: str) -> str:
    if kind == "command":
        head = f"🔐 Codex wants to run:\n\n{summary}"
    elif kind in ("file_change", "permissions"):
        head = f"🔐 Codex wants to {summary}"
    elif kind == "elicitation":
        head = f"🔐 A tool asks: {summary}"
    else:
        head = f"🔐 Codex asks for approval: {summary}"
    return f"{head}\n\n{detail}" if detail else head


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


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


class Approvals:
    def __init__(
        self,
        replies: Replies,
        store: ManagerStore,
        send_decision: SendDecision,
        *,
        timeout_s: float,
        is_online: Callable[[str], bool],
        grace: ShutdownGrace | None = None,
    ) -> None:
        self._replies = replies
        self._outbox: Outbox = replies.outbox
        self._store = store
        self._send_decision = send_decision
        self._is_online = is_online
        self._grace = grace if grace is not None else ShutdownGrace(0)
        self.timeout_s = timeout_s
        self._decided: dict[str, trio.Event] = {}  # key → set once decided or closed
        self.nursery: trio.Nursery | None = None

    def resume(self) -> None:
        """After a restart: keep every stored question answerable and timed."""
        for approval in list(self._store.approvals.values()):
            self._spawn(approval)

    def _spawn(self, approval: ApprovalRecord) -> None:
        assert self.nursery is not None
        self._decided.setdefault(approval.key, trio.Event())
        if approval.state == "open":
            self.nursery.start_soon(self._ask, approval)
        elif approval.state == "decided":
            self.nursery.start_soon(self._close, approval)

    async def on_request(self, task: TaskRecord, request: ApprovalRequest) -> None:
        """The proxy asks (maybe again, after a reconnect): one question in the chat."""
        if self._store.approval(task.task_id, request.approval_id) is not None:
            return  # already asked
        approval = ApprovalRecord(
            task_id=task.task_id,
            approval_id=request.approval_id,
            key=secrets.token_urlsafe(9),
            chat_id=task.chat_id,
            topic=task.topic,
            kind=request.kind,
            summary=request.summary,
            detail=request.detail,
            asked=time.time(),
        )
        await self._store.add_approval(approval)
        self._spawn(approval)

    async def _ask(self, approval: ApprovalRecord) -> None:
        """Post the question (unless a previous run did), then wait for a press or the timeout."""
        remaining = approval.asked + self.timeout_s - time.time()
        deadline = trio.current_time() + max(0.0, remaining)
        if approval.message_id is None:
            # Asking and remembering the message go together: a question whose
            # message id is lost would be asked again after a restart.
            with self._grace.protect():
                approval.message_id = await self._replies.send_part(
                    approval.chat_id,
                    _chunk(describe(approval.kind, approval.summary, approval.detail)),
                    topic=approval.topic,
                    priority=Priority.APPROVAL,
                    until=deadline,
                    reply_markup=keyboard(approval.key),
                )
                await self._store.save_approval(approval, wait=False)
        decided = self._decided[approval.key]
        with trio.move_on_at(deadline):
            await decided.wait()
        if approval.state == "open":
            await self.decide(
                approval,
                "decline",
                f"⌛ No answer within {_minutes(self.timeout_s)}: denied.",
            )

    async def decide(self, approval: ApprovalRecord, decision: str, outcome: str) -> None:
        """Record the decision; hand it to the proxy and close the question in the background.

        Only the store is waited for: a press is handled in the bot's update
        loop, and the edit may wait seconds for a busy group's send budget
        (and the proxy's socket for a slow link). Both are resumed after a
        restart from the stored state.
        """
        approval.state, approval.decision, approval.outcome = "decided", decision, outcome
        self._decided.setdefault(approval.key, trio.Event()).set()
        await self._store.save_approval(approval)  # durable before it is sent
        assert self.nursery is not None
        self.nursery.start_soon(self._send_and_close, approval)

    async def _send_and_close(self, approval: ApprovalRecord) -> None:
        await self._send_decision(approval)
        await self._close(approval)

    async def expire_task(self, task: TaskRecord) -> None:
        """The task ended: its open questions are moot; decided ones are closed."""
        for approval in list(self._store.approvals_of(task.task_id)):
            if approval.state == "open":
                approval.state, approval.outcome = "decided", ENDED
                approval.decision_acked = True  # nothing to send: the turn is over
                self._decided.setdefault(approval.key, trio.Event()).set()
                await self._close(approval)

    async def on_press(self, query: dict[str, Any], key: str, choice: str) -> None:
        """A button press from an allowed user (the caller checked who pressed)."""
        approval = self._store.approvals.get(key)
        chat = ((query.get("message") or {}).get("chat") or {}).get("id")
        if approval is None or approval.state != "open" or choice not in CHOICES:
            self._replies.toast(query, STALE)
            return
        if chat != approval.chat_id:
            log.warning(
                "approval button of chat %s pressed in chat %s: refused", approval.chat_id, chat
            )
            self._replies.toast(query, NOT_HERE)
            return
        decision, label = CHOICES[choice]
        task = self._store.tasks.get(approval.task_id)
        offline = (
            task is not None and task.proxy_id is not None and not self._is_online(task.proxy_id)
        )
        self._replies.toast(
            query,
            f"{label} (the machine is offline; it gets this when it is back)" if offline else label,
        )
        await self.decide(approval, decision, f"{label} by {_who(query.get('from') or {})}.")

    async def _close(self, approval: ApprovalRecord) -> None:
        """Edit the question into its outcome and drop its buttons (retried for a while)."""
        outcome = approval.outcome or STALE
        until = trio.current_time() + self.timeout_s
        text = f"{describe(approval.kind, approval.summary, approval.detail)}\n\n{outcome}"
        if approval.message_id is not None:
            try:
                await self._outbox.send(
                    "editMessageText",
                    {
                        "chat_id": approval.chat_id,
                        "message_id": approval.message_id,
                        "text": text,
                        "reply_markup": NO_KEYBOARD,
                    },
                    priority=Priority.APPROVAL,
                    until=until,
                )
            except TelegramError as exc:
                log.info("approval message edit failed (%s); sending the outcome", exc.description)
                await self._replies.send_text(
                    approval.chat_id, outcome, topic=approval.topic, until=until
                )
        approval.state = "closed"
        await self._store.save_approval(approval, wait=False)


def _chunk(text: str) -> Chunk:
    return Chunk(text[:4000])  # an approval question is one message, whatever the command
