"""One live view per running task: what the agent is doing, as it happens.

Two ways to show it, chosen per chat:

* **draft** (private chats): a status message with the **Cancel** button is
  sent once; the streaming text goes into `sendMessageDraft`, Telegram's
  animated preview. A draft vanishes after ~30 s without an update, so it is
  refreshed at least every `DRAFT_KEEPALIVE_S`.
* **edit** (groups, or where Telegram refuses drafts): the status message
  itself is edited in place, text and button together.

Whatever the mode: at most one update per chat per `interval` (1 s private,
3 s groups), the newest text replaces any pending one (the outbox coalesces
updates of one message), an update that would not change what the chat shows
is not sent, and a 429 is never retried — the chat is paused for
`retry_after`, and the next tick sends the newest text instead of the stale one.

The status message's id and its Cancel key are in the store (on the task's
row): after a manager restart the view is picked up again — same message, the
clock still counting from the task's start, the button still working — and
finished with its final line when the task ends.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, Final

import trio

from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.outbox import Outbox, Priority
from codexnet.manager.replies import in_topic, thread_gone
from codexnet.manager.telegram import NO_KEYBOARD, RetryAfter, TelegramError

log = logging.getLogger(__name__)

TAIL_CHARS: Final = 3500  # of the answer so far; leaves room for the header under 4096
ELAPSED_STEP_S: Final = 5  # the clock in the header moves in 5 s steps: fewer pointless edits
DRAFT_KEEPALIVE_S: Final = 20.0
STATUS_RETRY_S: Final = 30.0
# A quick answer needs no live view: the view appears only once a task has run
# this long, so a one-second answer costs one message, not four requests.
SHOW_AFTER_S: Final = 1.0


def format_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def cancel_keyboard(data: str) -> dict[str, Any]:
    return {"inline_keyboard": [[{"text": "⏹ Cancel", "callback_data": data}]]}


class LiveView:
    def __init__(
        self,
        outbox: Outbox,
        chat_id: int,
        proxy_id: str,
        *,
        interval: float,
        use_draft: bool,
        cancel_data: str,
        started: float | None = None,
        message_id: int | None = None,
        on_message: Callable[[int | None], None] = lambda message_id: None,
        on_draft_refused: Callable[[], None] = lambda: None,
        grace: ShutdownGrace | None = None,
        topic: int = 0,
    ) -> None:
        self._outbox = outbox
        self.chat_id = chat_id
        self.topic = topic  # forum topic: the status message and drafts go there
        self.proxy_id = proxy_id
        self.interval = interval
        self.use_draft = use_draft
        self._cancel_data = cancel_data
        self._on_message = on_message
        self._on_draft_refused = on_draft_refused
        self._grace = grace if grace is not None else ShutdownGrace(0)
        self._draft_id = random.randint(1, 2**31 - 1)
        self.started = trio.current_time() if started is None else started
        self._changed = trio.Event()
        self.text = ""
        self.step = "starting"
        self.status_message_id = message_id
        self.last_shown = ""

    # -------------------------------------------------------------- inputs

    def update(self, text: str, step: str) -> None:
        """New state from the task (called on every event; cheap)."""
        if text == self.text and (step or self.step) == self.step:
            return
        self.text = text
        self.step = step or self.step
        self._changed.set()

    def render(self) -> str:
        elapsed = (trio.current_time() - self.started) // ELAPSED_STEP_S * ELAPSED_STEP_S
        header = f"⏳ {self.proxy_id} · {format_elapsed(max(0, elapsed))} · {self.step}"
        body = self.text.strip()
        if len(body) > TAIL_CHARS:
            body = "…" + body[-TAIL_CHARS:]
        return f"{header}\n\n{body}" if body else header

    # -------------------------------------------------------------- the loop

    async def run(self) -> None:
        """After `SHOW_AFTER_S`, send the status message; keep the view fresh until cancelled."""
        if self.status_message_id is None:
            await trio.sleep_until(self.started + SHOW_AFTER_S)
            await self._send_status("⏳ Working on it…" if self.use_draft else self.render())
        next_allowed = trio.current_time() + self.interval
        last_draft = -DRAFT_KEEPALIVE_S
        while True:
            # Wake on news, or when the clock in the header ticks / a draft needs keeping alive.
            with trio.move_on_after(ELAPSED_STEP_S):
                await self._changed.wait()
            self._changed = trio.Event()
            await trio.sleep_until(next_allowed)
            shown = self.render()
            keepalive = self.use_draft and trio.current_time() - last_draft >= DRAFT_KEEPALIVE_S
            if shown == self.last_shown and not keepalive:
                continue
            if await self._show(shown):
                self.last_shown = shown
                last_draft = trio.current_time()
            next_allowed = trio.current_time() + self.interval

    async def _show(self, shown: str) -> bool:
        if self.use_draft:
            try:
                await self._outbox.send(
                    "sendMessageDraft",
                    {
                        "chat_id": self.chat_id,
                        **in_topic(self.topic),
                        "draft_id": self._draft_id,
                        "text": shown,
                    },
                    priority=Priority.LIVE,
                    coalesce=("draft", self.chat_id, self._draft_id),
                )
                return True
            except RetryAfter:
                return False  # the chat is paused; the next tick sends the newest text
            except TelegramError as exc:
                if exc.code in (400, 404):
                    # This chat (or this Bot API server) does not take drafts: edit instead.
                    log.info(
                        "chat %s: drafts refused (%s); editing a message instead",
                        self.chat_id,
                        exc.description,
                    )
                    self.use_draft = False
                    self._on_draft_refused()
                    return await self._show(shown)
                return False  # 5xx, network: the next tick tries again
        return await self._edit(shown, cancel_keyboard(self._cancel_data))

    async def _send_status(self, text: str, keyboard: bool = True) -> None:
        # Sending it and remembering its id go together: a status message whose
        # id is lost would stay behind, "⏳" forever, after a restart.
        with self._grace.protect():
            await self._send_status_now(text, keyboard)

    async def _send_status_now(self, text: str, keyboard: bool) -> None:
        try:
            message = await self._outbox.send(
                "sendMessage",
                {
                    "chat_id": self.chat_id,
                    **in_topic(self.topic),
                    "text": text,
                    "reply_markup": cancel_keyboard(self._cancel_data) if keyboard else None,
                },
                priority=Priority.LIVE,
                until=trio.current_time() + STATUS_RETRY_S,
                on_unknown="probe",
            )
        except TelegramError as exc:
            if self.topic and thread_gone(exc):
                log.warning("chat %s: topic %s is gone; using the chat", self.chat_id, self.topic)
                self.topic = 0
                await self._send_status_now(text, keyboard)
                return
            log.warning(
                "chat %s: could not send the status message: %s", self.chat_id, exc.description
            )
            return
        if isinstance(message, dict) and isinstance(message.get("message_id"), int):
            self.status_message_id = message["message_id"]
            self._on_message(self.status_message_id)

    async def _edit(self, text: str, markup: dict[str, Any], *, until: float | None = None) -> bool:
        if self.status_message_id is None:
            await self._send_status(text, keyboard=bool(markup["inline_keyboard"]))
            return self.status_message_id is not None
        try:
            await self._outbox.send(
                "editMessageText",
                {
                    "chat_id": self.chat_id,
                    "message_id": self.status_message_id,
                    "text": text,
                    "reply_markup": markup,
                },
                priority=Priority.LIVE if until is None else Priority.ANSWER,
                until=until,
                # Live updates replace each other; the final line must not ride on
                # a one-attempt live update, so it never coalesces.
                coalesce=None
                if until is not None
                else ("edit", self.chat_id, self.status_message_id),
            )
            return True
        except TelegramError as exc:
            if exc.matches("message to edit not found"):
                self.status_message_id = None  # the person deleted it: send a new one
                self._on_message(None)
                if until is not None:
                    return False  # a final line for a deleted message is not worth a new one
                return await self._edit(text, markup)
            log.debug("chat %s: live edit skipped: %s", self.chat_id, exc.description)
            return False

    async def finish(
        self, line: str, *, until: float, markup: dict[str, Any] | None = None
    ) -> None:
        """The task ended: the status message becomes one line, without the Cancel
        button (with `markup` instead, e.g. the Diff button)."""
        elapsed = format_elapsed(max(0.0, trio.current_time() - self.started))
        text = f"{line} · {self.proxy_id} · {elapsed}"
        if self.status_message_id is not None:  # a quick task never showed a view
            await self._edit(text, markup or NO_KEYBOARD, until=until)
