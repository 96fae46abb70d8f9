"""The chat's commands and buttons, in one table.

`/help` and Telegram's command menu (`setMyCommands`) are both made from
`ChatCommands.table()`, so they never disagree. A handler gets the context of
the message (chat, topic, who) and the text after the command.

Buttons: `callback_data` is a few bytes — `c:<key>` cancels a task, `a:<key>:y|s|n`
answers an approval (keys are random and bound to their chat), `u:<proxy>` picks
a machine for the chat it is pressed in; the workspace's (`workspace_commands.py`):
`m:<model>`, `e:<effort>`, `r:<thread id>` for the conversation they are pressed
in, `d:<key>` sends a turn's diff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs

from codexnet.config import ManagerConfig
from codexnet.manager.approvals import Approvals
from codexnet.manager.chat_context import Context, topic_of
from codexnet.manager.conversation import Conversations
from codexnet.manager.hub import Hub
from codexnet.manager.replies import Replies
from codexnet.manager.routing import choose_proxy
from codexnet.manager.store import ManagerStore
from codexnet.manager.workspace_commands import WorkspaceCommands

log = logging.getLogger(__name__)

MAX_CALLBACK_DATA: Final = 64  # bytes, Telegram's limit


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
            buttons = [
                [{"text": p, "callback_data": f"u:{p}"}]
                for p in sorted(self._hub.online)
                if len(f"u:{p}".encode()) <= MAX_CALLBACK_DATA
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
            if task is None or task.chat_id != chat_id:
                self._replies.toast(query, "That task has already finished.")
                return
            self._replies.toast(query, "Cancelling…")
            await self._conversations.cancel(task)
            return
        if kind == "u" and isinstance(chat_id, int):
            self._replies.toast(query, f"Using {rest}")
            await self.use(self._button_context(query, chat_id), rest)
            return
        if isinstance(chat_id, int) and kind in ("m", "e", "r", "d"):
            self._replies.toast(query, "Sending the diff…" if kind == "d" else "OK")
            await self._workspace.on_button(self._button_context(query, chat_id), kind, rest)
            return
        self._replies.toast(query, "This button is no longer valid.")
