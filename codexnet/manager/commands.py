"""The chat's commands and buttons, in one table.

`/help` and Telegram's command menu (`setMyCommands`) are both made from
`ChatCommands.table()`, so they never disagree. A handler gets the context of
the message (chat, topic, who) and the text after the command.

Buttons: `callback_data` is a few bytes, and none can be guessed or carried to
another chat (a modified client can send any data under any message it sees):

* `c:<key>` cancels a task, `a:<key>:y|s|n` answers an approval and `d:<key>`
  sends a turn's diff: the keys are random (72 bits), stored with the task or
  the question, and checked against the chat the button is pressed in;
* `u:<tag>:<choice>` picks a machine, a pool (`label:<a>`) or `auto`: the tag
  is an HMAC of the chat and the choice keyed by the bot token, so it needs no
  storage, survives a restart, and is valid only in the chat it was offered in.
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
import collections
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
from codexnet.manager.routing import route_for
from codexnet.manager.scheduler import (
    Machine,
    ModeError,
    known_list,
    members,
    mode_text,
    parse_mode,
)
from codexnet.manager.store import ManagerStore
from codexnet.manager.workspace_commands import WorkspaceCommands

log = logging.getLogger(__name__)

MAX_CALLBACK_DATA: Final = 64  # bytes, Telegram's limit
MAX_MACHINE_BUTTONS: Final = 40  # of /use; with the labels' and auto, under Telegram's ~100
MAX_LABEL_BUTTONS: Final = 20
MAX_STATUS_MACHINES: Final = 30  # lines of /status; a bigger fleet gets its counts first
MAX_RUNS_PER_CHAT: Final = 3  # open /all runs in one conversation (each asks every machine)
MAX_ALL_MACHINES: Final = 50  # machines one /all asks: their answers come ~1 a second
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
            Command(
                "use",
                "/use <proxy> | label:<a>[,<b>] | auto",
                "Choose a machine, a pool by labels, or auto (alone: buttons)",
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
            text, markup = self._use_buttons(ctx.chat_id)
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
        names = known_list([m.proxy_id for m in pool])
        what = f"the pool {mode_text(mode)}" if mode.kind == "pool" else "any machine (auto)"
        self.reply(
            ctx,
            f"This chat now uses {what}: {names} ({online} online). Each new conversation "
            "goes to the least-loaded healthy machine.",
        )

    def _labels(self) -> list[str]:
        return sorted({label for p in self._hub.known() for label in self._hub.labels(p)})

    def _use_buttons(self, chat_id: int) -> tuple[str, dict[str, Any] | None]:
        """Buttons for the online machines, each label, and auto (bound to this chat);
        a fleet of thousands gets the first few of each (Telegram takes ~100 buttons)."""
        online = sorted(self._hub.online)
        labels = self._labels()
        choices = [(p, p) for p in online[:MAX_MACHINE_BUTTONS]]
        choices += [(f"🏷 {label}", f"label:{label}") for label in labels[:MAX_LABEL_BUTTONS]]
        if choices:
            choices.append(("🔀 auto", "auto"))
        choices = [(text, self._use_button(chat_id, payload)) for text, payload in choices]
        buttons = [
            [{"text": text, "callback_data": data}]
            for text, data in choices
            if len(data.encode()) <= MAX_CALLBACK_DATA
        ]
        if not buttons:
            return f"No proxy is online. Known: {known_list(self._hub.known())}.", None
        text = "Pick the machine (or a pool of machines by label) for this chat:"
        cut = []
        if len(online) > MAX_MACHINE_BUTTONS:
            cut.append(f"the first {MAX_MACHINE_BUTTONS} of {len(online)} machines online")
        if len(labels) > MAX_LABEL_BUTTONS:
            cut.append(f"the first {MAX_LABEL_BUTTONS} of {len(labels)} labels")
        if cut:
            text = (
                "Pick the machine (or a pool of machines by label) for this chat — "
                f"{' and '.join(cut)}; /use <name> or /use label:<label> for the others:"
            )
        return text, {"inline_keyboard": buttons}

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
                mode = parse_mode(spec, self._hub.known())
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
        if len(targets) > MAX_ALL_MACHINES:
            # Each machine's answer is a message of its own, and a chat takes about one a
            # second: 5 000 answers would fill the chat for an hour and a half.
            which = f" with {spec}" if spec else ""
            self.reply(
                ctx,
                f"/all{which} would ask {len(targets)} machines; at most {MAX_ALL_MACHINES} "
                "at once (each answers in a message of its own). Narrow it with "
                "/all label:<label> <prompt>.",
            )
            return
        if ctx.update_id is not None and ctx.update_id in self._store.updates:
            log.info("update %s was journalled before a restart; not run again", ctx.update_id)
            return
        if len(self._store.runs(ctx.key)) >= MAX_RUNS_PER_CHAT:
            self.reply(
                ctx, f"{MAX_RUNS_PER_CHAT} /all runs are open here already; wait or /cancel."
            )
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
        shown = list(fleet.items())
        if len(shown) > MAX_STATUS_MACHINES:
            # A fleet of thousands: the counts, then the machines worth a look first
            # (not chosen, offline, busy), not one line each for 5 000 machines.
            lines.append(_fleet_summary(list(fleet.values())))
            shown.sort(key=lambda item: (_attention(item[1]), item[0]))
            rest = [m for _, m in shown[MAX_STATUS_MACHINES:]]
            shown = shown[:MAX_STATUS_MACHINES]
        for proxy_id, m in shown:
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
        if len(fleet) > len(shown):
            kinds = collections.Counter(_ATTENTION[_attention(m)] for m in rest)
            parts = ", ".join(f"{kinds[k]} {k}" for k in _ATTENTION if kinds[k])
            lines.append(f"… and {len(rest)} more: {parts}.")
        pools = admission.queued_for_pools()
        if pools:
            waiting = ", ".join(f"{n} for {target}" for target, n in sorted(pools.items()))
            lines.append(f"⏳ queued at the manager for a pool: {waiting}")
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

    def _use_button(self, chat_id: int, proxy_id: str) -> str:
        return f"u:{button_tag(self._button_secret, chat_id, proxy_id)}:{proxy_id}"

    def _foreign_press(
        self, query: dict[str, Any], button: str, owner: int, chat_id: object
    ) -> None:
        """A button of chat `owner` pressed in another chat: refused, and said so."""
        log.warning("%s button of chat %s pressed in chat %s: refused", button, owner, chat_id)
        self._replies.toast(query, NOT_HERE)

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
                self._foreign_press(query, "Cancel", task.chat_id, chat_id)
                return
            self._replies.toast(query, "Cancelling…")
            for each in self._conversations.tasks_for_cancel_key(rest):
                await self._conversations.cancel(each)  # all of an /all run
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
                self._foreign_press(query, "Diff", ref.chat_id, chat_id)
                return
        if isinstance(chat_id, int) and kind in ("m", "e", "r", "d"):
            self._replies.toast(query, "Sending the diff…" if kind == "d" else "OK")
            await self._workspace.on_button(self._button_context(query, chat_id), kind, rest)
            return
        self._replies.toast(query, NO_LONGER_VALID)


def _clock(wall: float) -> str:
    return time.strftime("%H:%M", time.localtime(wall))


_ATTENTION: Final = ("not chosen", "offline", "busy", "idle")


def _attention(m: Machine) -> int:
    """How much a machine wants a look in /status: not chosen, offline, busy, then idle."""
    if m.online and m.unhealthy is not None:
        return 0
    if not m.online:
        return 1
    return 2 if m.running or m.queued else 3


def _fleet_summary(machines: list[Machine]) -> str:
    online = [m for m in machines if m.online]
    not_chosen = sum(1 for m in online if m.unhealthy is not None)
    running = sum(m.running for m in online)
    capacity = sum(m.capacity for m in online)
    queued = sum(m.queued for m in machines)
    return (
        f"{len(machines)} machines: {len(online)} online ({len(online) - not_chosen} healthy, "
        f"{not_chosen} not chosen), {len(machines) - len(online)} offline; "
        f"{running}/{capacity} running, {queued} queued."
    )
