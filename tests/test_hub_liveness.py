"""The hub's heartbeat at its real socket: a proxy that pings is heard without
being pinged back, one that does not is probed, a silent one is dropped.

The peer is a bare wsproto client over TCP, so the test sees every ping the hub
sends and decides itself whether to answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Ping, Pong, Request, TextMessage

from codexnet.config import ProxyEntry
from codexnet.manager import hub as hub_module
from codexnet.protocol import PROTOCOL_VERSION, Hello, encode
from tests.fakes.hubrun import HubRunner, open_hub

TOKEN = "right-token-p1-0123456789"
TIMEOUT = 1.0  # heartbeat_timeout_s: the hub sweeps every 0.1 s


@pytest.fixture(autouse=True)
def rtt_ping_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "RTT_EVERY_S", 60.0)


@pytest.fixture
async def hub() -> AsyncIterator[HubRunner]:
    async with open_hub({"p1": ProxyEntry(TOKEN)}, heartbeat_timeout_s=TIMEOUT) as runner:
        yield runner


@attrs.define
class BareProxy:
    """A registered proxy as bytes: counts the hub's pings, answers them only if told."""

    stream: trio.SocketStream
    ws: WSConnection
    answer_pings: bool = True
    pings_from_hub: int = 0

    async def pump(self) -> None:
        while data := await self.stream.receive_some(65536):
            self.ws.receive_data(data)
            for event in self.ws.events():
                await self._on(event)

    async def _on(self, event: Event) -> None:
        if isinstance(event, Ping):
            self.pings_from_hub += 1
            if self.answer_pings:
                await self.stream.send_all(self.ws.send(event.response()))

    async def ping(self) -> None:
        await self.stream.send_all(self.ws.send(Ping(b"hb")))


@asynccontextmanager
async def bare_proxy(hub: HubRunner) -> AsyncIterator[BareProxy]:
    stream = await trio.open_tcp_stream("127.0.0.1", hub.hub.port)
    async with stream, trio.open_nursery() as nursery:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/")))
        with trio.fail_after(5):
            while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                ws.receive_data(await stream.receive_some(65536))
        hello = Hello(proxy_id="p1", token=TOKEN, protocol=PROTOCOL_VERSION, capacity=1)
        await stream.send_all(ws.send(TextMessage(encode(hello))))
        proxy = BareProxy(stream, ws)
        nursery.start_soon(proxy.pump)
        with trio.fail_after(5):
            conn = await hub.hub.wait_online("p1")
        assert conn is not None
        yield proxy
        nursery.cancel_scope.cancel()


async def test_a_proxy_that_pings_is_heard_and_not_pinged_back(hub: HubRunner) -> None:
    async with bare_proxy(hub) as proxy:
        conn = hub.hub.online["p1"]
        for _ in range(6):  # 2 timeouts, a ping every third of it
            await proxy.ping()
            await trio.sleep(TIMEOUT / 3)
        assert hub.hub.online.get("p1") is conn
        # The first ping of ours, for the round trip; none for liveness (a ping
        # at 70 % of the timeout would be 2 or 3; 2 allows for a slow machine).
        assert 1 <= proxy.pings_from_hub <= 2
        assert conn.rtt is not None


async def test_a_quiet_proxy_is_pinged_and_stays_online_while_it_answers(
    hub: HubRunner,
) -> None:
    async with bare_proxy(hub) as proxy:
        conn = hub.hub.online["p1"]
        await trio.sleep(TIMEOUT * 2)
        assert hub.hub.online.get("p1") is conn
        assert proxy.pings_from_hub >= 2  # one each time it was silent for 70 % of the timeout


async def test_a_silent_proxy_is_marked_offline_within_the_timeout(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    async with bare_proxy(hub) as proxy:
        proxy.answer_pings = False  # a half-dead link: bytes go, nothing comes back
        started = trio.current_time()
        with trio.fail_after(TIMEOUT * 3):
            while "p1" in hub.hub.online:
                await hub.hub.wait_change()
        took = trio.current_time() - started
    assert TIMEOUT <= took < TIMEOUT + 0.5  # the timeout, then at most a sweep and a bit
    [line] = [r.getMessage() for r in caplog.records if "silent for" in r.getMessage()]
    assert line.startswith("proxy 'p1' silent for ")
    assert line.endswith(" s (half-dead link?); marking it offline")


async def test_any_bytes_from_the_proxy_count_as_hearing_from_it(hub: HubRunner) -> None:
    """Not only answers to our pings: anything it sends (here stray pongs) is proof of life."""
    async with bare_proxy(hub) as proxy:
        proxy.answer_pings = False
        conn = hub.hub.online["p1"]
        for _ in range(8):
            await proxy.stream.send_all(proxy.ws.send(Pong(b"unsolicited")))
            await trio.sleep(TIMEOUT / 4)
        assert hub.hub.online.get("p1") is conn
