"""The manager's durable state: one SQLite database, `state_dir/codexnet.db`.

It holds everything a restart must not lose:

* **conversations**, keyed by (chat, topic): the pinned proxy, one Codex
  thread id per proxy (a thread lives in one machine's CODEX_HOME), and the
  reset flag;
* the Telegram update **offset**;
* the **task journal**: every prompt from the moment it arrived (before the
  update's offset moves past it), with all it needs to be sent again, its
  state (`queued` → `sent` → `acked` → `finished` → `done`), the pending
  cancel, its result until every part of the answer is in the chat, and its
  live view (status message id and Cancel-button key);
* **approvals**: each question keyed by (task, approval id), its button key,
  its message, and the decision until the proxy acknowledged it;
* the **workspace** (schema 2): each conversation's model, effort and one
  working directory per proxy (`workdirs`); each task's files
  (`attachments`: what Telegram announced, and once fetched, their SHA-256 —
  the bytes are in `state_dir/files/<task>/<index>` until the task ends);
  the settings a task was dispatched with, and the key of its Diff button.

The running manager reads nothing from the database: `open()` loads it into
the in-memory mirror below, and each event writes its own rows (no file is
rewritten whole), through the group-committing writer of `codexnet.db`.
State files of earlier versions (`sessions.json`, `offset.json`, `tasks.json`)
are imported once and renamed `*.imported`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import trio

from codexnet.db import Database, StateError

log = logging.getLogger(__name__)

DONE_KEEP_DAYS: Final = 7  # finished tasks are kept this long (late duplicates are recognised)

TaskState = Literal["queued", "sent", "acked", "finished", "done"]
ConversationKey = tuple[int, int]  # (chat id, topic id; 0 outside forum topics)

MIGRATIONS: Final = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE conversations (
        chat_id INTEGER NOT NULL,
        topic INTEGER NOT NULL DEFAULT 0,
        proxy TEXT,
        reset INTEGER NOT NULL DEFAULT 0,
        updated REAL NOT NULL,
        PRIMARY KEY (chat_id, topic)
    );
    CREATE TABLE threads (
        chat_id INTEGER NOT NULL,
        topic INTEGER NOT NULL DEFAULT 0,
        proxy_id TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        PRIMARY KEY (chat_id, topic, proxy_id)
    );
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        chat_id INTEGER NOT NULL,
        topic INTEGER NOT NULL DEFAULT 0,
        prompt TEXT NOT NULL,
        created REAL NOT NULL,
        state TEXT NOT NULL,
        proxy_id TEXT,
        thread_id TEXT,
        timeout_s REAL,
        dispatched REAL,
        acked REAL,
        cancel TEXT NOT NULL DEFAULT '',
        outcome TEXT,
        finished REAL,
        parts_sent INTEGER NOT NULL DEFAULT 0,
        view_message_id INTEGER,
        view_key TEXT,
        update_id INTEGER,
        message_id INTEGER,
        delivery_anchor INTEGER,
        done REAL
    );
    CREATE UNIQUE INDEX tasks_by_update ON tasks(update_id) WHERE update_id IS NOT NULL;
    CREATE INDEX tasks_by_state ON tasks(state);
    CREATE TABLE approvals (
        task_id TEXT NOT NULL,
        approval_id TEXT NOT NULL,
        key TEXT NOT NULL UNIQUE,
        chat_id INTEGER NOT NULL,
        topic INTEGER NOT NULL DEFAULT 0,
        kind TEXT NOT NULL,
        summary TEXT NOT NULL,
        detail TEXT NOT NULL,
        asked REAL NOT NULL,
        message_id INTEGER,
        state TEXT NOT NULL,
        decision TEXT,
        outcome TEXT,
        decision_acked INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, approval_id)
    )
    """,
    """
    ALTER TABLE conversations ADD COLUMN model TEXT;
    ALTER TABLE conversations ADD COLUMN effort TEXT;
    CREATE TABLE workdirs (
        chat_id INTEGER NOT NULL,
        topic INTEGER NOT NULL DEFAULT 0,
        proxy_id TEXT NOT NULL,
        cwd TEXT NOT NULL,
        PRIMARY KEY (chat_id, topic, proxy_id)
    );
    ALTER TABLE tasks ADD COLUMN model TEXT;
    ALTER TABLE tasks ADD COLUMN effort TEXT;
    ALTER TABLE tasks ADD COLUMN cwd TEXT;
    ALTER TABLE tasks ADD COLUMN media_group TEXT;
    ALTER TABLE tasks ADD COLUMN diff_key TEXT;
    CREATE TABLE attachments (
        task_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        file_id TEXT NOT NULL,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        update_id INTEGER,
        sha256 TEXT,
        PRIMARY KEY (task_id, idx)
    );
    CREATE INDEX tasks_by_diff ON tasks(diff_key) WHERE diff_key IS NOT NULL
    """,
    # Schema 3, scheduling: a conversation's mode (NULL: default_proxy;
    # "proxy:<id>", "label:<a>,<b>", "auto"); a task's first line (a failover
    # notice, or an /all answer's machine), its /all run and that run's machine.
    """
    ALTER TABLE conversations ADD COLUMN mode TEXT;
    ALTER TABLE tasks ADD COLUMN notice TEXT;
    ALTER TABLE tasks ADD COLUMN run_id TEXT;
    ALTER TABLE tasks ADD COLUMN target TEXT;
    CREATE INDEX tasks_by_run ON tasks(run_id) WHERE run_id IS NOT NULL
    """,
)


