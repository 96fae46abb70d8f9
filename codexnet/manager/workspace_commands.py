"""The workspace commands: /get, /model, /effort, /threads, /resume, /cd, and the Diff button.

Each acts on the conversation (chat, topic) it is typed in, on the machine that
conversation routes to (`routing.choose_proxy`). They ask that machine first
(`machine_requests.py`) — is the path inside its allowed_roots, does the
thread exist, which models does it list — so they run in the background: the
update handler (and the next getUpdates) never waits for a machine. Bad input
is one line, and the conversation is left as it was.

Settings are per conversation and kept in the store: model and effort apply
to its next turns on any machine; a directory (/cd) and a thread (/resume)
belong to one machine.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from codexnet.config import MODEL_NAME, ManagerConfig
from codexnet.manager.chat_context import Context
from codexnet.manager.dispatcher import Dispatcher
from codexnet.manager.files import MAX_UPLOAD_BYTES
from codexnet.manager.hub import Hub
from codexnet.manager.machine_requests import MachineProblem, MachineRequests
from codexnet.manager.outbox import Priority
from codexnet.manager.replies import Replies
from codexnet.manager.routing import choose_proxy
from codexnet.manager.store import ManagerStore
from codexnet.protocol import ModelInfo

log = logging.getLogger(__name__)

# What any model takes when it advertises no levels of its own.
FALLBACK_EFFORTS: Final = ("minimal", "low", "medium", "high", "xhigh")
THREAD_ID: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}")
MAX_BUTTONS: Final = 12
MAX_CALLBACK_DATA: Final = 64
SEND_RETRY_S: Final = 300.0


def _show(text: str, limit: int = 40) -> str:
    """A piece of the person's input, quoted and cut short, for a refusal."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _age(unix: int) -> str:
    seconds = max(0, int(time.time()) - unix)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return "just now"


def _buttons(items: list[tuple[str, str]]) -> dict[str, Any] | None:
    """Inline buttons (text, callback data), two a row; those whose data is too long dropped."""
    fitting = [
        {"text": text, "callback_data": data}
        for text, data in items[:MAX_BUTTONS]
        if len(data.encode()) <= MAX_CALLBACK_DATA
    ]
    if not fitting:
        return None
    return {"inline_keyboard": [fitting[i : i + 2] for i in range(0, len(fitting), 2)]}


