"""Which proxy a chat's prompt goes to.

Order: the chat's sticky choice (`/use`, or the proxy that answered it last),
else `default_proxy`, else the only proxy online. With several online and no
default the person is asked to pick one with `/use`: guessing would start a
conversation on a machine they did not mean.
"""

from __future__ import annotations

from collections.abc import Collection

import attrs


@attrs.frozen
class Route:
    proxy_id: str | None
    why: str  # for the person when proxy_id is None, else how it was chosen


def choose_proxy(
    sticky: str | None, default: str | None, online: Collection[str], known: Collection[str]
) -> Route:
    if sticky is not None and sticky in known:
        return Route(sticky, "chosen for this chat")
    if default is not None:
        return Route(default, "the default proxy")
    if len(online) == 1:
        return Route(next(iter(online)), "the only proxy online")
    if not online:
        return Route(None, "No proxy is online right now. Start one, then try again.")
    names = ", ".join(sorted(online))
    return Route(None, f"Several proxies are online ({names}). Pick one with /use <proxy>.")