@attrs.define
class Conversation:
    proxy: str | None = None
    threads: dict[str, str] = attrs.Factory(dict)
    reset: bool = False
    model: str | None = None  # None: the machine's default
    effort: str | None = None
    workdirs: dict[str, str] = attrs.Factory(dict)  # proxy → directory chosen with /cd
    # What /use chose (scheduler.mode_text): None means `default_proxy`. `proxy`
    # above is the machine the conversation lives on (or, unchosen, sticks to).
    mode: str | None = None


@attrs.define(eq=False)
class Attachment:
    """A file that came with a prompt (a document or a photo)."""

    task_id: str
    index: int
    kind: str  # "document" | "photo"
    file_id: str  # Telegram's, for getFile
    name: str  # as sent ("" for a photo)
    size: int  # as Telegram announced it, then as fetched
    update_id: int | None = None
    sha256: str | None = None  # set once its bytes are on the manager's disk


@attrs.frozen
class DiffRef:
    """What a Diff button sends: the diff the task's proxy kept, into the task's chat."""

    task_id: str
    proxy_id: str
    chat_id: int
    topic: int


@attrs.frozen
class Outcome:
    """How a task ended, as the chat will be told (the proxy's result or our own failure)."""

    status: str  # completed | failed | interrupted | timeout
    text: str = ""
    error: str | None = None
    thread_id: str | None = None
    usage: dict[str, int] = attrs.Factory(dict)
    line: str | None = None  # a manager-side ending: exactly the line the chat gets
    diff_bytes: int = 0  # the turn changed files; its proxy keeps the diff

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Outcome:
        data = json.loads(raw)
        return cls(
            status=str(data["status"]),
            text=str(data.get("text") or ""),
            error=data.get("error"),
            thread_id=data.get("thread_id"),
            usage={str(k): int(v) for k, v in (data.get("usage") or {}).items()},
            line=data.get("line"),
            diff_bytes=int(data.get("diff_bytes") or 0),
        )


@attrs.define(eq=False)
class TaskRecord:
    """One prompt's journey; the in-memory mirror of a `tasks` row (plus live state)."""

    task_id: str
    seq: int
    chat_id: int
    topic: int
    prompt: str
    created: float  # wall clock
    state: TaskState = "queued"
    proxy_id: str | None = None
    thread_id: str | None = None  # the thread it continues (None: a new one)
    timeout_s: float = 1800.0
    dispatched: float | None = None
    acked: float | None = None
    cancel: str = ""  # "" | "requested" | "acked"
    outcome: Outcome | None = None
    finished: float | None = None
    parts_sent: int = 0
    view_message_id: int | None = None
    view_key: str | None = None
    update_id: int | None = None  # the Telegram update it came from
    message_id: int | None = None  # the person's message (its id in the chat)
    # Set while part `parts_sent` of the answer is being sent: the chat's newest
    # message id known when it got its turn to go (nothing else of ours can go
    # to the chat between then and the part). After a restart the part is looked
    # for after it before it is sent again. None: no part is on its way.
    delivery_anchor: int | None = None
    # The workspace: what it was dispatched with (so a re-send is the same task),
    # its files, the album it collects, its Diff button.
    model: str | None = None
    effort: str | None = None
    cwd: str | None = None
    media_group: str | None = None
    files: list[Attachment] = attrs.Factory(list)
    diff_key: str | None = None
    # Scheduling: the answer's first line (a failover notice, an /all answer's
    # machine); an /all task's run and the one machine it is for. A run's tasks
    # are not part of the conversation: they never touch its thread or machine.
    notice: str | None = None
    run_id: str | None = None
    target: str | None = None
    # Runtime only (rebuilt from events after a restart):
    text: str = ""
    step: str = ""
    last_seq: int = 0
    album_until: float = 0.0  # trio time: an album's next photo may still come until then
    persisted: trio.Event = attrs.Factory(trio.Event)
    changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def conversation(self) -> ConversationKey:
        return (self.chat_id, self.topic)

    def poke(self) -> None:
        """Something the live view shows changed."""
        self.changed.set()
        self.changed = trio.Event()


