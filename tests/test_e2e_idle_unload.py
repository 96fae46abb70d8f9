"""An idle Codex thread unloaded by the proxy continues its conversation, end to end.

The real manager, proxy and codex against the fake Bot API and the fake
model. codex 0.169.0 frees a thread about a minute after the proxy's
`thread/unsubscribe` (`thread/closed`); the test waits for that, so the next
message finds the thread really unloaded and codex reads it back from disk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes.loglines import LogLines
from tests.fakes.stack import Stack, open_stack
from tests.test_e2e_telegram import say

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        yield stack


async def test_after_an_idle_unload_the_next_message_continues_the_conversation(
    stack: Stack, logged: LogLines
) -> None:
    async with stack.manager() as hub, stack.proxy(hub, thread_idle_unload_s=1) as proxy:
        new = await say(stack, "remember the word teapot", expect="Echo: remember")
        assert new[-1] == "Echo: remember the word teapot (turn 1)"
        await logged.wait_for("idle for")  # the proxy unsubscribed after 1 s
        await logged.wait_for("codex closed thread", seconds=150)  # codex: ~60 s later
        child = proxy._app._child
        assert child is not None
        assert child.loaded_threads == set()  # what the next message finds
        new = await say(stack, "which word?", expect="Echo: which word?")
    assert new[-1] == "Echo: which word? (turn 2)"  # the model got the earlier turn
    assert stack.model.requests[-1].user_prompts == ["remember the word teapot", "which word?"]
    assert logged.lines("could not be resumed") == []
