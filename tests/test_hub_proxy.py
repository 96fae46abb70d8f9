"""Manager hub ↔ proxy over real WebSockets on 127.0.0.1, with a scripted app-server.

Covers registration, the token check, bad frames, and delivery across a
dropped socket. The real codex runs in tests/test_e2e_*.py.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed

from codexnet.config import ProxyEntry
from codexnet.manager.dispatcher import Dispatcher
from codexnet.manager.hub import Hub
from codexnet.manager.service import open_store
from codexnet.manager.store import TaskRecord
from codexnet.protocol import CLOSE_BAD_FRAME, CLOSE_UNAUTHORIZED, PROTOCOL_VERSION
from codexnet.proxy.appserver import AppServer
from codexnet.proxy.service import ProxyRefused, ProxyService
from codexnet.wsclient import connect_websocket
from tests.fakes.hubrun import HubRunner, open_hub, serve_hub
from tests.fakes.logwatch import watching
from tests.fakes.rawproxy import raw_proxy
from tests.fakes.relay import TcpRelay
from tests.test_appserver import fake_codex, proxy_config

PROXIES = {"p1": ProxyEntry("right-token-p1", ("gpu",)), "p2": ProxyEntry("right-token-p2")}


@pytest.fixture
async def hub() -> AsyncIterator[HubRunner]:
    async with open_hub(PROXIES) as runner:
        yield runner


def make_proxy(
    tmp_path: Path, hub: HubRunner, proxy_id: str = "p1", token: str = "right-token-p1"
) -> ProxyService:
    config = attrs.evolve(
        proxy_config(tmp_path, fake_codex(tmp_path)),
        manager_ws=f"ws://127.0.0.1:{hub.port}",
        proxy_id=proxy_id,
        proxy_token=token,
    )
    return ProxyService(config, AppServer(config))


@pytest.fixture
async def proxy(tmp_path: Path, hub: HubRunner) -> AsyncIterator[ProxyService]:
    service = make_proxy(tmp_path, hub)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        with trio.fail_after(20):
            await hub.hub.wait_online("p1")
        yield service
        nursery.cancel_scope.cancel()


async def test_a_registered_proxy_runs_a_task(hub: HubRunner, proxy: ProxyService) -> None:
    conn = hub.hub.online["p1"]
    assert conn.labels == ("gpu",)
    assert conn.capacity == 2
    with trio.fail_after(20):
        result = await hub.run_task("p1", "hello")
    assert result.status == "completed"
    assert result.text == "Echo: hello"
    assert result.thread_id
    with trio.fail_after(20):
        again = await hub.run_task("p1", "again", thread_id=result.thread_id)
    assert again.thread_id == result.thread_id


async def test_wrong_token_is_refused_and_logged_without_the_token(
    tmp_path: Path, hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service = make_proxy(tmp_path, hub, token="wrong-token-xyz")
    with (
        trio.fail_after(20),
        pytest.RaisesGroup(
            pytest.RaisesExc(ProxyRefused, match="wrong token"), flatten_subgroups=True
        ),
    ):
        await service.run()
    assert "p1" not in hub.hub.online
    assert "refusing a proxy from 127.0.0.1" in caplog.text
    assert "wrong token for proxy 'p1'" in caplog.text  # the operator is told which
    assert "wrong-token-xyz" not in caplog.text
    assert "right-token-p1" not in caplog.text


async def test_unknown_proxy_is_refused_like_a_wrong_token(
    tmp_path: Path, hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_proxy(tmp_path, hub, proxy_id="intruder")
    with (
        trio.fail_after(20),
        pytest.RaisesGroup(
            # The peer cannot tell an unknown id from a wrong token.
            pytest.RaisesExc(
                ProxyRefused, match=r"unknown proxy id or wrong token \(close code 4401\)"
            ),
            flatten_subgroups=True,
        ),
    ):
        await service.run()
    assert "unknown proxy id 'intruder'" in caplog.text


async def test_the_same_proxy_started_twice_backs_off_instead_of_flapping(
    tmp_path: Path, hub: HubRunner, caplog: pytest.LogCaptureFixture, nursery: trio.Nursery
) -> None:
    caplog.set_level(logging.INFO)
    with watching() as log:
        async with raw_proxy(hub.port, "p1", "right-token-p1"):  # the first one, alive
            registered = hub.hub.online["p1"]
            second = make_proxy(tmp_path, hub)  # the same id and token, started again
            nursery.start_soon(second.run)
            with trio.fail_after(20):
                await log.wait_for("retrying in 60 s")
            closed = await log.wait_for("connection to the manager closed: 4409")
            assert closed.startswith(
                "connection to the manager closed: 4409 proxy p1 is already connected from"
            )
            assert not second.connected.is_set()
            assert hub.hub.online["p1"] is registered  # no flapping: the first keeps its place
            refused = hub.hub.notices.total["second connections of proxy 'p1' refused"]
            assert refused == 1


async def test_a_bad_frame_closes_that_connection_only(hub: HubRunner, proxy: ProxyService) -> None:
    url = f"ws://127.0.0.1:{hub.port}"
    for raw in ("not json", '{"type": "hello"}', '{"type": "task", "task_id": "x"}'):
        with trio.fail_after(10):
            async with connect_websocket(url) as ws:
                await ws.send_message(raw)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == CLOSE_BAD_FRAME
    # A wrong token from a raw client: refused, with the same code as an unknown id.
    async with connect_websocket(url) as ws:
        await ws.send_message(
            '{"type":"hello","proxy_id":"p2","token":"nope","protocol":'
            f'{PROTOCOL_VERSION},"capacity":1}}'
        )
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
    assert info.value.reason is not None
    assert info.value.reason.code == CLOSE_UNAUTHORIZED
    # The hub and the good proxy are unaffected.
    with trio.fail_after(20):
        result = await hub.run_task("p1", "still here")
    assert result.text == "Echo: still here"


async def test_a_dropped_socket_loses_no_result(hub: HubRunner, proxy: ProxyService) -> None:
    with trio.fail_after(20):
        task = await hub.start_task("p1", "slow")
        while task.state != "acked":
            await task.changed.wait()
        first = hub.hub.online["p1"]
        await first.ws.aclose()  # the network drops mid-task
        await first.closed.wait()
        second = await hub.hub.wait_online("p1")  # the proxy reconnects by itself
        result = await hub.wait(task)
    assert second is not first
    assert result.text == "Echo: slow"
    assert result.status == "completed"


async def test_wss_with_the_managers_own_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ssl)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    hub = Hub(PROXIES)
    async with open_store(":memory:") as store, trio.open_nursery() as nursery:
        dispatcher = Dispatcher(store, hub)
        dispatcher.nursery = nursery
        runner = HubRunner(hub, store, dispatcher)
        await nursery.start(partial(hub.serve, "127.0.0.1", 0, ssl_context=server_ssl))
        # Without the CA the proxy cannot verify the manager, says so, and keeps trying.
        untrusting = make_proxy(tmp_path, runner)
        untrusting = ProxyService(
            attrs.evolve(untrusting._config, manager_ws=f"wss://127.0.0.1:{hub.port}"),
            untrusting._app,
        )
        caplog.set_level(logging.WARNING)
        with trio.move_on_after(3):
            await untrusting.run()
        assert "certificate verify failed" in caplog.text
        assert hub.online == {}
        # With manager_ca_file it connects and works.
        base = make_proxy(tmp_path, runner)
        config = attrs.evolve(
            base._config, manager_ws=f"wss://127.0.0.1:{hub.port}", manager_ca_file=ca_file
        )
        service = ProxyService(config, AppServer(config))
        nursery.start_soon(service.run)
        with trio.fail_after(20):
            await hub.wait_online("p1")
            result = await runner.run_task("p1", "over tls")
        assert result.text == "Echo: over tls"
        nursery.cancel_scope.cancel()


async def test_a_task_beyond_capacity_waits_and_says_so(tmp_path: Path, hub: HubRunner) -> None:
    base = make_proxy(tmp_path, hub)
    config = attrs.evolve(base._config, capacity=1)
    service = ProxyService(config, AppServer(config))
    steps: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        with trio.fail_after(20):
            await hub.hub.wait_online("p1")
        with trio.fail_after(30):
            first = await hub.start_task("p1", "slow")
            while not first.text:  # it streams, so it holds the only slot
                await first.changed.wait()
            second = await hub.start_task("p1", "second")

            def record(task: TaskRecord) -> None:
                steps.append(task.step)

            results = [await hub.wait(second, record), await hub.wait(first)]
        nursery.cancel_scope.cancel()
    assert sorted(r.text for r in results) == ["Echo: second", "Echo: slow"]
    assert "queued: all 1 slots of this machine are busy" in steps


async def test_a_half_dead_link_is_noticed_by_both_ends_within_the_heartbeat(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    heartbeat = 1.5
    runner = await nursery.start(partial(serve_hub, PROXIES, heartbeat_timeout_s=heartbeat))
    relay = TcpRelay("127.0.0.1", runner.port)
    port = await nursery.start(relay.serve)
    base = make_proxy(tmp_path, runner)
    config = attrs.evolve(
        base._config, manager_ws=f"ws://127.0.0.1:{port}", heartbeat_timeout_s=heartbeat
    )
    service = ProxyService(config, AppServer(config))
    nursery.start_soon(service.run)
    with trio.fail_after(20):
        first = await runner.hub.wait_online("p1")
        await trio.sleep(heartbeat)  # a few heartbeats go through: the RTT is known
        assert first.rtt is not None
        assert service.rtt is not None
        relay.blackhole(new_connections="work")  # sockets open, bytes vanish
        dead = trio.current_time()
        while runner.hub.online.get("p1") is first:
            await runner.hub.wait_change()
        noticed = trio.current_time() - dead
        second = await runner.hub.wait_online("p1")  # the proxy came back on a new link
        back = trio.current_time() - dead
    assert second is not first
    assert noticed <= heartbeat + 0.5
    assert back <= heartbeat + 1.5
    result = await runner.run_task("p1", "after the black hole")
    assert result.text == "Echo: after the black hole"