@attrs.define(eq=False)
class ApprovalRecord:
    task_id: str
    approval_id: str
    key: str  # the button's callback key
    chat_id: int
    topic: int
    kind: str
    summary: str
    detail: str
    asked: float  # wall clock
    message_id: int | None = None
    state: str = "open"  # open | decided | closed
    decision: str | None = None
    outcome: str | None = None  # the line the message shows once closed
    decision_acked: bool = False

    @property
    def pending(self) -> bool:
        """Still something to do: a question to answer, or a decision the proxy has not got."""
        return self.state != "closed" or (self.decision is not None and not self.decision_acked)


class ManagerStore:
    def __init__(self, state_dir: Path | str, *, inline_writes: bool = False) -> None:
        self.state_dir = Path(state_dir)
        memory = str(state_dir) == ":memory:"
        path = ":memory:" if memory else self.state_dir / "codexnet.db"
        self.db = Database(path, MIGRATIONS, inline=inline_writes)
        self._memory = memory
        self.offset: int | None = None
        self.conversations: dict[ConversationKey, Conversation] = {}
        self.tasks: dict[str, TaskRecord] = {}  # not yet done
        # The same tasks by conversation, in arrival order (a lane looks at its
        # own conversation on every step: that must not cost a scan of all).
        self._by_conversation: dict[ConversationKey, dict[str, TaskRecord]] = {}
        self._by_run: dict[str, dict[str, TaskRecord]] = {}  # /all runs' tasks
        # Tasks each proxy has been given (sent or acked) and not finished: the
        # manager's own count of its load, for the scheduler.
        self.running: collections.Counter[str] = collections.Counter()
        self.done: set[str] = set()  # done within DONE_KEEP_DAYS: late results are dropped
        # Updates that became tasks: one redelivered after a crash is not run twice.
        self.updates: set[int] = set()
        self.approvals: dict[str, ApprovalRecord] = {}  # by key; open or not yet acked
        self.diffs: dict[str, DiffRef] = {}  # Diff button key → the diff (tasks kept 7 days)
        self._seq = 0

    # ------------------------------------------------------------------ start-up

    def open(self) -> None:
        """Open, migrate, import old JSON state, load the mirror; raises `StateError`."""
        self.db.open()
        if not self._memory:
            self._import_json()
        cutoff = time.time() - DONE_KEEP_DAYS * 86400

        def prune(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM tasks WHERE state = 'done' AND done < ?", (cutoff,))
            c.execute(
                "DELETE FROM attachments WHERE task_id NOT IN"
                " (SELECT task_id FROM tasks WHERE state != 'done')"
            )
            c.execute(
                "DELETE FROM approvals WHERE state = 'closed' AND asked < ?"
                " AND (decision IS NULL OR decision_acked = 1)",
                (cutoff,),
            )

        self.db.write_now(prune)
        self.db.read(self._load)

    def _load(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'offset'").fetchone()
        self.offset = int(row[0]) if row else None
        for chat_id, topic, proxy, reset, model, effort, mode in conn.execute(
            "SELECT chat_id, topic, proxy, reset, model, effort, mode FROM conversations"
        ):
            self.conversations[(chat_id, topic)] = Conversation(
                proxy, {}, bool(reset), model, effort, mode=mode
            )
        for chat_id, topic, proxy_id, thread_id in conn.execute(
            "SELECT chat_id, topic, proxy_id, thread_id FROM threads"
        ):
            self.conversation((chat_id, topic)).threads[proxy_id] = thread_id
        for chat_id, topic, proxy_id, cwd in conn.execute(
            "SELECT chat_id, topic, proxy_id, cwd FROM workdirs"
        ):
            self.conversation((chat_id, topic)).workdirs[proxy_id] = cwd
        for key, task_id, proxy_id, chat_id, topic in conn.execute(
            "SELECT diff_key, task_id, proxy_id, chat_id, topic FROM tasks"
            " WHERE diff_key IS NOT NULL AND proxy_id IS NOT NULL"
        ):
            self.diffs[key] = DiffRef(task_id, proxy_id, chat_id, topic)
        self._seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0])
        for task_id, update_id in conn.execute(
            "SELECT task_id, update_id FROM tasks WHERE state = 'done'"
        ):
            self.done.add(task_id)
            if update_id is not None:
                self.updates.add(update_id)
        for row in conn.execute(
            "SELECT task_id, seq, chat_id, topic, prompt, created, state, proxy_id, thread_id,"
            " timeout_s, dispatched, acked, cancel, outcome, finished, parts_sent,"
            " view_message_id, view_key, update_id, message_id, delivery_anchor,"
            " model, effort, cwd, media_group, diff_key, notice, run_id, target"
            " FROM tasks WHERE state != 'done' ORDER BY seq"
        ):
            task = TaskRecord(
                task_id=row[0],
                seq=row[1],
                chat_id=row[2],
                topic=row[3],
                prompt=row[4],
                created=row[5],
                state=row[6],
                proxy_id=row[7],
                thread_id=row[8],
                timeout_s=row[9] if row[9] is not None else 1800.0,
                dispatched=row[10],
                acked=row[11],
                cancel=row[12],
                outcome=Outcome.from_json(row[13]) if row[13] else None,
                finished=row[14],
                parts_sent=row[15],
                view_message_id=row[16],
                view_key=row[17],
                update_id=row[18],
                message_id=row[19],
                delivery_anchor=row[20],
                model=row[21],
                effort=row[22],
                cwd=row[23],
                media_group=row[24],
                diff_key=row[25],
                notice=row[26],
                run_id=row[27],
                target=row[28],
            )
            if task.update_id is not None:
                self.updates.add(task.update_id)
            task.persisted.set()
            self._remember(task)
            if task.state in ("sent", "acked") and task.proxy_id is not None:
                self.running[task.proxy_id] += 1
        for row in conn.execute(
            "SELECT task_id, idx, kind, file_id, name, size, update_id, sha256 FROM attachments"
            " ORDER BY task_id, idx"
        ):
            owner = self.tasks.get(row[0])
            if owner is not None:
                owner.files.append(Attachment(*row))
            if row[6] is not None:
                self.updates.add(row[6])
        for row in conn.execute(
            "SELECT task_id, approval_id, key, chat_id, topic, kind, summary, detail, asked,"
            " message_id, state, decision, outcome, decision_acked FROM approvals"
            " WHERE state != 'closed' OR (decision IS NOT NULL AND decision_acked = 0)"
        ):
            approval = ApprovalRecord(*row[:13])
            approval.decision_acked = bool(row[13])
            self.approvals[approval.key] = approval

    def _import_json(self) -> None:
        """Bring in the JSON state of codexnet before the SQLite store, once."""
        sessions = self.state_dir / "sessions.json"
        offset = self.state_dir / "offset.json"
        journal = self.state_dir / "tasks.json"
        present = [p for p in (sessions, offset, journal) if p.exists()]
        if not present:
            return

        def fn(conn: sqlite3.Connection) -> None:
            data = _read_json(sessions)
            chats = data.get("chats", {}) if isinstance(data, dict) else {}
            now = time.time()
            for key, raw in chats.items():
                try:
                    chat_id = int(key)
                    threads = {str(k): str(v) for k, v in (raw.get("threads") or {}).items()}
                    conn.execute(
                        "INSERT OR REPLACE INTO conversations (chat_id, topic, proxy, reset,"
                        " updated) VALUES (?, 0, ?, ?, ?)",
                        (chat_id, raw.get("proxy"), int(bool(raw.get("reset"))), now),
                    )
                    for proxy_id, thread_id in threads.items():
                        conn.execute(
                            "INSERT OR REPLACE INTO threads VALUES (?, 0, ?, ?)",
                            (chat_id, proxy_id, thread_id),
                        )
                except (ValueError, AttributeError, TypeError):
                    log.error("%s: skipping malformed entry for chat %r", sessions, key)
            data = _read_json(offset)
            if isinstance(data, dict) and isinstance(data.get("offset"), int):
                _set_meta(conn, "offset", str(data["offset"]))
            data = _read_json(journal)
            entries = data.get("tasks", []) if isinstance(data, dict) else []
            for seq, raw in enumerate(entries, start=1):
                # The old journal kept no prompt: such a task can only be followed
                # to its answer (if its proxy still has it) or reported lost.
                try:
                    conn.execute(
                        "INSERT OR IGNORE INTO tasks (task_id, seq, chat_id, topic, prompt,"
                        " created, state, proxy_id, dispatched, acked)"
                        " VALUES (?, ?, ?, 0, '', ?, 'acked', ?, ?, ?)",
                        (
                            str(raw["task_id"]),
                            seq,
                            int(raw["chat_id"]),
                            float(raw["started"]),
                            str(raw["proxy_id"]),
                            float(raw["started"]),
                            float(raw["started"]),
                        ),
                    )
                except (KeyError, ValueError, TypeError):
                    log.error("%s: skipping malformed entry %r", journal, raw)

        self.db.write_now(fn)
        for path in present:
            os.replace(path, path.with_name(f"{path.name}.imported"))
        log.info("imported %s into %s", ", ".join(p.name for p in present), self.db.path)

    # ------------------------------------------------------------------ reading (memory)

    def conversation(self, key: ConversationKey) -> Conversation:
        return self.conversations.setdefault(key, Conversation())

    def open_tasks(self, key: ConversationKey | None = None) -> list[TaskRecord]:
        """Tasks not yet done, oldest first: of one conversation (without its /all
        runs' tasks), or of all."""
        if key is not None:
            return list(self._by_conversation.get(key, {}).values())
        return sorted(self.tasks.values(), key=lambda t: t.seq)

    def run_tasks(self, run_id: str) -> list[TaskRecord]:
        """The open tasks of one /all run, oldest first."""
        return list(self._by_run.get(run_id, {}).values())

    def runs(self, key: ConversationKey | None = None) -> list[str]:
        """The /all runs with open tasks (of one conversation, or all)."""
        return [
            run_id
            for run_id, tasks in self._by_run.items()
            if key is None or next(iter(tasks.values())).conversation == key
        ]

    def _lane(self, task: TaskRecord) -> dict[Any, dict[str, TaskRecord]]:
        return self._by_run if task.run_id is not None else self._by_conversation

    def _lane_key(self, task: TaskRecord) -> Any:
        return task.run_id if task.run_id is not None else task.conversation

    def _remember(self, task: TaskRecord) -> None:
        self.tasks[task.task_id] = task
        self._lane(task).setdefault(self._lane_key(task), {})[task.task_id] = task

    def _forget(self, task: TaskRecord) -> None:
        self.tasks.pop(task.task_id, None)
        lanes, key = self._lane(task), self._lane_key(task)
        siblings = lanes.get(key)
        if siblings is not None:
            siblings.pop(task.task_id, None)
            if not siblings:
                del lanes[key]

    def approval(self, task_id: str, approval_id: str) -> ApprovalRecord | None:
        for approval in self.approvals.values():
            if approval.task_id == task_id and approval.approval_id == approval_id:
                return approval
        return None

    # ------------------------------------------------------------------ offset

    async def save_offset(self, offset: int) -> None:
        if offset == self.offset:
            return
        self.offset = offset
        await self.db.write(lambda c: _set_meta(c, "offset", str(offset)), durable=True)

    def save_offset_soon(self, offset: int) -> None:
        """Queue the offset (a failure is logged; Telegram then redelivers, which is safe)."""
        if offset != self.offset:
            self.offset = offset
            self.db.write_soon(lambda c: _set_meta(c, "offset", str(offset)))

    # ------------------------------------------------------------------ conversations

    async def save_conversation(self, key: ConversationKey) -> None:
        conv = attrs.evolve(self.conversation(key))  # a copy: the write runs later
        conv.threads, conv.workdirs = dict(conv.threads), dict(conv.workdirs)
        await self.db.write(lambda c: _write_conversation(c, key, conv))

    # ------------------------------------------------------------------ tasks

    def new_task(
        self,
        chat_id: int,
        topic: int,
        prompt: str,
        *,
        task_id: str,
        timeout_s: float,
        update_id: int | None = None,
        message_id: int | None = None,
        files: list[Attachment] | None = None,
        media_group: str | None = None,
        run_id: str | None = None,
        target: str | None = None,
        notice: str | None = None,
    ) -> TaskRecord:
        """A new prompt; `add_task` makes it durable."""
        self._seq += 1
        task = TaskRecord(task_id, self._seq, chat_id, topic, prompt, time.time())
        task.timeout_s = timeout_s
        task.run_id, task.target, task.notice = run_id, target, notice
        task.update_id = update_id
        task.message_id = message_id
        task.media_group = media_group
        for index, attachment in enumerate(files or []):
            attachment.task_id, attachment.index = task_id, index
            task.files.append(attachment)
        self._remember(task)
        if update_id is not None:
            self.updates.add(update_id)
        return task

    def _running_now(self, task: TaskRecord, proxy_id: str) -> None:
        if task.state == "queued":
            self.running[proxy_id] += 1

    def _not_running(self, task: TaskRecord) -> None:
        if task.state in ("sent", "acked") and task.proxy_id is not None:
            self.running[task.proxy_id] -= 1
            if self.running[task.proxy_id] <= 0:
                del self.running[task.proxy_id]

    def assign(self, task: TaskRecord, proxy_id: str, thread_id: str | None) -> None:
        """Dispatch a task not yet stored: `add_task` then writes it as sent."""
        self._running_now(task, proxy_id)
        task.state, task.proxy_id, task.thread_id = "sent", proxy_id, thread_id
        task.dispatched = time.time()
        self._settle(task, proxy_id)

    def _settle(self, task: TaskRecord, proxy_id: str) -> None:
        """What the task runs with: its conversation's choices at dispatch (kept, so a
        re-sent task frame is the same task)."""
        conv = self.conversation(task.conversation)
        task.model, task.effort, task.cwd = conv.model, conv.effort, conv.workdirs.get(proxy_id)

    async def add_task(self, task: TaskRecord) -> None:
        values = (
            task.task_id,
            task.seq,
            task.chat_id,
            task.topic,
            task.prompt,
            task.created,
            task.state,
            task.timeout_s,
            task.update_id,
            task.message_id,
            task.proxy_id,
            task.thread_id,
            task.dispatched,
            task.model,
            task.effort,
            task.cwd,
            task.media_group,
            task.notice,
            task.run_id,
            task.target,
        )
        files = [_attachment_row(a) for a in task.files]

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO tasks (task_id, seq, chat_id, topic, prompt, created, state,"
                " timeout_s, update_id, message_id, proxy_id, thread_id, dispatched,"
                " model, effort, cwd, media_group, notice, run_id, target)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            c.executemany(_INSERT_ATTACHMENT, files)

        try:
            # Not `durable`: the bot syncs once per batch of updates, before the
            # next getUpdates confirms them to Telegram (`Bot.poll`). Until then a
            # power cut only means the update comes again, with the same task id.
            await self.db.write(fn)
        except BaseException:
            self._not_running(task)
            self._forget(task)
            if task.update_id is not None:
                self.updates.discard(task.update_id)
            raise
        task.persisted.set()

    async def mark_dispatched(self, task: TaskRecord, proxy_id: str, thread_id: str | None) -> None:
        """Committed before the task frame is sent: the task belongs to `proxy_id` from now on.

        Raises `StateError`, and then leaves the task queued, as it was: no
        reconnect sends a task the database does not say was sent.
        """
        before = (task.state, task.proxy_id, task.thread_id, task.dispatched)
        self._running_now(task, proxy_id)
        task.state, task.proxy_id, task.thread_id = "sent", proxy_id, thread_id
        task.dispatched = time.time()
        self._settle(task, proxy_id)
        values = (
            proxy_id,
            thread_id,
            task.dispatched,
            task.model,
            task.effort,
            task.cwd,
            task.notice,
            task.task_id,
        )
        try:
            await self.db.write(
                lambda c: c.execute(
                    "UPDATE tasks SET state = 'sent', proxy_id = ?, thread_id = ?, dispatched = ?,"
                    " model = ?, effort = ?, cwd = ?, notice = ? WHERE task_id = ?",
                    values,
                )
            )
        except StateError:
            if before[0] == "queued":
                self._not_running(task)
            task.state, task.proxy_id, task.thread_id, task.dispatched = before
            raise

    async def add_attachment(
        self, task: TaskRecord, attachment: Attachment, caption: str | None = None
    ) -> None:
        """One more photo of an album the (still queued) task collects; its caption, if
        the task had none."""
        attachment.task_id, attachment.index = task.task_id, len(task.files)
        task.files.append(attachment)
        if attachment.update_id is not None:
            self.updates.add(attachment.update_id)
        if caption and not task.prompt:
            task.prompt = caption
        row, prompt, task_id = _attachment_row(attachment), task.prompt, task.task_id

        def fn(c: sqlite3.Connection) -> None:
            c.execute(_INSERT_ATTACHMENT, row)
            c.execute("UPDATE tasks SET prompt = ? WHERE task_id = ?", (prompt, task_id))

        try:
            await self.db.write(fn)
        except BaseException:
            task.files.remove(attachment)
            if attachment.update_id is not None:
                self.updates.discard(attachment.update_id)
            raise

    async def attachment_stored(self, attachment: Attachment, size: int, sha256: str) -> None:
        """The file's bytes are on the manager's disk."""
        attachment.size, attachment.sha256 = size, sha256
        values = (size, sha256, attachment.task_id, attachment.index)
        await self.db.write(
            lambda c: c.execute(
                "UPDATE attachments SET size = ?, sha256 = ? WHERE task_id = ? AND idx = ?",
                values,
            )
        )

    def mark_acked(self, task: TaskRecord) -> None:
        # Losing this write only means the task is sent once more; the proxy drops repeats.
        task.state, task.acked = "acked", time.time()
        values = (task.acked, task.task_id)
        self.db.write_soon(
            lambda c: c.execute(
                "UPDATE tasks SET state = 'acked', acked = ? WHERE task_id = ? AND state = 'sent'",
                values,
            )
        )

    async def set_cancel(self, task: TaskRecord, cancel: str) -> None:
        task.cancel = cancel
        values = (cancel, task.task_id)
        await self.db.write(
            lambda c: c.execute("UPDATE tasks SET cancel = ? WHERE task_id = ?", values)
        )

    def cancel_acked(self, task: TaskRecord) -> None:
        # Losing this write only means the cancel is sent once more; the proxy applies it once.
        task.cancel = "acked"
        task_id = task.task_id
        self.db.write_soon(
            lambda c: c.execute("UPDATE tasks SET cancel = 'acked' WHERE task_id = ?", (task_id,))
        )

    async def mark_finished(self, task: TaskRecord, outcome: Outcome) -> None:
        """The result is committed (the answer can go out; after `db.sync()` the proxy
        may forget it). Raises `StateError`, and then leaves the task as it was.

        In the same transaction the conversation remembers the thread the task
        ran on, and sticks to its proxy.
        """
        before = (task.state, task.outcome, task.finished, task.diff_key)
        key = task.conversation
        conv = self.conversation(key)
        conv_before = (dict(conv.threads), conv.reset, conv.proxy)
        self._not_running(task)
        task.state, task.outcome, task.finished = "finished", outcome, time.time()
        ours = task.run_id is None  # an /all answer leaves the conversation alone
        if ours and outcome.thread_id and task.proxy_id:
            conv.threads[task.proxy_id] = outcome.thread_id
            conv.reset = False
            conv.proxy = task.proxy_id  # sticky: the conversation lives on this machine now
        after = (dict(conv.threads), conv.reset, conv.proxy)
        copy = attrs.evolve(conv)
        copy.threads, copy.workdirs = dict(conv.threads), dict(conv.workdirs)
        if outcome.diff_bytes and task.proxy_id:
            task.diff_key = secrets.token_urlsafe(9)  # unguessable: it sends a diff
            self.diffs[task.diff_key] = DiffRef(
                task.task_id, task.proxy_id, task.chat_id, task.topic
            )
        values = (outcome.to_json(), task.finished, task.diff_key, task.task_id)

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE tasks SET state = 'finished', outcome = ?, finished = ?, diff_key = ?"
                " WHERE task_id = ?",
                values,
            )
            if ours and outcome.thread_id:
                _write_conversation(c, key, copy)

        try:
            await self.db.write(fn)
        except StateError:
            # Not stored, so as if it never came: the task runs on here (its
            # proxy, never acknowledged, sends the result again), and nothing
            # may deliver an answer the database would forget.
            if task.diff_key is not None and task.diff_key != before[3]:
                self.diffs.pop(task.diff_key, None)
            task.state, task.outcome, task.finished, task.diff_key = before
            if task.state in ("sent", "acked") and task.proxy_id is not None:
                self.running[task.proxy_id] += 1
            if (dict(conv.threads), conv.reset, conv.proxy) == after:  # untouched since
                conv.threads, conv.reset, conv.proxy = conv_before
            raise

    async def mark_parts_sent(self, task: TaskRecord, parts: int, anchor: int | None) -> None:
        """`parts` of the answer are in the chat; `anchor`: part `parts` is now being
        sent, after that message (see `TaskRecord.delivery_anchor`), or None."""
        task.parts_sent = parts
        task.delivery_anchor = anchor
        values = (parts, anchor, task.task_id)
        await self.db.write(
            lambda c: c.execute(
                "UPDATE tasks SET parts_sent = ?, delivery_anchor = ? WHERE task_id = ?", values
            )
        )

    async def mark_done(self, task: TaskRecord, parts: int | None = None) -> None:
        """Every part of the answer is in the chat: the task leaves the journal.

        `parts`: the count of parts sent, when the last one is counted here too.
        """
        self._not_running(task)
        task.state = "done"
        if parts is not None:
            task.parts_sent = parts
        self._forget(task)
        task.poke()  # whoever waits for it to end
        self.done.add(task.task_id)
        values = (time.time(), task.parts_sent, task.task_id)

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE tasks SET state = 'done', done = ?, parts_sent = ?, prompt = '',"
                " outcome = NULL WHERE task_id = ?",
                values,
            )
            c.execute("DELETE FROM attachments WHERE task_id = ?", (values[-1],))

        await self.db.write(fn)

    def save_view(self, task: TaskRecord) -> None:
        values = (task.view_message_id, task.view_key, task.task_id)
        self.db.write_soon(
            lambda c: c.execute(
                "UPDATE tasks SET view_message_id = ?, view_key = ? WHERE task_id = ?", values
            )
        )

    # ------------------------------------------------------------------ approvals

    async def add_approval(self, approval: ApprovalRecord) -> None:
        self.approvals[approval.key] = approval
        values = (*attrs.astuple(approval)[:13], int(approval.decision_acked))
        await self.db.write(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO approvals (task_id, approval_id, key, chat_id, topic,"
                " kind, summary, detail, asked, message_id, state, decision, outcome,"
                " decision_acked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
        )

    async def save_approval(self, approval: ApprovalRecord, *, wait: bool = True) -> None:
        values = (
            approval.message_id,
            approval.state,
            approval.decision,
            approval.outcome,
            int(approval.decision_acked),
            approval.task_id,
            approval.approval_id,
        )
        if not approval.pending:
            self.approvals.pop(approval.key, None)

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE approvals SET message_id = ?, state = ?, decision = ?, outcome = ?,"
                " decision_acked = ? WHERE task_id = ? AND approval_id = ?",
                values,
            )

        if wait:
            await self.db.write(fn)
        else:
            self.db.write_soon(fn)

    def approvals_of(self, task_id: str) -> Iterable[ApprovalRecord]:
        return [a for a in self.approvals.values() if a.task_id == task_id]


