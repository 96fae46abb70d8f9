"""The Telegram side of the manager: long-poll updates, access control, dispatch.

`Bot.run` calls `deleteWebhook` (a set webhook makes getUpdates fail with 409),
registers the command menu, then long-polls `getUpdates`.

Each batch of updates is handled chat by chat, concurrently (one chat's
updates in order), and no handler waits for Telegram: their durable effects
(a journalled prompt, a decision, a /use) are written to the store — group
committed, a few milliseconds — and replies go out through the outbox in the
background. Only when the whole batch is handled is the offset saved and
confirmed to Telegram with the next poll; a prompt redelivered after a crash
in between is recognised by its update id and not run twice. If the store
cannot be written, the offset stays where it is and the batch is fetched
again later: Telegram keeps it for 24 hours.

Every update is checked first (`updates.py`): a malformed one is skipped with
one WARNING, and its update id still moves the offset on. Strangers get one
refusal per chat per hour, sent behind everything the owner is sent, and at
most REFUSALS_PER_MINUTE in all; the log says so once per chat, not per message.

A 409 (another instance polls with this token) never stops the manager: it
keeps polling with backoff and says so once a minute.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

import trio

from codexnet.backoff import backoff
from codexnet.config import ManagerConfig
from codexnet.db import StateError
from codexnet.manager.chat_context import Context, topic_of
from codexnet.manager.commands import ChatCommands
from codexnet.manager.conversation import Conversations
from codexnet.manager.files import attachment_of, refusal
from codexnet.manager.outbox import Outbox, Priority
from codexnet.manager.replies import Replies
from codexnet.manager.store import Attachment, ManagerStore, TaskRecord
from codexnet.manager.telegram import (
    RetryAfter,
    TelegramClient,
    TelegramConflict,
    TelegramError,
    TelegramFatal,
    TelegramUnavailable,
    log_unavailable,
)
from codexnet.manager.updates import Malformed, excerpt, parse_update, update_id_of

log = logging.getLogger(__name__)

POLL_BACKOFF_S: Final = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
CONFLICT_BACKOFF_S: Final = (3.0, 5.0, 10.0, 20.0, 30.0)
CONFLICT_LOG_EVERY_S: Final = 60.0
CONFIRM_TIMEOUT_S: Final = 5.0
REFUSE_EVERY_S: Final = 3600.0  # a stranger is told at most once an hour per chat
# Strangers told in all chats together, per minute: thousands of them must not
# spend the send budget the owner's replies need (the rest are not told, yet).
REFUSALS_PER_MINUTE: Final = 20
ALLOWED_UPDATES: Final = ["message", "callback_query"]
# How long a batch's fsync waits for the tasks it dispatched to be acknowledged (see _sync).
SYNC_AFTER_ACKS_S: Final = 0.02


class Bot:
    def __init__(
        self,
        config: ManagerConfig,
        tg: TelegramClient,
        outbox: Outbox,
        store: ManagerStore,
        replies: Replies,
        conversations: Conversations,
        commands: ChatCommands,
    ) -> None:
        self._config = config
        self._tg = tg
        self._outbox = outbox
        self._store = store
        self._replies = replies
        self._conversations = conversations
        self._commands = commands
        self.username = ""
        self._told = RecentlyDone(REFUSE_EVERY_S)  # chats where a stranger was told
        self._presses_logged = RecentlyDone(REFUSE_EVERY_S)  # chats of logged stranger presses
        self._refusals = RecentlyDone(60.0)  # refusals sent in the last minute (by chat)
        self._refusals_held = 0  # strangers not told because of REFUSALS_PER_MINUTE
        self._conflict_logged = -CONFLICT_LOG_EVERY_S
        self._dispatched: list[TaskRecord] = []  # this batch's prompts sent to a proxy at once

    async def start_up(self) -> None:
        """deleteWebhook, getMe, setMyCommands; retried while Telegram is unreachable.

        At boot the network may not be up yet: keep trying (the hub already
        serves proxies meanwhile). A wrong token is fatal at once.
        """
        failures = 0
        while True:
            try:
                await self._tg.call("deleteWebhook", {"drop_pending_updates": False})
                me = await self._tg.call("getMe")
                self.username = str(me.get("username", ""))
                await self._tg.call("setMyCommands", {"commands": self._commands.menu()})
                break
            except TelegramFatal:
                raise
            except TelegramError as exc:
                delay = backoff(POLL_BACKOFF_S, failures)
                failures += 1
                log.warning("Telegram start-up failed (%s); retrying in %.0f s", exc, delay)
                await trio.sleep(delay)
        log.info(
            "Telegram bot @%s ready; %d user(s) allowed",
            self.username,
            len(self._config.telegram_allowed_user_ids),
        )

    async def poll(self) -> None:
        """Long-poll until cancelled; on the way out confirm the offset to Telegram."""
        offset = self._store.offset
        failures = 0
        try:
            while True:
                timeout = self._config.telegram_poll_timeout_s
                try:
                    updates = await self._tg.request(
                        "getUpdates",
                        {"offset": offset, "timeout": timeout, "allowed_updates": ALLOWED_UPDATES},
                        read_timeout=timeout + 15,
                    )
                except TelegramFatal:
                    raise
                except TelegramConflict as exc:
                    delay = backoff(CONFLICT_BACKOFF_S, failures)
                    failures += 1
                    self._log_conflict(exc, delay)
                    await trio.sleep(delay)
                    continue
                except RetryAfter as exc:
                    await trio.sleep(exc.retry_after)
                    continue
                except TelegramUnavailable as exc:
                    delay = backoff(POLL_BACKOFF_S, failures)
                    failures += 1
                    log_unavailable(
                        log,
                        exc,
                        "getUpdates failed (%s); retrying in %.0f s",
                        exc.description,
                        delay,
                    )
                    await trio.sleep(delay)
                    continue
                except TelegramError as exc:
                    delay = backoff(POLL_BACKOFF_S, failures)
                    failures += 1
                    log.warning(
                        "getUpdates failed (%s); retrying in %.0f s", exc.description, delay
                    )
                    await trio.sleep(delay)
                    continue
                failures = 0
                batch, newest = self._check_batch(updates)
                if newest is None:
                    continue
                if await self._handle_batch(batch) and await self._sync():
                    offset = newest + 1
                    # Queued, not awaited: the batch's effects would survive a
                    # power cut already, and an offset lost in a crash only means
                    # updates redelivered (a prompt among them gets the same task
                    # id again, and is recognised).
                    self._store.save_offset_soon(offset)
                else:
                    await trio.sleep(backoff(POLL_BACKOFF_S, 3))
        finally:
            if offset is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CONFIRM_TIMEOUT_S):
                    await self._confirm(offset)

    @staticmethod
    def _check_batch(updates: object) -> tuple[list[dict[str, Any]], int | None]:
        """The well-formed updates, and the newest update id (malformed ones count too).

        A malformed update is skipped with one WARNING; its id still moves the
        offset on, or Telegram would hand it out again and again.
        """
        if not isinstance(updates, list):
            log.warning("getUpdates returned %s, not a list; ignored", excerpt(updates))
            return [], None
        batch: list[dict[str, Any]] = []
        newest: int | None = None
        for raw in updates:
            update_id = update_id_of(raw)
            if update_id is not None:
                newest = update_id if newest is None else max(newest, update_id)
            try:
                batch.append(parse_update(raw))
            except Malformed as exc:
                log.warning(
                    "update %s skipped: %s: %s",
                    "?" if update_id is None else update_id,
                    exc,
                    excerpt(raw),
                )
        return batch, newest

    def _log_conflict(self, exc: TelegramError, delay: float) -> None:
        now = trio.current_time()
        if now - self._conflict_logged >= CONFLICT_LOG_EVERY_S:
            self._conflict_logged = now
            log.warning(
                "another instance is polling this bot token (Telegram: %s); "
                "still trying every %.0f s — stop the other one",
                exc.description,
                delay,
            )

    async def _sync(self) -> bool:
        """Make the batch's effects survive a power cut before Telegram forgets the updates.

        The next getUpdates confirms them; one fsync for the whole batch. It
        waits first, at most `SYNC_AFTER_ACKS_S`, until the proxies have
        acknowledged the prompts the batch sent them: each stores its task
        with an fsync of its own before the turn starts, and where a proxy
        shares this machine's disk (the usual one-machine set-up) two fsyncs
        at once both take about one disk commit longer. Theirs is on the way
        to the answer; ours only holds back the next getUpdates.
        """
        dispatched, self._dispatched = self._dispatched, []
        with trio.move_on_after(SYNC_AFTER_ACKS_S):
            for task in dispatched:
                while task.state == "sent":
                    await task.changed.wait()
        try:
            await self._store.db.sync()
        except StateError as exc:
            log.error("%s; these updates will be fetched again", exc)
            return False
        return True

    async def _confirm(self, offset: int) -> None:
        """Tell Telegram the last offset, so these updates are not redelivered."""
        try:
            await self._tg.request("getUpdates", {"offset": offset, "timeout": 0, "limit": 1})
        except TelegramError as exc:
            log.info("could not confirm the update offset on shutdown: %s", exc.description)

    async def _handle_batch(self, updates: list[dict[str, Any]]) -> bool:
        """Handle one batch, chat by chat; False if some effect could not be stored."""
        self._dispatched = []
        by_chat: dict[object, list[dict[str, Any]]] = {}
        for update in updates:
            by_chat.setdefault(_chat_of(update), []).append(update)
        failed: list[StateError] = []

        async def chat_updates(batch: list[dict[str, Any]]) -> None:
            for update in batch:
                try:
                    await self._dispatch(update)
                except StateError as exc:
                    failed.append(exc)
                    return  # the rest of this chat's updates keep their order: all again later

        async with trio.open_nursery() as nursery:
            for batch in by_chat.values():
                nursery.start_soon(chat_updates, batch)
        if failed:
            log.error("%s; these updates will be fetched again", failed[0])
        return not failed

    async def _dispatch(self, update: dict[str, Any]) -> None:
        """Error boundary around one update (a StateError goes up: it is retried)."""
        try:
            if "message" in update:
                await self._on_message(update["message"], int(update["update_id"]))
            elif "callback_query" in update:
                await self._on_callback(update["callback_query"])
        except (TelegramFatal, StateError):
            raise
        except Exception:
            log.exception("failed to handle update %s", update.get("update_id"))

    def allowed(self, user: dict[str, Any] | None) -> bool:
        return user is not None and user.get("id") in self._config.telegram_allowed_user_ids

    async def _on_message(self, message: dict[str, Any], update_id: int) -> None:
        chat_id = message["chat"]["id"]
        user = message.get("from")
        text = message.get("text")
        topic = topic_of(message)  # each forum topic is a conversation of its own
        if isinstance(message.get("message_id"), int):
            # Newer than every message of ours an earlier process posted: see
            # Outbox.note_message_id.
            self._outbox.note_message_id(chat_id, message["message_id"])
        if not self.allowed(user):
            self._refuse(chat_id, topic, user)
            return
        assert user is not None
        attachment = attachment_of(message)
        if attachment is not None:
            await self._on_file(message, update_id, topic, attachment)
            return
        if not isinstance(text, str) or not text.strip():
            self._replies.post(
                chat_id,
                "I can read text, documents and photos; not this kind of message.",
                topic=topic,
            )
            return
        ctx = Context(chat_id, topic, user, update_id=update_id)
        if text.startswith("/"):
            await self._on_command(ctx, text)
        elif update_id in self._store.updates:
            log.info("update %s was journalled before a restart; not run again", update_id)
        else:
            task = await self._conversations.submit(
                chat_id, topic, text, update_id=update_id, message_id=message.get("message_id")
            )
            if task is not None and task.state == "sent":
                self._dispatched.append(task)

    async def _on_file(
        self, message: dict[str, Any], update_id: int, topic: int, attachment: Attachment
    ) -> None:
        """A document or photo: its caption is the prompt (a command in it is just text)."""
        chat_id = message["chat"]["id"]
        if update_id in self._store.updates:
            log.info("update %s was journalled before a restart; not run again", update_id)
            return
        refused = refusal(attachment)
        if refused is not None:
            self._replies.post(chat_id, refused, topic=topic)
            return
        caption = message.get("caption")
        media_group = message.get("media_group_id")
        await self._conversations.submit(
            chat_id,
            topic,
            caption if isinstance(caption, str) else "",
            update_id=update_id,
            message_id=message.get("message_id"),
            attachment=attachment,
            media_group=media_group if isinstance(media_group, str) else None,
        )

    def _refuse(self, chat_id: int, topic: int, user: dict[str, Any] | None) -> None:
        """Tell a stranger they are not allowed: once an hour per chat, then silence.

        A stranger cannot make the bot spend its send budget, or fill the log,
        by writing more; nor can many strangers together (REFUSALS_PER_MINUTE).
        The refusal goes out behind everything the owner is sent.
        """
        now = trio.current_time()
        if self._told.recent(chat_id, now):
            return
        user_id = user.get("id") if user else None
        if self._refusals.count(now) >= REFUSALS_PER_MINUTE:
            self._refusals_held += 1
            if self._refusals_held == 1:
                log.warning(
                    "refused a message from user %s in chat %s (not in "
                    "telegram_allowed_user_ids); more than %d strangers a minute: "
                    "the rest are not told",
                    user_id,
                    chat_id,
                    REFUSALS_PER_MINUTE,
                )
            return
        if self._refusals_held:
            log.warning("%d more stranger(s) were not told", self._refusals_held)
            self._refusals_held = 0
        self._told.mark(chat_id, now)
        self._refusals.mark(chat_id, now)
        log.warning(
            "refused a message from user %s in chat %s (not in telegram_allowed_user_ids); "
            "more from this chat in the next hour are ignored",
            user_id,
            chat_id,
        )
        self._replies.post(
            chat_id,
            f"Sorry, you are not allowed to use this bot (your user id: {user_id}).",
            topic=topic,
            priority=Priority.LIVE,
        )

    async def _on_callback(self, query: dict[str, Any]) -> None:
        user = query.get("from")
        if not self.allowed(user):
            # Answered (Telegram shows a spinner until then), logged once an hour per chat.
            chat_id = _chat_of({"callback_query": query})
            now = trio.current_time()
            if not self._presses_logged.recent(chat_id, now):
                self._presses_logged.mark(chat_id, now)
                log.warning(
                    "refused a button press from user %s in chat %s",
                    (user or {}).get("id"),
                    chat_id,
                )
            self._replies.toast(query, "You are not allowed to do that.")
            return
        await self._commands.on_callback(query)

    async def _on_command(self, ctx: Context, text: str) -> None:
        # The command ends at the first space or line break ("/use\nx" is /use).
        head, rest = ([*re.split(r"\s", text.strip(), maxsplit=1), ""])[:2]
        name, _, target = head[1:].partition("@")
        if target and self.username and target.lower() != self.username.lower():
            return  # addressed to another bot in a group
        command = self._commands.find(name)
        if command is None:
            self._replies.post(ctx.chat_id, f"Unknown command /{name}. Try /help.", topic=ctx.topic)
            return
        await command.handler(ctx, rest.strip())


def _chat_of(update: dict[str, Any]) -> object:
    """The chat a (checked) update belongs to; None for a press under no known message."""
    message = update.get("message") or (update.get("callback_query") or {}).get("message") or {}
    return (message.get("chat") or {}).get("id")


class RecentlyDone:
    """Which keys had something done to them within the last `window_s` seconds.

    Memory stays bounded by what happened in one window: expired keys are
    dropped whenever the table has doubled since the last sweep.
    """

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._when: dict[object, float] = {}
        self._sweep_at = 1024

    def recent(self, key: object, now: float) -> bool:
        when = self._when.get(key)
        return when is not None and now - when < self._window_s

    def mark(self, key: object, now: float) -> None:
        self._when.pop(key, None)  # re-inserted last: the dict stays oldest first
        self._when[key] = now
        if len(self._when) >= self._sweep_at:
            self._expire(now)
            self._sweep_at = max(1024, 2 * len(self._when))

    def count(self, now: float) -> int:
        """How many keys were marked within the window."""
        self._expire(now)
        return len(self._when)

    def _expire(self, now: float) -> None:
        # Oldest first (see mark): stop at the first one still inside the window.
        expired = []
        for key, when in self._when.items():
            if now - when < self._window_s:
                break
            expired.append(key)
        for key in expired:
            del self._when[key]
