"""ShutdownGrace: protected steps finish on shutdown, but only for a bounded time."""

from __future__ import annotations

import trio
import trio.testing

from codexnet.manager.grace import ShutdownGrace


async def test_a_protected_step_survives_cancellation_and_is_then_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    grace = ShutdownGrace(10)
    finished: list[str] = []

    async def step(name: str, seconds: float) -> None:
        with grace.protect():
            await trio.sleep(seconds)
            finished.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(step, "quick", 3)
        nursery.start_soon(step, "stuck", 1000)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()  # shutdown starts
        grace.begin()
    assert finished == ["quick"]  # finished in spite of the cancel; "stuck" was cut off
    assert trio.current_time() == 11  # 1 s running + 10 s of grace, not 1000
    assert grace.stopping


async def test_a_step_protected_after_shutdown_began_gets_the_same_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    grace = ShutdownGrace(5)
    grace.begin()
    with grace.protect() as scope:
        await trio.sleep(100)
    assert scope.cancelled_caught
    assert trio.current_time() == 5
