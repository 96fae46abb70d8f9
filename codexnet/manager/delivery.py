"""A finished task's answer, delivered from the store until every part is in the chat.

The outcome is in the journal before the proxy is told it may forget it; from
there the answer is rendered (deterministically, so a restart resumes at the
same part), and each part is sent and then counted in the store. A part is
retried with backoff while Telegram is unreachable or failing, across
restarts, until `delivery_give_up_s` after the task finished; only when every
part is accepted (or given up, which is logged) does the task leave the
journal. The live view's status message is closed with the task's final line
after the answer (an idempotent edit), and before the task leaves the journal:
under load the chats' answers go before any status line (`deliver`), and a
restart in between still closes the view.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Final

import trio

from codexnet.manager.approvals import Approvals
from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.liveview import LiveView
from codexnet.manager.outbox import Abandoned
from codexnet.manager.render import Chunk
from codexnet.manager.replies import DOCUMENT_AFTER_PARTS, Replies, answer_parts, plain_parts
from codexnet.manager.store import ManagerStore, Outcome, TaskRecord
from codexnet.manager.telegram import TelegramError

log = logging.getLogger(__name__)

NO_ANCHOR: Final = -1  # delivery began without a known message id to look after

FINISH_LINES: Final = {
    "completed": "✅ Done",
    "interrupted": "⏹ Cancelled",
    "timeout": "⏱ Timed out",
    "failed": "⚠️ Failed",
}


def describe_outcome(outcome: Outcome) -> str:
    """The text the chat gets for a finished task."""
    if outcome.line:
        return outcome.line
    text = outcome.text.strip()
    if outcome.status == "completed":
        return text or "(Codex finished without a text answer.)"
    if outcome.status == "interrupted":
        head = "⏹ Cancelled."
    elif outcome.status == "timeout":
        head = f"⏱ Timed out: {outcome.error}."
    else:
        head = f"⚠️ Codex failed: {outcome.error or 'unknown error'}"
    return f"{head}\n\n{text}" if text else head


def diff_keyboard(key: str) -> dict[str, Any]:
    return {"inline_keyboard": [[{"text": "📄 Diff", "callback_data": f"d:{key}"}]]}


def wall_to_trio(wall: float) -> float:
    """A wall-clock instant on trio's clock (state survives restarts in wall time)."""
    return trio.current_time() - (time.time() - wall)


class Delivery:
    def __init__(
        self,
        store: ManagerStore,
        replies: Replies,
        approvals: Approvals,
        grace: ShutdownGrace,
        *,
        give_up_s: float,
    ) -> None:
        self._store = store
        self._replies = replies
        self._outbox = replies.outbox
        self._approvals = approvals
        self._grace = grace
        self._give_up_s = give_up_s

    async def deliver(self, task: TaskRecord, view: LiveView | None) -> None:
        outcome = task.outcome
        assert outcome is not None
        assert task.finished is not None
        until = wall_to_trio(task.finished + self._give_up_s)
        await self._approvals.expire_task(task)
        # A turn that changed files offers its diff: on the final status line, or
        # (a quick task shows none) on the last part of the answer.
        diff = diff_keyboard(task.diff_key) if task.diff_key else None
        on_view = view is not None and view.status_message_id is not None
        text = describe_outcome(outcome)
        if task.notice:  # a failover, or an /all answer: its first line says where
            text = f"{task.notice}\n\n{text}"
        parts = plain_parts(text) if outcome.line else answer_parts(text)
        last_markup = None if on_view else diff
        with_document = len(parts) > DOCUMENT_AFTER_PARTS
        total = len(parts) + int(with_document)
        # A previous run was sending the next part when it stopped: it may have
        # gone out without being counted. It is looked for in the chat (after
        # the anchor) before it is sent again.
        resumed = task.delivery_anchor is not None
        first = task.parts_sent
        for index in range(first, total):
            # Sending a part and counting it go together: a shutdown in between
            # would send it again after the restart.
            with self._grace.protect() as step:
                message_id: int | None = None
                if index < len(parts):
                    part = parts[index]
                    markup = last_markup if index == len(parts) - 1 else None
                    if resumed and index == first:
                        message_id = await self._already_posted(task, part, markup)
                    if message_id is None:
                        sent = await self._replies.send_answer_part(
                            task.chat_id,
                            part,
                            topic=task.topic,
                            until=until,
                            reply_markup=markup,
                            before_request=partial(self._anchor, task, index),
                        )
                        if isinstance(sent, Abandoned):
                            return  # shutting down before it went out: the next start sends it
                        message_id = sent
                    ok = message_id is not None
                else:
                    ok = await self._replies.send_document(
                        task.chat_id,
                        "answer.md",
                        (outcome.text if outcome.status == "completed" else text).encode(),
                        f"The whole answer ({len(parts)} messages above).",
                        topic=task.topic,
                        until=until,
                    )
                if not ok:
                    log.error(
                        "chat %s: gave up on part %d/%d of task %s's answer",
                        task.chat_id,
                        index + 1,
                        total,
                        task.task_id,
                    )
                if index + 1 == total and not on_view:
                    await self._store.mark_done(task, index + 1)  # one write for both
                    return
                await self._store.mark_parts_sent(task, index + 1, None)
            if step.cancelled_caught:
                return  # shutting down: the next start resumes at the part not yet counted
        if on_view:
            assert view is not None
            # After the answer: when the bot's budget is the bottleneck (many chats
            # ending at once), every chat's answer goes before any status line,
            # instead of each answer waiting behind its own chat's edit. Before
            # the task leaves the journal: a restart in between still closes it.
            with self._grace.protect() as step:
                await view.finish(
                    FINISH_LINES.get(outcome.status, "⚠️ Failed"), until=until, markup=diff
                )
            if step.cancelled_caught:
                return  # shutting down: the next start closes the view from here
        await self._store.mark_done(task)

    async def _anchor(self, task: TaskRecord, index: int, last: int | None) -> None:
        """Part `index` goes out now, in the chat's turn: stored first with the chat's
        newest message id, the only message of ours after which can be this part.

        Unknown (nothing posted or received in the chat since this process
        started), there is no safe anchor: the task's own prompt may be older than
        answers posted before a restart, which the check after the next restart
        would take for this part (and edit). Then a part whose fate a restart
        made unknown is sent again: a duplicate at worst.
        """
        await self._store.mark_parts_sent(task, index, NO_ANCHOR if last is None else last)

    async def _already_posted(
        self, task: TaskRecord, part: Chunk, markup: dict[str, Any] | None
    ) -> int | None:
        anchor = task.delivery_anchor
        if anchor is None or anchor == NO_ANCHOR:
            return None  # nothing known to look after: send it (a duplicate at worst)
        params: dict[str, Any] = {"chat_id": task.chat_id, "text": part.text}
        if part.entities:
            params["entities"] = list(part.entities)
        if markup is not None:
            params["reply_markup"] = markup
        try:
            found = await self._outbox.find_posted(params, after=anchor)
        except TelegramError:
            return None
        if found is None:
            return None
        log.info(
            "chat %s: part of task %s was posted before the restart", task.chat_id, task.task_id
        )
        message_id = found.get("message_id")
        return message_id if isinstance(message_id, int) else None
