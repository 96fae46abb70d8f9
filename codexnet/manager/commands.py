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
from codexnet.manager.routing import route_for
from codexnet.manager.scheduler import MAX_MODE_CHARS, ModeError, members, mode_text, parse_mode
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
            Command(
                "use",
                "/use <proxy> | label:<a>[,<b>] | auto",
                "Pick the machine, or a pool by labels, or any machine (alone: buttons)",
                self.use,
            ),
            Command(
                "all",
                "/all [label:<a>[,<b>]] <prompt>",
                "Run a prompt on every online machine at once",
                self.all,
            ),
            Command("reset", "/reset", "Start a new Codex conversation", self.reset),
            Command("cancel", "/cancel", "Stop the running task (all of an /all)", self.cancel),
            Command(
                "status",
                "/status",
                "Machines, their health and load, this chat's mode, machine, model, directory",
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

    async def use(self, ctx: Context, argument: str) -> None:
        known = self._hub.known()
        if not argument:
            text, markup = self._use_buttons()
            self.reply(ctx, text, reply_markup=markup)
            return
        try:
            mode = parse_mode(argument, known)
        except ModeError as exc:
            self.reply(ctx, str(exc))
            return
        fleet = self._conversations.admission.fleet()
        conv = self._store.conversation(ctx.key)
        if mode.kind == "pinned":
            assert mode.proxy_id is not None
            conv.mode, conv.proxy = mode_text(mode), mode.proxy_id
            await self._store.save_conversation(ctx.key)
            state = "online" if mode.proxy_id in self._hub.online else "offline right now"
            self.reply(ctx, f"This chat now uses {mode.proxy_id} ({state}).")
            return
        pool = members(fleet, mode)
        if not pool:
            labels = ", ".join(sorted(mode.labels))
            have = ", ".join(self._labels()) or "none"
            self.reply(ctx, f"No machine has the labels {labels}. Labels: {have}.")
            return
        conv.mode = mode_text(mode)
        await self._store.save_conversation(ctx.key)
        online = sum(1 for m in pool if m.online)
        names = ", ".join(m.proxy_id for m in pool)
        what = f"the pool {mode_text(mode)}" if mode.kind == "pool" else "any machine (auto)"
        self.reply(
            ctx,
            f"This chat now uses {what}: {names} ({online} online). Each new conversation "
            "goes to the least-loaded healthy machine.",
        )

    def _labels(self) -> list[str]:
        return sorted({label for p in self._hub.known() for label in self._hub.labels(p)})

    def _use_buttons(self) -> tuple[str, dict[str, Any] | None]:
        choices = [(p, f"u:{p}") for p in sorted(self._hub.online)]
        choices += [(f"🏷 {label}", f"u:label:{label}") for label in self._labels()]
        if choices:
            choices.append(("🔀 auto", "u:auto"))
        buttons = [
            [{"text": text, "callback_data": data}]
            for text, data in choices
            if len(data.encode()) <= MAX_CALLBACK_DATA
        ]
        if not buttons:
            known = self._hub.known()
            return f"No proxy is online. Known: {', '.join(known) or 'none'}.", None
        return "Pick the machine (or a pool of machines by label) for this chat:", {
            "inline_keyboard": buttons
        }

    async def all(self, ctx: Context, argument: str) -> None:
        usage = "Usage: /all [label:<a>[,<b>]] <prompt> — runs the prompt on every online machine."
        spec, prompt = "", argument
        if argument.startswith("label:"):
            spec, prompt = ([*argument.split(maxsplit=1), ""])[:2]
        if not prompt.strip():
            self.reply(ctx, usage)
            return
        admission = self._conversations.admission
        fleet = admission.fleet()
        pool = list(fleet.values())
        if spec:
            try:
                mode = parse_mode(spec[: MAX_MODE_CHARS + 1], self._hub.known())
            except ModeError as exc:
                self.reply(ctx, str(exc))
                return
            pool = members(fleet, mode)
            if not pool:
                labels = ", ".join(sorted(mode.labels))
                self.reply(ctx, f"No machine has the labels {labels}.")
                return
        targets = sorted(m.proxy_id for m in pool if m.online)
        if not targets:
            which = f" with {spec}" if spec else ""
            self.reply(ctx, f"No machine{which} is online right now.")
            return
        if ctx.update_id is not None and ctx.update_id in self._store.updates:
            log.info("update %s was journalled before a restart; not run again", ctx.update_id)
            return
        await self._conversations.submit_all(
            ctx.chat_id, ctx.topic, prompt.strip(), targets, update_id=ctx.update_id
        )

    async def reset(self, ctx: Context, argument: str) -> None:
        conv = self._store.conversation(ctx.key)
        conv.reset = True
        conv.threads.clear()
        await self._store.save_conversation(ctx.key)
        self.reply(ctx, "OK: your next message starts a new conversation.")

    async def cancel(self, ctx: Context, argument: str) -> None:
        tasks = self._conversations.cancellable(ctx.key)
        if not tasks:
            self.reply(ctx, "Nothing is running in this chat.")
            return
        for task in tasks:
            await self._conversations.cancel(task)

    async def status(self, ctx: Context, argument: str) -> None:
        admission = self._conversations.admission
        fleet = admission.fleet()
        lines = []
        for proxy_id, m in fleet.items():
            labels = ", ".join(sorted(m.labels)) or "none"
            queued = f"{m.queued} queued"
            if not m.online:
                since = self._hub.offline_since.get(proxy_id)
                when = f" since {_clock(since)}" if since else ""
                lines.append(f"⚪ {proxy_id}: offline{when}, {queued}, labels: {labels}")
                continue
            conn = self._hub.online[proxy_id]
            health = "healthy" if m.unhealthy is None else f"not chosen: {m.unhealthy}"
            rtt = f", heartbeat {conn.rtt * 1000:.0f} ms" if conn.rtt is not None else ""
            mark = "🟢" if m.unhealthy is None else "🟡"
            lines.append(
                f"{mark} {proxy_id}: online since {_clock(conn.connected_at)}, {health}, "
                f"{m.running}/{m.capacity} running, {queued}, labels: {labels}, "
                f"{conn.version or 'version unknown'}{rtt}"
            )
        chat = admission.chat_of(ctx.key)
        route = route_for(admission, ctx.key)
        mode = chat.mode
        if mode.kind == "unset":
            line = (
                f"This chat uses {route.proxy_id} ({route.why})." if route.proxy_id else route.why
            )
        else:
            default = " (the default)" if self._store.conversation(ctx.key).mode is None else ""
            if route.proxy_id is None:
                where = f"no machine now ({route.why.removeprefix('⚠️ ')})"
            elif mode.kind != "pinned" and chat.current is None:
                where = f"a new conversation goes to {route.proxy_id} ({route.why})"
            else:
                where = f"current machine: {route.proxy_id} ({route.why})"
            line = f"This chat: {mode.describe()}{default}; {where}."
        lines.append(f"\n{line}")
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
            for each in self._conversations.tasks_for_cancel_key(rest):
                await self._conversations.cancel(each)  # all of an /all run
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


def _clock(wall: float) -> str:
    return time.strftime("%H:%M", time.localtime(wall))
