"""The chat's commands and buttons, in one table.

`/help` and Telegram's command menu (`setMyCommands`) are both made from
`ChatCommands.table()`, so they never disagree. A handler gets the context of
the message (chat, topic, who) and the text after the command.

Buttons: `callback_data` is a few bytes, and none can be guessed or carried to
another chat (a modified client can send any data under any message it sees):

* `c:<key>` cancels a task, `a:<key>:y|s|n` answers an approval and `d:<key>`
  sends a turn's diff: the keys are random (72 bits), stored with the task or
  the question, and checked against the chat the button is pressed in;
* `u:<tag>:<proxy>` picks a machine: the tag is an HMAC of the chat and the
  proxy keyed by the bot token, so it needs no storage, survives a restart,
  and is valid only in the chat it was offered in.
* `m:<model>`, `e:<effort>`, `r:<thread id>` (`workspace_commands.py`) carry
  only what the person could type in that conversation, and are checked again
  exactly as `/model`, `/effort`, `/resume` would be: a crafted one is that
  command, nothing more.

A press from another chat, or with an unknown key or a wrong tag, gets a
toast saying so and changes nothing. A press acts on the conversation (chat
and forum topic) of the message it is under.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs

from codexnet.config import ManagerConfig
from codexnet.manager.approvals import NOT_HERE, Approvals
from codexnet.manager.chat_context import Context, topic_of
from codexnet.manager.conversation import Conversations
from codexnet.manager.hub import Hub
from codexnet.manager.replies import Replies
from codexnet.manager.routing import choose_proxy
from codexnet.manager.store import ManagerStore
from codexnet.manager.workspace_commands import WorkspaceCommands

log = logging.getLogger(__name__)

MAX_CALLBACK_DATA: Final = 64  # bytes, Telegram's limit
TAG_BYTES: Final = 9  # of the HMAC in a `u:` button: 72 bits, 12 characters
NO_LONGER_VALID: Final = "This button is no longer valid."
FINISHED: Final = "That task has already finished."


def button_tag(secret: str, chat_id: int, payload: str) -> str:
    """What binds a stateless button to its chat: unguessable without `secret`."""
    digest = hmac.digest(secret.encode(), f"{chat_id}:{payload}".encode(), "sha256")
    return base64.urlsafe_b64encode(digest[:TAG_BYTES]).decode()


Handler = Callable[[Context, str], Awaitable[None]]


@attrs.frozen
class Command:
    name: str
    usage: str  # how it is typed, for /help
    help: str  # one line, for /help and the menu
    handler: Handler
    menu: bool = True  # listed in Telegram's command menu


class ChatCommands:
    def __init__(
        self,
        config: ManagerConfig,
        store: ManagerStore,
        hub: Hub,
        conversations: Conversations,
        approvals: Approvals,
        replies: Replies,
        workspace: WorkspaceCommands,
    ) -> None:
        self._config = config
        self._store = store
        self._hub = hub
        self._workspace = workspace
        self._conversations = conversations
        self._approvals = approvals
        self._replies = replies
        # Keys the `u:` buttons' tags; the bot token is a secret we already hold.
        self._button_secret = config.telegram_bot_token or ""
        self._table = self._build()

    def _build(self) -> list[Command]:
        ws, bg = self._workspace, self._workspace.background
        return [
            Command("start", "/start", "What this bot does", self.help, menu=False),
            Command("use", "/use <proxy>", "Pick the machine for this chat", self.use),
            Command("reset", "/reset", "Start a new Codex conversation", self.reset),
            Command("cancel", "/cancel", "Stop the running task", self.cancel),
            Command(
                "status",
                "/status",
                "Machines, their load, this chat's machine, model, directory and thread",
                self.status,
            ),
            Command("get", "/get <path>", "Send a file from this chat's directory", bg(ws.get)),
            Command(
                "model", "/model <name>", "Model for this chat (alone: the list)", bg(ws.model)
            ),
            Command("effort", "/effort <level>", "Reasoning effort for this chat", bg(ws.effort)),
            Command("threads", "/threads", "Recent Codex threads on this machine", bg(ws.threads)),
            Command("resume", "/resume <thread id>", "Continue a Codex thread here", bg(ws.resume)),
            Command("cd", "/cd <path>", "Working directory for this chat (alone: show)", bg(ws.cd)),
            Command("help", "/help", "This list of commands", self.help),
        ]

    def table(self) -> list[Command]:
        return list(self._table)

    def find(self, name: str) -> Command | None:
        return next((c for c in self._table if c.name == name), None)

    def menu(self) -> list[dict[str, str]]:
        """The `commands` parameter of `setMyCommands`."""
        return [{"command": c.name, "description": c.help} for c in self._table if c.menu]

    def help_text(self) -> str:
        lines = ["Send me a message and Codex answers it on one of your machines.", ""]
        lines += [f"{c.usage} — {c.help}" for c in self._table if c.menu]
        return "\n".join(lines)

    # ------------------------------------------------------------------ commands

    def reply(self, ctx: Context, text: str, *, reply_markup: dict[str, Any] | None = None) -> None:
        """A reply in the background, into the conversation's chat and topic."""
        self._replies.post(ctx.chat_id, text, topic=ctx.topic, reply_markup=reply_markup)

    async def help(self, ctx: Context, argument: str) -> None:
        self.reply(ctx, self.help_text())

    async def use(self, ctx: Context, proxy_id: str) -> None:
        known = self._hub.known()
        if not proxy_id:
            offers = [(p, self._use_button(ctx.chat_id, p)) for p in sorted(self._hub.online)]
            buttons = [
                [{"text": p, "callback_data": data}]
                for p, data in offers
                if len(data.encode()) <= MAX_CALLBACK_DATA
            ]
            text = (
                "Pick the machine for this chat:"
                if buttons
                else f"No proxy is online. Known: {', '.join(known) or 'none'}."
            )
            self.reply(ctx, text, reply_markup={"inline_keyboard": buttons} if buttons else None)
            return
        if proxy_id not in known:
            self.reply(ctx, f"Unknown proxy {proxy_id!r}. Known: {', '.join(known) or 'none'}.")
            return
        self._store.conversation(ctx.key).proxy = proxy_id
        await self._store.save_conversation(ctx.key)
        state = "online" if proxy_id in self._hub.online else "offline right now"
        self.reply(ctx, f"This chat now uses {proxy_id} ({state}).")

    async def reset(self, ctx: Context, argument: str) -> None:
        conv = self._store.conversation(ctx.key)
        conv.reset = True
        conv.threads.clear()
        await self._store.save_conversation(ctx.key)
        self.reply(ctx, "OK: your next message starts a new conversation.")

    async def cancel(self, ctx: Context, argument: str) -> None:
        task = self._conversations.current(ctx.key)
        if task is None:
            self.reply(ctx, "Nothing is running in this chat.")
            return
        await self._conversations.cancel(task)

    async def status(self, ctx: Context, argument: str) -> None:
        conv = self._store.conversation(ctx.key)
        route = choose_proxy(
            conv.proxy, self._config.default_proxy, self._hub.online, self._hub.known()
        )
        lines = []
        for proxy_id in self._hub.known():
            conn = self._hub.online.get(proxy_id)
            labels = ", ".join(self._hub.labels(proxy_id)) or "none"
            if conn is None:
                since = self._hub.offline_since.get(proxy_id)
                when = f" since {time.strftime('%H:%M', time.localtime(since))}" if since else ""
                lines.append(f"⚪ {proxy_id}: offline{when} (labels: {labels})")
            else:
                rtt = f", heartbeat {conn.rtt * 1000:.0f} ms" if conn.rtt is not None else ""
                lines.append(
                    f"🟢 {proxy_id}: online, {conn.running}/{conn.capacity} running, "
                    f"labels: {labels}, {conn.version or 'version unknown'}{rtt}"
                )
        if route.proxy_id is not None:
            lines.append(f"\nThis chat uses {route.proxy_id} ({route.why}).")
        else:
            lines.append(f"\n{route.why}")
        lines += self._workspace.describe(ctx, route.proxy_id)
        self.reply(ctx, "\n".join(lines) or "No proxies configured.")

    # ------------------------------------------------------------------ buttons

    @staticmethod
    def _button_context(query: dict[str, Any], chat_id: int) -> Context:
        """The conversation a button press is in: the chat and topic of its message."""
        return Context(chat_id, topic_of(query.get("message") or {}), query.get("from") or {})

    def _use_button(self, chat_id: int, proxy_id: str) -> str:
        return f"u:{button_tag(self._button_secret, chat_id, proxy_id)}:{proxy_id}"

    async def on_callback(self, query: dict[str, Any]) -> None:
        """A button press from an allowed user."""
        data = str(query.get("data") or "")
        kind, _, rest = data.partition(":")
        chat_id = ((query.get("message") or {}).get("chat") or {}).get("id")
        if kind == "a":
            key, _, choice = rest.partition(":")
            await self._approvals.on_press(query, key, choice)
            return
        if kind == "c":
            task = self._conversations.task_for_cancel_key(rest)
            if task is None:
                self._replies.toast(query, FINISHED)
                return
            if task.chat_id != chat_id:
                log.warning(
                    "Cancel button of chat %s pressed in chat %s: refused", task.chat_id, chat_id
                )
                self._replies.toast(query, NOT_HERE)
                return
            self._replies.toast(query, "Cancelling…")
            await self._conversations.cancel(task)
            return
        if kind == "u" and isinstance(chat_id, int):
            proxy_id = rest.partition(":")[2]
            made_here = self._use_button(chat_id, proxy_id)
            if not proxy_id or not hmac.compare_digest(data, made_here):
                # Made for another chat, before an upgrade, or never by us.
                log.warning("a /use button not made for chat %s pressed there: refused", chat_id)
                self._replies.toast(query, NO_LONGER_VALID)
                return
            self._replies.toast(query, f"Using {proxy_id}")
            await self.use(self._button_context(query, chat_id), proxy_id)
            return
        if kind == "d":
            ref = self._store.diffs.get(rest)
            if ref is None:
                self._replies.toast(query, NO_LONGER_VALID)
                return
            if ref.chat_id != chat_id:
                log.warning(
                    "Diff button of chat %s pressed in chat %s: refused", ref.chat_id, chat_id
                )
                self._replies.toast(query, NOT_HERE)
                return
        if isinstance(chat_id, int) and kind in ("m", "e", "r", "d"):
            self._replies.toast(query, "Sending the diff…" if kind == "d" else "OK")
            await self._workspace.on_button(self._button_context(query, chat_id), kind, rest)
            return
        self._replies.toast(query, NO_LONGER_VALID)
