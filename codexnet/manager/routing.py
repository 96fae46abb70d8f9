"""Which machine a conversation is on, for the commands that ask one (/status, /model, /cd…).

The scheduler (`scheduler.decide`) makes the decision for prompts; this is
the same decision without waiting and without a failover: the machine the
conversation lives on or is pinned to, else the one its next message would go
to now, else why there is none.
"""

from __future__ import annotations

import math

import attrs

from codexnet.manager.admission import Admission
from codexnet.manager.scheduler import decide
from codexnet.manager.store import ConversationKey


@attrs.frozen
class Route:
    proxy_id: str | None
    why: str  # for the person when proxy_id is None, else how it was chosen


def route_for(admission: Admission, key: ConversationKey) -> Route:
    chat = admission.chat_of(key)
    if chat.mode.kind in ("pool", "auto") and chat.current is not None:
        return Route(chat.current, "this conversation lives there")
    decision = decide(admission.fleet(), chat, wait_s=math.inf)
    if decision.proxy_id is not None:
        if decision.action == "wait":  # its machine, for now unavailable
            return Route(decision.proxy_id, "offline" if decision.offline else "all slots busy")
        return Route(decision.proxy_id, decision.why or "chosen for this chat")
    return Route(None, decision.why)