_INSERT_ATTACHMENT: Final = (
    "INSERT OR REPLACE INTO attachments (task_id, idx, kind, file_id, name, size, update_id,"
    " sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _attachment_row(a: Attachment) -> tuple[object, ...]:
    return (a.task_id, a.index, a.kind, a.file_id, a.name, a.size, a.update_id, a.sha256)


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _write_conversation(conn: sqlite3.Connection, key: ConversationKey, conv: Conversation) -> None:
    chat_id, topic = key
    conn.execute(
        "INSERT OR REPLACE INTO conversations (chat_id, topic, proxy, reset, updated, model,"
        " effort, mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            chat_id,
            topic,
            conv.proxy,
            int(conv.reset),
            time.time(),
            conv.model,
            conv.effort,
            conv.mode,
        ),
    )
    conn.execute("DELETE FROM threads WHERE chat_id = ? AND topic = ?", (chat_id, topic))
    conn.executemany(
        "INSERT INTO threads (chat_id, topic, proxy_id, thread_id) VALUES (?, ?, ?, ?)",
        [(chat_id, topic, p, t) for p, t in conv.threads.items()],
    )
    conn.execute("DELETE FROM workdirs WHERE chat_id = ? AND topic = ?", (chat_id, topic))
    conn.executemany(
        "INSERT INTO workdirs (chat_id, topic, proxy_id, cwd) VALUES (?, ?, ?, ?)",
        [(chat_id, topic, p, cwd) for p, cwd in conv.workdirs.items()],
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        log.error("%s is unreadable (%s); not imported", path, exc)
        return None
