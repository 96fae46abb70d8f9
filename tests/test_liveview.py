"""Live view throttling and approval timeouts, in memory with virtual time."""

from __future__ import annotations

import itertools

import trio
import trio.testing

from codexnet.manager.liveview import SHOW_AFTER_S, LiveView
from codexnet.manager.outbox import Outbox
from codexnet.manager.telegram import TelegramClient
from tests.conftest import GROUP
from tests.fakes.stack import USER
from tests.fakes.telegram_api import FakeTelegram


async def show(nursery: trio.Nursery, view: LiveView) -> None:
    """Start the view and let it appear (it waits `SHOW_AFTER_S` first)."""
    nursery.start_soon(view.run)
    await trio.sleep(SHOW_AFTER_S + 0.01)


def requests_to(fake: FakeTelegram, method: str, chat_id: int) -> list[float]:
    return [r.time for r in fake.requests if r.method == method and r.params["chat_id"] == chat_id]


async def stream(view: LiveView, seconds: int, per_second: int = 20) -> None:
    """Feed the view far faster than it may update: 20 new texts a second."""
    text = ""
    for i in range(seconds * per_second):
        text += f"w{i} "
        view.update(text, "writing the answer")
        await trio.sleep(1 / per_second)


async def test_private_view_updates_at_most_once_a_second_with_the_newest_text(
    fake: FakeTelegram,
    outbox: Outbox,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    view = LiveView(outbox, USER, "proxy1", interval=1.0, use_draft=True, cancel_data="c:1")
    await show(nursery, view)
    await stream(view, 10)
    await trio.sleep(2)
    drafts = requests_to(fake, "sendMessageDraft", USER)
    gaps = [b - a for a, b in itertools.pairwise(drafts)]
    assert 8 <= len(drafts) <= 12
    assert min(gaps) >= 1.0
    # The last update shows the newest text: coalescing never loses the tail.
    assert fake.drafts(USER)[next(iter(fake.drafts(USER)))][-1].endswith("w199")
    assert fake.stats.too_many_requests == 0
    # The status message with the Cancel button was sent once, first.
    [status] = fake.messages(USER)
    assert status.reply_markup == {
        "inline_keyboard": [[{"text": "⏹ Cancel", "callback_data": "c:1"}]]
    }


async def test_group_view_edits_at_most_every_3_s(
    fake: FakeTelegram,
    outbox: Outbox,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    view = LiveView(outbox, GROUP, "proxy1", interval=3.0, use_draft=False, cancel_data="c:1")
    await show(nursery, view)
    await stream(view, 30)
    edits = requests_to(fake, "editMessageText", GROUP)
    gaps = [b - a for a, b in itertools.pairwise(edits)]
    assert 8 <= len(edits) <= 11
    assert min(gaps) >= 3.0
    assert fake.stats.too_many_requests == 0
    # Each edit keeps the Cancel button.
    [status] = fake.messages(GROUP)
    assert status.reply_markup is not None


async def test_nothing_is_sent_when_nothing_changes(
    fake: FakeTelegram,
    outbox: Outbox,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    view = LiveView(outbox, GROUP, "proxy1", interval=3.0, use_draft=False, cancel_data="c:1")
    await show(nursery, view)
    view.update("same", "thinking")
    await trio.sleep(4)
    sent = len(requests_to(fake, "editMessageText", GROUP))
    for _ in range(50):
        view.update("same", "thinking")
        await trio.sleep(0.01)
    assert len(requests_to(fake, "editMessageText", GROUP)) == sent
    # Only the clock in the header moves it on, in 5 s steps: one edit per step at most.
    await trio.sleep(10)
    assert len(requests_to(fake, "editMessageText", GROUP)) <= sent + 3


async def test_a_429_pauses_the_chat_and_nothing_goes_out_inside_the_window(
    fake: FakeTelegram,
    outbox: Outbox,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    view = LiveView(outbox, USER, "proxy1", interval=1.0, use_draft=True, cancel_data="c:1")
    await show(nursery, view)
    fake.fail_next("sendMessageDraft", error_code=429, retry_after=30)
    await stream(view, 40)
    assert fake.stats.too_many_requests == 1
    assert fake.stats.early_retries == 0  # nothing reached Telegram inside the 30 s
    drafts = requests_to(fake, "sendMessageDraft", USER)
    paused = [t for t in drafts if drafts[0] < t < drafts[0] + 30]
    assert paused == []
    assert len(drafts) >= 5  # and it carried on afterwards


async def test_a_refused_draft_falls_back_to_editing(
    fake: FakeTelegram,
    outbox: Outbox,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused: list[bool] = []
    view = LiveView(
        outbox,
        USER,
        "proxy1",
        interval=1.0,
        use_draft=True,
        cancel_data="c:1",
        on_draft_refused=lambda: refused.append(True),
    )
    await show(nursery, view)
    fake.fail_next(
        "sendMessageDraft", error_code=400, description="Bad Request: TEXTDRAFT_PEER_INVALID"
    )
    await stream(view, 3)
    assert refused == [True]
    assert not view.use_draft
    assert requests_to(fake, "editMessageText", USER)


async def test_a_deleted_status_message_is_sent_again(
    fake: FakeTelegram,
    tg: TelegramClient,
    outbox: Outbox,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    view = LiveView(outbox, GROUP, "proxy1", interval=3.0, use_draft=False, cancel_data="c:1")
    await show(nursery, view)
    assert view.status_message_id is not None
    await tg.call("deleteMessage", {"chat_id": GROUP, "message_id": view.status_message_id})
    await stream(view, 5)
    await trio.sleep(4)  # virtual: one more interval for the newest text
    assert len(fake.messages(GROUP)) == 1  # a new one replaced the deleted one
    assert "w99" in (fake.messages(GROUP)[0].text or "")


async def test_a_quick_task_gets_no_live_view_at_all(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    view = LiveView(outbox, USER, "proxy1", interval=1.0, use_draft=True, cancel_data="c:1")
    with trio.move_on_after(SHOW_AFTER_S * 0.9):  # the answer came back this fast
        await view.run()
    assert fake.requests == []
    await view.finish("✅ Done", until=trio.current_time() + 60)  # nothing to edit either
    assert fake.requests == []