class WorkspaceCommands:
    def __init__(
        self,
        config: ManagerConfig,
        store: ManagerStore,
        hub: Hub,
        dispatcher: Dispatcher,
        machines: MachineRequests,
        replies: Replies,
    ) -> None:
        self._config = config
        self._store = store
        self._hub = hub
        self._dispatcher = dispatcher
        self._machines = machines
        self._replies = replies
        self.nursery: trio.Nursery | None = None  # where the commands run

    # ------------------------------------------------------------------ plumbing

    def background(
        self, handler: Callable[[Context, str], Awaitable[None]]
    ) -> Callable[[Context, str], Awaitable[None]]:
        """`handler` run in the background, behind an error boundary."""

        async def start(ctx: Context, argument: str) -> None:
            assert self.nursery is not None
            self.nursery.start_soon(self._guarded, handler, ctx, argument)

        return start

    async def _guarded(
        self, handler: Callable[[Context, str], Awaitable[None]], ctx: Context, argument: str
    ) -> None:
        try:
            await handler(ctx, argument)
        except MachineProblem as exc:
            self._reply(ctx, str(exc))
        except Exception:  # error boundary: a bug in one command never takes the bot down
            log.exception("command failed in chat %s", ctx.chat_id)
            self._reply(ctx, "⚠️ Internal error; see the manager's log.")

    def _reply(self, ctx: Context, text: str, markup: dict[str, Any] | None = None) -> None:
        self._replies.post(ctx.chat_id, text, topic=ctx.topic, reply_markup=markup)

    def _machine(self, ctx: Context) -> str:
        """The machine this conversation uses (raises `MachineProblem` with why not)."""
        conv = self._store.conversation(ctx.key)
        route = choose_proxy(
            conv.proxy, self._config.default_proxy, self._hub.online, self._hub.known()
        )
        if route.proxy_id is None:
            raise MachineProblem(route.why)
        return route.proxy_id

    # ------------------------------------------------------------------ /status

    def describe(self, ctx: Context, proxy_id: str | None) -> list[str]:
        """The conversation's workspace, for /status."""
        conv = self._store.conversation(ctx.key)
        model = f"{conv.model} (chosen here)" if conv.model else "the machine's default"
        effort = f"{conv.effort} (chosen here)" if conv.effort else "the machine's default"
        lines = [f"Model: {model}", f"Effort: {effort}"]
        if proxy_id is not None:
            chosen = conv.workdirs.get(proxy_id)
            default = self._dispatcher.workdirs.get(proxy_id) or "its codex_cwd"
            where = f"{chosen} (chosen with /cd)" if chosen else f"{default} ({proxy_id}'s default)"
            thread = None if conv.reset else conv.threads.get(proxy_id)
            lines.append(f"Directory: {where}")
            lines.append(f"Codex thread: {thread or 'a new one with the next message'}")
        return lines

    # ------------------------------------------------------------------ /get

    async def get(self, ctx: Context, path: str) -> None:
        if not path:
            self._reply(ctx, "Usage: /get <path> — a file from this conversation's directory.")
            return
        proxy_id = self._machine(ctx)
        cwd = self._store.conversation(ctx.key).workdirs.get(proxy_id)
        dest, name = await self._machines.read_to_file(
            proxy_id, path, cwd=cwd, max_bytes=MAX_UPLOAD_BYTES
        )
        try:
            await self._send_file(ctx, dest, name, f"{name} from {proxy_id}")
        finally:
            await trio.to_thread.run_sync(dest.unlink)

    async def _send_file(self, ctx: Context, dest: Any, name: str, caption: str) -> None:
        ok = await self._replies.send_document(
            ctx.chat_id,
            name,
            dest,
            caption,
            topic=ctx.topic,
            until=trio.current_time() + SEND_RETRY_S,
            mime_type="application/octet-stream",
            priority=Priority.REPLY,
        )
        if not ok:
            self._reply(ctx, f"Telegram did not take {name}; see the manager's log.")

    async def send_diff(self, ctx: Context, key: str) -> None:
        """The Diff button: the turn's diff from its machine, as changes.diff."""
        ref = self._store.diffs.get(key)
        if ref is None or ref.chat_id != ctx.chat_id:
            self._reply(ctx, "That diff is no longer kept.")
            return
        dest, _ = await self._machines.read_to_file(
            ref.proxy_id, ref.task_id, cwd=None, kind="diff", max_bytes=MAX_UPLOAD_BYTES
        )
        try:
            await self._send_file(
                ctx, dest, "changes.diff", f"What the turn changed on {ref.proxy_id}."
            )
        finally:
            await trio.to_thread.run_sync(dest.unlink)

    # ------------------------------------------------------------------ /model, /effort

    async def _models(self, proxy_id: str) -> tuple[list[ModelInfo], str]:
        """The machine's models, or none and a note saying why they are unknown."""
        try:
            return (await self._machines.query(proxy_id, "models")).models, ""
        except MachineProblem as exc:
            return [], f" (not checked: {exc})"

    async def model(self, ctx: Context, name: str) -> None:
        conv = self._store.conversation(ctx.key)
        if not name:
            await self._offer_models(ctx)
            return
        if name == "default":
            conv.model = None
            await self._store.save_conversation(ctx.key)
            self._reply(ctx, "Model: the machine's default from the next message on.")
            return
        if len(name) > 128:
            self._reply(ctx, f"A model name is at most 128 characters (that one has {len(name)}).")
            return
        if not MODEL_NAME.fullmatch(name):
            self._reply(
                ctx,
                f"{_show(name)} is not a model name (letters, digits and . _ : / @ + - only).",
            )
            return
        proxy_id = self._machine(ctx)
        models, note = await self._models(proxy_id)
        known = {m.id: m for m in models}
        if models and name not in known:
            note = (
                f" It is not in {proxy_id}'s model list; it is used anyway "
                "(a custom model provider may serve it)."
            )
        chosen = known.get(name)
        conv.model = name
        if conv.effort and chosen is not None and chosen.efforts:
            if conv.effort not in chosen.efforts:
                note += f" Effort back to the default: {name} does not offer {conv.effort}."
                conv.effort = None
        await self._store.save_conversation(ctx.key)
        self._reply(ctx, f"Model for this conversation: {name}.{note}")

    async def _offer_models(self, ctx: Context) -> None:
        conv = self._store.conversation(ctx.key)
        current = conv.model or "the machine's default"
        proxy_id = self._machine(ctx)
        models, note = await self._models(proxy_id)
        buttons = [(m.id + (" ✓" if m.id == conv.model else ""), f"m:{m.id}") for m in models]
        buttons.append(("Default", "m:default"))
        text = f"Model: {current}.{note}"
        if models:
            text += f"\nPick one of {proxy_id}'s, or send /model <name>:"
        self._reply(ctx, text, _buttons(buttons))

    async def _efforts(self, ctx: Context, proxy_id: str) -> tuple[str, tuple[str, ...], str]:
        """(the model they are for, its efforts, a note if the machine could not say)."""
        conv = self._store.conversation(ctx.key)
        models, note = await self._models(proxy_id)
        if conv.model:
            model = next((m for m in models if m.id == conv.model), None)
        else:
            model = next((m for m in models if m.is_default), None)
        name = conv.model or (model.id if model else "the default model")
        if model is not None and model.efforts:
            return name, tuple(model.efforts), note
        return name, FALLBACK_EFFORTS, note

    async def effort(self, ctx: Context, level: str) -> None:
        conv = self._store.conversation(ctx.key)
        if level == "default":
            conv.effort = None
            await self._store.save_conversation(ctx.key)
            self._reply(ctx, "Effort: the machine's default from the next message on.")
            return
        proxy_id = self._machine(ctx)
        model, valid, note = await self._efforts(ctx, proxy_id)
        if not level:
            current = conv.effort or "the machine's default"
            buttons = [(e + (" ✓" if e == conv.effort else ""), f"e:{e}") for e in valid]
            buttons.append(("Default", "e:default"))
            self._reply(
                ctx,
                f"Effort: {current}. {model} takes: {', '.join(valid)}.{note}",
                _buttons(buttons),
            )
            return
        if level not in valid:
            self._reply(ctx, f"{model} has no effort {_show(level)}. Valid: {', '.join(valid)}.")
            return
        conv.effort = level
        await self._store.save_conversation(ctx.key)
        self._reply(ctx, f"Effort for this conversation: {level}.{note}")

    # ------------------------------------------------------------------ threads

    async def threads(self, ctx: Context, argument: str) -> None:
        proxy_id = self._machine(ctx)
        found = (await self._machines.query(proxy_id, "threads")).threads
        if not found:
            self._reply(ctx, f"No Codex threads on {proxy_id} yet.")
            return
        conv = self._store.conversation(ctx.key)
        current = None if conv.reset else conv.threads.get(proxy_id)
        lines = [f"Recent Codex threads on {proxy_id}:"]
        buttons = []
        for n, thread in enumerate(found, start=1):
            preview = thread.preview or "(no prompt yet)"
            if len(preview) > 60:
                preview = preview[:57] + "..."
            here = " (this conversation)" if thread.id == current else ""
            lines.append(f"{n}. “{preview}” — {_age(thread.updated)} — {thread.id}{here}")
            buttons.append((f"▶ {n}", f"r:{thread.id}"))
        lines.append("\nResume one here with its button or /resume <id>.")
        self._reply(ctx, "\n".join(lines), _buttons(buttons))

    async def resume(self, ctx: Context, thread_id: str) -> None:
        if not thread_id:
            self._reply(ctx, "Usage: /resume <thread id> — see /threads for the ids.")
            return
        if not THREAD_ID.fullmatch(thread_id):
            self._reply(ctx, f"{_show(thread_id)} is not a thread id; /threads lists them.")
            return
        proxy_id = self._machine(ctx)
        [thread] = (await self._machines.query(proxy_id, "thread", thread_id)).threads
        conv = self._store.conversation(ctx.key)
        conv.threads[proxy_id] = thread.id
        conv.reset = False
        conv.proxy = proxy_id  # the thread lives on that machine
        await self._store.save_conversation(ctx.key)
        preview = f" (“{thread.preview[:60]}”)" if thread.preview else ""
        self._reply(
            ctx, f"This conversation now continues thread {thread.id}{preview} on {proxy_id}."
        )

    # ------------------------------------------------------------------ /cd

    async def cd(self, ctx: Context, path: str) -> None:
        proxy_id = self._machine(ctx)
        conv = self._store.conversation(ctx.key)
        if not path:
            chosen = conv.workdirs.get(proxy_id)
            default = self._dispatcher.workdirs.get(proxy_id) or "its codex_cwd"
            where = chosen or f"{default} ({proxy_id}'s default)"
            self._reply(ctx, f"Directory on {proxy_id}: {where}")
            return
        resolved = (await self._machines.query(proxy_id, "cwd", path)).path
        if resolved == self._dispatcher.workdirs.get(proxy_id):
            conv.workdirs.pop(proxy_id, None)
        else:
            conv.workdirs[proxy_id] = resolved
        await self._store.save_conversation(ctx.key)
        self._reply(ctx, f"Directory on {proxy_id}: {resolved}")

    # ------------------------------------------------------------------ buttons

    async def on_button(self, ctx: Context, kind: str, value: str) -> bool:
        """A press of one of our buttons (m:, e:, r:, d:); False if not ours."""
        handler = {"m": self.model, "e": self.effort, "r": self.resume, "d": self.send_diff}.get(
            kind
        )
        if handler is None:
            return False
        await self.background(handler)(ctx, value)
        return True
