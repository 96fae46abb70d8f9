"""`python -m codexnet.manager`: the Telegram bot and the hub proxies connect to.

One-shot mode (no Telegram): `--ws-only --ws-listen 127.0.0.1:8765
--dispatch-proxy proxy1 --prompt ping --timeout 60` waits for the proxy,
runs one prompt, prints the answer and exits 0; on timeout or error it prints
one line to stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import attrs
import trio

from codexnet.cli import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STATE,
    run_service,
    run_until_signal,
)
from codexnet.config import DEFAULT_MANAGER_CONFIG, ConfigError, load_manager_config, parse_listen
from codexnet.db import StateError
from codexnet.logs import setup_logging
from codexnet.manager.hub import Hub
from codexnet.manager.service import TaskFailed, run_manager, run_once
from codexnet.manager.telegram import TelegramFatal

log = logging.getLogger("codexnet.manager")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codexnet-manager",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file (default: ./{DEFAULT_MANAGER_CONFIG})",
    )
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--ws-only", action="store_true", help="run only the WebSocket hub (no Telegram)"
    )
    parser.add_argument("--ws-listen", help="HOST:PORT, overrides manager_ws_listen")
    parser.add_argument(
        "--dispatch-proxy",
        metavar="PROXY_ID",
        help="with --ws-only: run --prompt on this proxy, print the answer, exit",
    )
    parser.add_argument("--prompt", help="the prompt for --dispatch-proxy")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds for --dispatch-proxy to wait for the proxy and the answer",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dispatch_proxy and not (args.ws_only and args.prompt):
        parser.error("--dispatch-proxy needs --ws-only and --prompt")
    setup_logging(args.log_level)
    try:
        config = load_manager_config(args.config, require_telegram=not args.ws_only)
        listen = config.manager_ws_listen
        if args.ws_listen:
            listen = parse_listen(args.ws_listen)
        server_ssl = config.ssl_context()  # loads the certificate now, so errors are clean
    except ConfigError as exc:
        print(f"codexnet-manager: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{config.source}: OK ({len(config.proxies)} proxies)")
        return EXIT_OK

    if args.dispatch_proxy:
        if args.dispatch_proxy not in config.proxies:
            print(
                f"codexnet-manager: proxy {args.dispatch_proxy!r} is not listed under "
                f"proxies in {config.source}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        hub = Hub(config.proxies, heartbeat_timeout_s=config.heartbeat_timeout_s)
        try:
            result = trio.run(
                lambda: run_once(
                    hub,
                    *listen,
                    args.dispatch_proxy,
                    args.prompt,
                    timeout_s=args.timeout,
                    ssl_context=server_ssl,
                )
            )
        except TaskFailed as exc:
            print(f"codexnet-manager: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if result.status != "completed":
            print(f"codexnet-manager: task {result.status}: {result.error}", file=sys.stderr)
            return EXIT_FAILED
        print(result.text)
        return EXIT_OK

    if args.ws_only:

        async def hub_only() -> None:
            hub = Hub(config.proxies, heartbeat_timeout_s=config.heartbeat_timeout_s)
            await hub.serve(*listen, ssl_context=server_ssl)

        trio.run(run_until_signal, hub_only)
        return EXIT_OK

    config = attrs.evolve(config, manager_ws_listen=listen)
    fatal = run_service(lambda: run_manager(config), (TelegramFatal, StateError))
    if isinstance(fatal, StateError):
        log.error("%s", fatal)
        return EXIT_STATE
    if fatal is not None:
        log.error("Telegram refused the bot: %s", fatal)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
