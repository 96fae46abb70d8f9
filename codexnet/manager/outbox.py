"""The Telegram outbox: every message, edit and draft to a chat waits here, once.

Flood limits (Telegram's documented ones) are enforced before Telegram has to:

* per chat, a token bucket: private chats ~1 request per second with a burst
  of 3, groups 20 per minute;
* one global bucket, ~25 requests per second (Telegram allows ~30);
* a 429 pauses that chat for exactly `retry_after`; nothing goes to it inside
  the window (retrying inside it is what turns 30 s into hours).

Scheduling: each chat is a *lane* that carries one request at a time (so a
chat's messages arrive in order, and a send whose fate is unknown can be
checked before anything else lands there). A lane whose next request may go
waits in a heap keyed by that request's priority — answers and failure lines,
then approval questions, then replies, then live-view updates — and the
scheduler wakes exactly that one request when both its chat and the global
bucket allow it. Within a priority, chats take turns (start-time fair
queueing: a lane's place is one past its previous send, and never before the
send going out now), so a chat with ten answer parts waiting holds up the
other chats' first answers by one request, not ten, when the bot's global
budget is the bottleneck. Live-view updates with the same `coalesce` key
replace each other while they wait: only the newest text is ever sent. When
nothing waits anywhere and both buckets allow it, a request takes its lane at
once, without the two passes of the event loop that waking the scheduler and
then the request would cost (the usual case: one answer, an idle outbox).

Delivery: `send(..., until=T)` keeps retrying what surely did not reach
Telegram (429, 5xx, connection refused) with backoff until `T`, and wakes
early as soon as Telegram answers anything again. A `sendMessage` whose fate
is unknown (the connection broke after the request was written) is checked
with `on_unknown="probe"` before it is sent again: Telegram numbers a chat's
messages in order, so the message, if it was posted, is one of the next ids
after the last one we know in that chat, and `editMessageText` with the very
same text answers "message is not modified" for exactly that message. Only if
no such message is found is it sent again (docs/ARCHITECTURE.md).

Chat actions ("typing") do not count toward flood limits and never wait: they
go at once, or not at all while the chat is paused.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from enum import IntEnum
from typing import Any, Final, Literal, NoReturn

import attrs
import trio

from codexnet.backoff import backoff
from codexnet.manager.telegram import (
    RetryAfter,
    TelegramClient,
    TelegramError,
    TelegramUnavailable,
    UploadFiles,
    log_unavailable,
)

log = logging.getLogger(__name__)

PRIVATE_RATE: Final = 1.0  # requests per second
GROUP_RATE: Final = 20 / 60
CHAT_BURST: Final = 3.0
GLOBAL_RATE: Final = 25.0
GLOBAL_BURST: Final = 5.0
# Chat actions in flight at once (the rest wait their turn; see chat_action).
ACTION_SLOTS: Final = 8
RETRY_BACKOFF_S: Final = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
PROBE_SPAN: Final = 5  # message ids checked after the last known one
JITTER_RESERVE_S: Final = 0.1  # network jitter a chat's budget absorbs (see _Bucket.reserve)
CREATES_MESSAGE: Final = frozenset({"sendMessage", "sendDocument"})

OnUnknown = Literal["probe", "resend", "give_up"]
# Awaited in the chat's turn before a request, with its newest known message id.
BeforeRequest = Callable[[int | None], Awaitable[None]]


class Abandoned:
    def __repr__(self) -> str:
        return "ABANDONED"


# What an `abandonable` send returns when the outbox stopped (shutdown) before
# it went out: nothing was sent, so nothing may be counted as sent.
ABANDONED: Final = Abandoned()


class Priority(IntEnum):
    ANSWER = 0  # answers and failure lines
    APPROVAL = 1  # approval questions and their outcome
    REPLY = 2  # replies to commands, notices
    LIVE = 3  # live-view updates


@attrs.define
class _Bucket:
    rate: float
    burst: float
    tokens: float
    stamp: float
    # Tokens kept in reserve: Telegram counts a request when it arrives, we when
    # we send it, and the network's jitter moves one against the other. Without
    # a reserve, a chat sending at the edge of its budget gets the odd 429.
    reserve: float = 0.0

    def ready_at(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = 1 + self.reserve
        return now if self.tokens >= need else now + (need - self.tokens) / self.rate

    def take(self, now: float) -> None:
        # Refill up to `now` first: tokens refilled while the bucket was full
        # (capped at `burst`) must not be granted again after this take.
        self.ready_at(now)
        self.tokens -= 1


@attrs.define(eq=False)
class _Item:
    priority: int
    seq: int
    params: dict[str, Any]
    coalesce: Hashable | None
    abandonable: bool = False
    go: trio.Event = attrs.Factory(trio.Event)
    withdrawn: bool = False
    abandoned: bool = False


@attrs.define(eq=False)
class _Lane:
    chat_id: int
    bucket: _Bucket
    heap: list[tuple[int, int, _Item]] = attrs.Factory(list)
    busy: bool = False
    paused_until: float = 0.0
    version: int = 0
    # Fair queueing: the virtual time at which this lane's next request may
    # start (one past its last one); see Outbox.run.
    finish: int = 0
    coalesced: dict[Hashable, _Item] = attrs.Factory(dict)

    def head(self) -> _Item | None:
        while self.heap and self.heap[0][2].withdrawn:
            heapq.heappop(self.heap)
        return self.heap[0][2] if self.heap else None


@attrs.define
class OutboxStats:
    sent: int = 0  # requests given the go
    wakeups: int = 0  # times a waiting request was woken (once per go)
    at_once: int = 0  # requests that went without waiting (nothing else waited)
    scheduler_wakeups: int = 0
    coalesced: int = 0
    probes: int = 0
    probe_hits: int = 0


class Outbox:
    def __init__(
        self,
        client: TelegramClient,
        *,
        private_rate: float = PRIVATE_RATE,
        group_rate: float = GROUP_RATE,
        chat_burst: float = CHAT_BURST,
        global_rate: float = GLOBAL_RATE,
        global_burst: float = GLOBAL_BURST,
    ) -> None:
        self.client = client
        self._private_rate = private_rate
        self._group_rate = group_rate
        self._chat_burst = chat_burst
        self._global = _Bucket(global_rate, global_burst, global_burst, trio.current_time())
        self._lanes: dict[int, _Lane] = {}
        # (priority, fair start tag, seq, tiebreak, lane version, lane)
        self._ready: list[tuple[int, int, int, int, int, _Lane]] = []
        self._vclock = 0  # the start tag of the last request given the go
        self._timers: list[tuple[float, int, int, _Lane]] = []
        self._tiebreak = itertools.count()
        self._seq = itertools.count()
        self._wake = trio.Event()
        # When the sleeping scheduler will look next, and the earliest the global
        # bucket lets anything go: a lane that cannot go before that needs no wake-up.
        self._next_look = -math.inf
        self._global_free = 0.0
        self._last_message_id: dict[int, int] = {}
        self._stopping = False
        # Chat actions are cosmetic: at most this many in flight, so a burst of
        # "typing" for hundreds of chats never takes the HTTP connections the
        # answers need.
        self._action_slots = trio.CapacityLimiter(ACTION_SLOTS)
        self.stats = OutboxStats()

    # ------------------------------------------------------------------ public

    def note_message_id(self, chat_id: int, message_id: int) -> None:
        """A message in `chat_id` newer than every message of ours this process did
        not post: one it posted, or a person's from an update (polled from the
        offset an earlier process stored, so newer than all it posted but in its
        last poll cycle before a crash).
        Probes start after the newest, so nothing of ours can come after it but
        the send in question (which is why a delivery anchors each part in the
        chat's turn, right before it goes).
        """
        if message_id > self._last_message_id.get(chat_id, 0):
            self._last_message_id[chat_id] = message_id

    def stop(self) -> None:
        """Shutdown: abandonable sends still waiting return `ABANDONED` at once.

        They are the ones that run shielded (an answer part, whose sending and
        counting go together): waiting for their turn must not hold up the
        shutdown. Requests already on the wire finish.
        """
        self._stopping = True
        for lane in self._lanes.values():
            for _, _, item in lane.heap:
                if item.abandonable and not item.go.is_set() and not item.withdrawn:
                    item.abandoned = item.withdrawn = True
                    item.go.set()
            self._schedule(lane)

    async def find_posted(
        self, params: dict[str, Any], *, after: int, priority: Priority = Priority.ANSWER
    ) -> dict[str, Any] | None:
        """Is this `sendMessage` already in the chat, after message `after`? (See `_probe`.)

        For a send whose fate a restart made unknown: the process that sent it
        died before it could record the answer.
        """
        chat_id = int(params["chat_id"])
        lane = self._lane(chat_id)
        item = _Item(int(priority), next(self._seq), params, None)
        await self._wait_turn(lane, item)
        try:
            return await self._probe(lane, params, last=after)
        finally:
            self._release(lane)

    def paused_until(self, chat_id: int) -> float:
        lane = self._lanes.get(chat_id)
        return lane.paused_until if lane else 0.0

    async def chat_action(self, chat_id: int, action: str = "typing", *, topic: int = 0) -> None:
        """A chat action, best effort: never spends the message budget; waits for an action slot."""
        if self.paused_until(chat_id) > trio.current_time():
            return
        params: dict[str, Any] = {"chat_id": chat_id, "action": action}
        if topic:
            params["message_thread_id"] = topic
        try:
            async with self._action_slots:
                await self.client.request("sendChatAction", params)
        except RetryAfter as exc:
            self._lane(chat_id).paused_until = trio.current_time() + exc.retry_after
        except TelegramError as exc:  # typing is cosmetic
            log.debug("sendChatAction failed: %s", exc.description)

    async def send(
        self,
        method: str,
        params: dict[str, Any],
        *,
        priority: Priority,
        until: float | None = None,
        on_unknown: OnUnknown = "resend",
        coalesce: Hashable | None = None,
        files: UploadFiles | None = None,
        abandonable: bool = False,
        before_request: BeforeRequest | None = None,
    ) -> Any:
        """Send `method` to `params["chat_id"]` in its turn; its result.

        Without `until` there is one attempt; with it, 429s, 5xx and network
        failures are retried until the trio deadline `until`. A refusal (4xx)
        raises `TelegramError` at once; "message is not modified" is success
        (None). A coalesced request overtaken by a newer one returns None. An
        `abandonable` one returns `ABANDONED` if the outbox stops before it went.
        `before_request(last)` is awaited in the chat's turn right before each
        attempt, with the chat's newest known message id: nothing else of ours
        goes to the chat until this request has, so a caller that records it
        knows that the only message of ours after it can be this one.
        """
        chat_id = int(params["chat_id"])
        if coalesce is not None:
            waiting = self._lane(chat_id).coalesced.get(coalesce)
            if waiting is not None and not waiting.go.is_set() and not waiting.withdrawn:
                waiting.params = params  # the queued request carries the newest text
                self.stats.coalesced += 1
                return None
        seq = next(self._seq)  # kept across retries: a retried request keeps its place
        failures = 0
        while True:
            if abandonable and self._stopping:
                return ABANDONED
            lane = self._lane(chat_id)
            item = _Item(int(priority), seq, params, coalesce, abandonable)
            await self._wait_turn(lane, item)
            if item.abandoned:
                return ABANDONED
            error: TelegramError | None = None
            found: dict[str, Any] | None = None
            try:
                if before_request is not None:
                    await before_request(self._last_message_id.get(chat_id))
                result = await self.client.request(method, item.params, files=files)
            except RetryAfter as exc:
                self._pause(lane, exc.retry_after)
                error = exc
            except TelegramUnavailable as exc:
                error = exc
                if exc.fate == "unknown" and method == "sendMessage" and on_unknown == "probe":
                    found = await self._probe(
                        lane, item.params, last=self._last_message_id.get(chat_id)
                    )
            except TelegramError as exc:
                error = exc
            finally:
                self._release(lane)
            if error is None:
                if method in CREATES_MESSAGE and isinstance(result, dict):
                    message_id = result.get("message_id")
                    if isinstance(message_id, int):
                        self.note_message_id(chat_id, message_id)
                return result
            if found is not None:
                return found
            if isinstance(error, RetryAfter):
                log.warning(
                    "Telegram 429 on %s: chat %s paused for %s s",
                    method,
                    chat_id,
                    error.retry_after,
                )
                if until is None or trio.current_time() + error.retry_after > until:
                    raise error
                continue
            if isinstance(error, TelegramUnavailable):
                if error.fate == "unknown" and on_unknown == "give_up":
                    raise error
                if until is None or trio.current_time() >= until:
                    raise error
                delay = backoff(RETRY_BACKOFF_S, failures)
                failures += 1
                log_unavailable(
                    log,
                    error,
                    "Telegram %s to chat %s failed (%s); retrying within %.0f s",
                    method,
                    chat_id,
                    error.description,
                    delay,
                )
                await self._wait_retry(delay, until)
                continue
            if error.code == 400 and error.matches("message is not modified"):
                return None
            raise error

    # ------------------------------------------------------------------ scheduling

    def _lane(self, chat_id: int) -> _Lane:
        lane = self._lanes.get(chat_id)
        if lane is None:
            rate = self._private_rate if chat_id > 0 else self._group_rate
            now = trio.current_time()
            bucket = _Bucket(
                rate, self._chat_burst, self._chat_burst, now, reserve=JITTER_RESERVE_S * rate
            )
            lane = _Lane(chat_id, bucket)
            self._lanes[chat_id] = lane
        return lane

    async def _wait_turn(self, lane: _Lane, item: _Item) -> None:
        if self._go_at_once(lane):
            return
        heapq.heappush(lane.heap, (item.priority, item.seq, item))
        if item.coalesce is not None:
            lane.coalesced[item.coalesce] = item
        self._schedule(lane)
        try:
            await item.go.wait()
            if item.abandoned:
                return  # never given the lane: nothing to release
        except BaseException:
            if item.go.is_set():
                self._release(lane)  # given the go just as we were cancelled
            else:
                item.withdrawn = True
                self._schedule(lane)
            raise
        finally:
            if item.coalesce is not None and lane.coalesced.get(item.coalesce) is item:
                del lane.coalesced[item.coalesce]
        self.stats.wakeups += 1

    def _go_at_once(self, lane: _Lane) -> bool:
        """Take the lane now if nothing waits anywhere and both budgets allow it.

        What the scheduler would do at once anyway, without the two passes of
        the event loop it takes to wake it and then the request (the common
        case: one answer, an idle outbox).
        """
        now = trio.current_time()
        if lane.busy or lane.head() is not None or lane.paused_until > now:
            return False
        if self._ready or (self._timers and self._timers[0][0] <= now):
            return False  # others are due: the scheduler puts them in order
        if lane.bucket.ready_at(now) > now or self._global.ready_at(now) > now:
            return False
        self._vclock = max(self._vclock, lane.finish)
        lane.finish = self._vclock + 1
        lane.busy = True
        lane.version += 1
        lane.bucket.take(now)
        self._global.take(now)
        self.stats.sent += 1
        self.stats.at_once += 1
        return True

    def _schedule(self, lane: _Lane) -> None:
        """The lane changed: (re)enter it into the timer heap if it has work and is free."""
        lane.version += 1
        head = lane.head()
        if head is None or lane.busy:
            return
        now = trio.current_time()
        at = max(lane.bucket.ready_at(now), lane.paused_until)
        heapq.heappush(self._timers, (at, next(self._tiebreak), lane.version, lane))
        if max(at, self._global_free) < self._next_look:
            self._wake.set()

    def _release(self, lane: _Lane) -> None:
        lane.busy = False
        self._schedule(lane)
        if not lane.heap and lane.paused_until <= trio.current_time():
            # An idle lane costs nothing to rebuild; keep its bucket only while it matters.
            if lane.bucket.ready_at(trio.current_time()) <= trio.current_time():
                if lane.bucket.tokens >= lane.bucket.burst:
                    self._lanes.pop(lane.chat_id, None)

    def _pause(self, lane: _Lane, seconds: float) -> None:
        lane.paused_until = max(lane.paused_until, trio.current_time() + seconds)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """The scheduler: give the go to one request at a time, in priority order."""
        task_status.started()
        while True:
            now = trio.current_time()
            while self._timers and self._timers[0][0] <= now:
                _, _, version, lane = heapq.heappop(self._timers)
                head = lane.head()
                if version == lane.version and head is not None and not lane.busy:
                    start = max(self._vclock, lane.finish)
                    entry = (head.priority, start, head.seq, next(self._tiebreak), version, lane)
                    heapq.heappush(self._ready, entry)
            while self._ready and not self._valid(self._ready[0]):
                heapq.heappop(self._ready)
            target = math.inf
            global_at = self._global.ready_at(now)
            if self._ready:
                at = global_at
                if at <= now:
                    _, start, *_, lane = heapq.heappop(self._ready)
                    self._vclock = max(self._vclock, start)
                    lane.finish = start + 1
                    item = lane.head()
                    assert item is not None
                    heapq.heappop(lane.heap)
                    lane.busy = True
                    lane.version += 1
                    lane.bucket.take(now)
                    self._global.take(now)
                    self.stats.sent += 1
                    item.go.set()
                    continue
                # Nothing can go before the global bucket allows: lanes whose timers
                # fall due meanwhile join the ready heap then, in one wake-up.
                target = at
            elif self._timers:
                target = max(self._timers[0][0], global_at)
            self._wake = trio.Event()
            self._next_look, self._global_free = target, global_at
            with trio.move_on_at(target):
                await self._wake.wait()
            self._next_look = -math.inf  # awake: _schedule's changes are seen anyway
            self.stats.scheduler_wakeups += 1

    @staticmethod
    def _valid(entry: tuple[int, int, int, int, int, _Lane]) -> bool:
        _, _, seq, _, version, lane = entry
        head = lane.head()
        return version == lane.version and not lane.busy and head is not None and head.seq == seq

    async def _wait_retry(self, delay: float, until: float) -> None:
        """Back off `delay`, but come back as soon as Telegram answers anything again."""
        with trio.move_on_at(min(trio.current_time() + delay, until)):
            await trio.sleep(min(1.0, delay))
            await self.client.wait_success()

    # ------------------------------------------------------------------ unknown fate

    async def _probe(
        self, lane: _Lane, params: dict[str, Any], *, last: int | None
    ) -> dict[str, Any] | None:
        """Was this `sendMessage` posted after all? The message, if it can be found.

        Runs while the lane is still ours, so no other message of ours can land
        in the chat meanwhile: an id after the last known one that holds exactly
        this text can only be the message in question. A false "not found"
        only costs a duplicate; a false "found" cannot happen.
        """
        chat_id = lane.chat_id
        if last is None:
            return None
        self.stats.probes += 1
        probe: dict[str, Any] = {
            k: params[k] for k in ("chat_id", "text", "entities", "reply_markup") if k in params
        }
        for message_id in range(last + 1, last + 1 + PROBE_SPAN):
            await self._take_inline(lane)
            try:
                result = await self.client.request(
                    "editMessageText", {**probe, "message_id": message_id}
                )
            except (RetryAfter, TelegramUnavailable):
                return None
            except TelegramError as exc:
                if exc.matches("message is not modified"):
                    result = {"message_id": message_id, "chat": {"id": chat_id}}
                elif exc.matches("not found") or exc.matches("can't be edited"):
                    continue  # no such message here, or someone else's
                else:
                    return None
            if not isinstance(result, dict):
                return None
            log.info(
                "chat %s: a send whose answer was lost had been posted (message %s)",
                chat_id,
                message_id,
            )
            self.stats.probe_hits += 1
            self.note_message_id(chat_id, message_id)
            return result
        return None

    async def _take_inline(self, lane: _Lane) -> None:
        """Wait for the chat's and the global bucket without giving the lane up."""
        now = trio.current_time()
        at = max(lane.bucket.ready_at(now), self._global.ready_at(now), lane.paused_until)
        await trio.sleep_until(at)
        now = trio.current_time()
        lane.bucket.take(now)
        self._global.take(now)
