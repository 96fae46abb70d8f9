"""The Telegram side of the manager: long-poll updates, commands, access control.

`Bot.run` calls `deleteWebhook` (a set webhook makes getUpdates fail with 409),
registers the command list, then long-polls `getUpdates`. The offset is saved
after each update has been handed over, so a restart never runs an old
message again; on shutdown one last `getUpdates` confirms it to Telegram.
Every update is handled behind an error boundary: one bad update is logged
and skipped, the loop goes on.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from codexnet.backoff import backoff
from codexnet.config import ManagerConfig
from codexnet.manager.conversation import Conversations
from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.hub import Hub
from codexnet.manager.replies import Replies
from codexnet.manager.state import StateStore
from codexnet.manager.telegram import TelegramClient, TelegramError, TelegramFatal

log = logging.getLogger(__name__)

POLL_BACKOFF_S: Final = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
CONFIRM_TIMEOUT_S: Final = 5.0
SHUTDOWN_GRACE_S: Final = 10.0  # how long shutdown waits for an update or an answer in flight
ALLOWED_UPDATES: Final = ["message", "callback_query"]
COMMANDS: Final = [
    ("start", "What this bot does"),
    ("use", "Pick the machine for this chat: /use <proxy>"),
    ("reset", "Start a new Codex conversation"),
    ("cancel", "Stop the running task"),
    ("status", "Machines, their load, and this chat's choice"),
    ("help", "What this bot does"),
]
HELP: Final = (
    "Send me a message and Codex answers it on one of your machines.\n\n"
    "/use <proxy> — pick the machine for this chat\n"
    "/reset — start a new Codex conversation\n"
    "/cancel — stop the running task\n"
    "/status — machines, their load, and this chat's choice\n"
    "/help — this text"
)


class Bot:
    def __init__(
        self, config: ManagerConfig, tg: TelegramClient, hub: Hub, store: StateStore
    ) -> None:
        self._config = config
        self._tg = tg
        self._hub = hub
        self._store = store
        self._replies = Replies(tg)
        self.username = ""
        self.grace = ShutdownGrace(SHUTDOWN_GRACE_S)
        self.conversations = Conversations(config, hub, store, self._replies, self.grace)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._start_up()
        log.info(
            "Telegram bot @%s ready; %d user(s) allowed",
            self.username,
            len(self._config.telegram_allowed_user_ids),
        )
        if not self._config.telegram_allowed_user_ids:
            log.warning("telegram_allowed_user_ids is empty: the bot will refuse everybody")
        task_status.started()
        async with trio.open_nursery() as nursery:
            self.conversations.nursery = nursery
            self.conversations.start_adopted()
            nursery.start_soon(self._bound_shutdown)
            await self._poll()

    async def _start_up(self) -> None:
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
                await self._tg.call(
                    "setMyCommands",
                    {"commands": [{"command": c, "description": d} for c, d in COMMANDS]},
                )
                return
            except TelegramFatal:
                raise
            except TelegramError as exc:
                delay = backoff(POLL_BACKOFF_S, failures)
                failures += 1
                log.warning("Telegram start-up failed (%s); retrying in %.0f s", exc, delay)
                await trio.sleep(delay)

    async def _bound_shutdown(self) -> None:
        """On shutdown, give protected steps `SHUTDOWN_GRACE_S` to finish."""
        try:
            await trio.sleep_forever()
        finally:
            self.grace.begin()

    async def _poll(self) -> None:
        offset = self._store.offset
        failures = 0
        try:
            while True:
                timeout = self._config.telegram_poll_timeout_s
                try:
                    updates = await self._tg.call(
                        "getUpdates",
                        {"offset": offset, "timeout": timeout, "allowed_updates": ALLOWED_UPDATES},
                        read_timeout=timeout + 15,
                        attempts=1,
                    )
                except TelegramFatal:
                    raise
                except TelegramError as exc:
                    delay = backoff(POLL_BACKOFF_S, failures)
                    failures += 1
                    log.warning(
                        "getUpdates failed (%s); retrying in %.0f s", exc.description, delay
                    )
                    await trio.sleep(delay)
                    continue
                failures = 0
                for update in updates or []:
                    if self.grace.stopping:
                        break  # the rest is redelivered on the next start
                    # Handling an update and saving the offset past it go together:
                    # a shutdown between the two would run it again on the next start.
                    with self.grace.protect():
                        await self._dispatch(update)
                    offset = int(update["update_id"]) + 1
                    with trio.CancelScope(shield=True):
                        await self._store.save_offset(offset)
        finally:
            if offset is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CONFIRM_TIMEOUT_S):
                    await self._confirm(offset)

    async def _confirm(self, offset: int) -> None:
        """Tell Telegram the last offset, so these updates are not redelivered."""
        try:
            await self._tg.call(
                "getUpdates", {"offset": offset, "timeout": 0, "limit": 1}, attempts=1
            )
        except TelegramError as exc:
            log.info("could not confirm the update offset on shutdown: %s", exc.description)

    async def _dispatch(self, update: dict[str, Any]) -> None:
        """Error boundary around one update."""
        try:
            if "message" in update:
                await self._on_message(update["message"])
            elif "callback_query" in update:
                await self._on_callback(update["callback_query"])
        except TelegramFatal:
            raise
        except Exception:
            log.exception("failed to handle update %s", update.get("update_id"))

    def allowed(self, user: dict[str, Any] | None) -> bool:
        return user is not None and user.get("id") in self._config.telegram_allowed_user_ids

    async def _on_message(self, message: dict[str, Any]) -> None:
        chat_id = message["chat"]["id"]
        user = message.get("from")
        text = message.get("text")
        if not self.allowed(user):
            user_id = user.get("id") if user else None
            log.warning(
                "refused a message from user %s in chat %s (not in telegram_allowed_user_ids)",
                user_id,
                chat_id,
            )
            await self._replies.send_text(
                chat_id, f"Sorry, you are not allowed to use this bot (your user id: {user_id})."
            )
            return
        if not isinstance(text, str) or not text.strip():
            await self._replies.send_text(chat_id, "I can only read text messages for now.")
            return
        if text.startswith("/"):
            await self._on_command(chat_id, text)
        else:
            self.conversations.submit(chat_id, text)

    async def _on_callback(self, query: dict[str, Any]) -> None:
        user = query.get("from")
        if not self.allowed(user):
            log.warning("refused a button press from user %s", (user or {}).get("id"))
            await self._tg.toast(query, "You are not allowed to do that.")
            return
        await self.conversations.on_callback(query)

    async def _on_command(self, chat_id: int, text: str) -> None:
        head, _, rest = text.strip().partition(" ")
        command, _, target = head[1:].partition("@")
        if target and self.username and target.lower() != self.username.lower():
            return  # addressed to another bot in a group
        argument = rest.strip()
        conversations = self.conversations
        if command in ("start", "help"):
            await self._replies.send_text(chat_id, HELP)
        elif command == "use":
            await conversations.use(chat_id, argument)
        elif command == "reset":
            await conversations.reset(chat_id)
        elif command == "cancel":
            await conversations.cancel(chat_id)
        elif command == "status":
            await conversations.status(chat_id)
        else:
            await self._replies.send_text(chat_id, f"Unknown command /{command}. Try /help.")
