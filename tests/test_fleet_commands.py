"""The chat commands with a fleet of hundreds of machines: what fits in a message.

The machines are registered in the hub as a hello would (the commands read the
registry only); the manager, its store and the fake Bot API over HTTP are real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from codexnet.config import ProxyEntry
from codexnet.manager.hub import ProxyConn
from codexnet.manager.service import Manager, run_manager
from tests.fakes.stack import USER, manager_config
from tests.fakes.telegram_api import FakeTelegram, StoredMessage

FLEET = 200


def machine(i: int) -> str:
    return f"m{i:03}"


@pytest.fixture
async def fleet_manager(telegram: FakeTelegram, tmp_path: Path) -> AsyncIterator[Manager]:
    proxies = {
        machine(i): ProxyEntry(f"{machine(i)}-secret-token-0123456789", (f"rack{i % 30:02}",))
        for i in range(FLEET)
    }
    config = manager_config(telegram.base_url, tmp_path / "state", proxies=proxies)
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(run_manager, config)
        hub = manager.hub
        for i in range(150):  # 150 online, 50 never seen
            conn = ProxyConn(machine(i), None, 2, (f"rack{i % 30:02}",), "test")  # type: ignore[arg-type]
            if i == 149:
                conn.health, conn.health_detail = "restarting", "app-server exited with code 1"
            hub.online[machine(i)] = conn
            hub.offline_since.pop(machine(i), None)
            hub._notify_online_changed(machine(i))
        yield manager
        nursery.cancel_scope.cancel()


async def reply_to(telegram: FakeTelegram, command: str, starts: str) -> StoredMessage:
    telegram.push_message(USER, command)
    with trio.fail_after(10):
        await telegram.wait_until(
            lambda: any((m.text or "").startswith(starts) for m in telegram.messages(USER))
        )
    return next(m for m in telegram.messages(USER) if (m.text or "").startswith(starts))


async def test_status_gives_the_counts_and_the_machines_worth_a_look_first(
    telegram: FakeTelegram, fleet_manager: Manager
) -> None:
    status = await reply_to(telegram, "/status", "200 machines")
    lines = (status.text or "").splitlines()
    assert lines[0] == (
        "200 machines: 150 online (149 healthy, 1 not chosen), 50 offline; 0/300 running, 0 queued."
    )
    assert lines[1].startswith("🟡 m149: online since ")
    assert "not chosen: app-server restarting: app-server exited with code 1" in lines[1]
    assert [line.split(":")[0] for line in lines[2:31]] == [
        f"⚪ {machine(i)}" for i in range(150, 179)
    ]
    assert lines[31] == "… and 170 more: 21 offline, 149 idle."
    assert len(status.text or "") < 4096  # one message


async def test_use_offers_the_first_machines_and_labels_and_says_so(
    telegram: FakeTelegram, fleet_manager: Manager
) -> None:
    offer = await reply_to(telegram, "/use", "Pick the machine")
    assert offer.text == (
        "Pick the machine (or a pool of machines by label) for this chat — the first 40 of "
        "150 machines online and the first 20 of 30 labels; /use <name> or "
        "/use label:<label> for the others:"
    )
    markup = offer.reply_markup or {}
    offered = [
        b["callback_data"].split(":", 2)[2] for row in markup["inline_keyboard"] for b in row
    ]
    assert offered[:40] == [machine(i) for i in range(40)]
    assert offered[40:] == [f"label:rack{i:02}" for i in range(20)] + ["auto"]


async def test_an_unknown_machine_names_twenty_of_the_known(
    telegram: FakeTelegram, fleet_manager: Manager
) -> None:
    reply = await reply_to(telegram, "/use nope", "Unknown proxy")
    known = ", ".join(machine(i) for i in range(20))
    assert reply.text == f"Unknown proxy 'nope'. Known: {known} and 180 more."


async def test_a_pool_of_a_hundred_names_twenty(
    telegram: FakeTelegram, fleet_manager: Manager
) -> None:
    reply = await reply_to(telegram, "/use auto", "This chat now uses")
    names = ", ".join(machine(i) for i in range(20))
    assert reply.text == (
        f"This chat now uses any machine (auto): {names} and 180 more (150 online). Each new "
        "conversation goes to the least-loaded healthy machine."
    )


async def test_all_over_more_than_fifty_machines_asks_for_a_label(
    telegram: FakeTelegram, fleet_manager: Manager
) -> None:
    reply = await reply_to(telegram, "/all uptime", "/all would ask")
    assert reply.text == (
        "/all would ask 150 machines; at most 50 at once (each answers in a message of its "
        "own). Narrow it with /all label:<label> <prompt>."
    )
    assert fleet_manager.store.runs((USER, 0)) == []  # nothing was started
