"""`python -m codexnet.manager`: the Telegram bot and the hub proxies connect to.

First run: `--init` asks for the bot token and your first message, then writes
this config and a proxy config for this machine. `--add-proxy NAME` adds a
machine and prints its proxy config.

One-shot mode (no Telegram): `--ws-only --ws-listen 127.0.0.1:8765
--dispatch-proxy proxy1 --prompt ping --timeout 60` waits for the proxy,
runs one prompt, prints the answer and exits 0; on timeout or error it prints
one line to stderr and exits non-zero.

Exit codes: 0 stopped cleanly, 1 failed, 2 config error (restarting cannot
help), 3 Telegram refused the bot token, 4 the state database cannot be used.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final

import attrs
import trio

from codexnet import sdnotify
from codexnet.checks import Finding, StateDirCheck, check_manager, errors
from codexnet.cli import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STATE,
    Parser,
    add_common_arguments,
    bind_error,
    run_service,
    run_until_signal,
)
from codexnet.config import (
    DEFAULT_MANAGER_CONFIG,
    DEFAULT_TELEGRAM_API_BASE,
    ConfigError,
    ConfigMissing,
    ManagerConfig,
    load_manager_config,
    parse_listen,
)
from codexnet.logs import setup_logging
from codexnet.manager.setup_wizard import (
    DEFAULT_WAIT_S,
    InitOptions,
    add_proxy,
    default_proxy_config_for,
    offer_init,
    run_init,
)

PROG: Final = "codexnet-manager"
log = logging.getLogger("codexnet.manager")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
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
    add_common_arguments(parser)
    setup = parser.add_argument_group("set-up")
    setup.add_argument(
        "--init",
        action="store_true",
        help="ask for the bot token and your first message; write this config and a "
        "proxy config for this machine",
    )
    setup.add_argument("--force", action="store_true", help="let --init replace existing files")
    setup.add_argument(
        "--proxy-config",
        type=Path,
        default=None,
        metavar="PATH",
        help="where --init writes this machine's proxy config (default: beside --config)",
    )
    setup.add_argument(
        "--init-timeout",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help=f"how long --init waits for your message (default: {DEFAULT_WAIT_S:g})",
    )
    setup.add_argument(
        "--add-proxy",
        metavar="NAME",
        help="add a machine to the config and print its proxy config",
    )
    oneshot = parser.add_argument_group("one-shot mode")
    oneshot.add_argument(
        "--ws-only", action="store_true", help="run only the WebSocket hub (no Telegram)"
    )
    oneshot.add_argument("--ws-listen", help="HOST:PORT, overrides manager_ws_listen")
    oneshot.add_argument(
        "--dispatch-proxy",
        metavar="PROXY_ID",
        help="with --ws-only: run --prompt on this proxy, print the answer, exit",
    )
    oneshot.add_argument("--prompt", help="the prompt for --dispatch-proxy")
    oneshot.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds for --dispatch-proxy to wait for the proxy and the answer",
    )
    return parser


def _init_options(args: argparse.Namespace, config: Path) -> InitOptions:
    return InitOptions(
        config=config,
        proxy_config=args.proxy_config or default_proxy_config_for(config),
        force=args.force,
        api_base=os.environ.get("TELEGRAM_API_BASE") or DEFAULT_TELEGRAM_API_BASE,
        wait_s=args.init_timeout,
    )


def _load(args: argparse.Namespace) -> ManagerConfig | int:
    """The config, or the exit code after saying why there is none."""
    try:
        try:
            return load_manager_config(args.config, require_telegram=not args.ws_only)
        except ConfigMissing as missing:
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
            if args.check_config or args.ws_only or not interactive:
                print(
                    f"{PROG}: {missing.path}: file not found; create it with "
                    f"`python -m codexnet.manager --init` or from config.manager.example.jsonc",
                    file=sys.stderr,
                )
                return EXIT_CONFIG
            code = offer_init(_init_options(args, missing.path))
            if code is not None:
                return code
            return load_manager_config(args.config, require_telegram=True)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _report(findings: list[Finding], ok: str) -> int:
    """--check-config: every finding, then OK (exit 0) or nothing more (exit 2)."""
    for finding in findings:
        if finding.fatal:
            print(f"{PROG}: config error: {finding}", file=sys.stderr)
        else:
            print(f"WARNING: {finding}", file=sys.stderr)
    if errors(findings):
        return EXIT_CONFIG
    warnings = len(findings)
    print(ok + (f", {warnings} warning{'s' if warnings > 1 else ''}" if warnings else "") + ")")
    return EXIT_OK


def _run_listening(run: Callable[[], int], host: str, port: int, key: str) -> int:
    """`run()`, with a port that cannot be bound as one line instead of a traceback."""
    try:
        return run()
    except Exception as exc:
        error = bind_error(exc)
        if error is None:
            raise
        print(
            f"{PROG}: cannot listen on {host}:{port} ({key}): {os.strerror(error.errno or 0)}",
            file=sys.stderr,
        )
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dispatch_proxy and not (args.ws_only and args.prompt):
        parser.error("--dispatch-proxy needs --ws-only and --prompt")
    setup_logging(args.log_level)
    if args.init:
        return run_init(_init_options(args, args.config or Path(DEFAULT_MANAGER_CONFIG)))
    if args.add_proxy:
        return add_proxy(args.config or Path(DEFAULT_MANAGER_CONFIG), args.add_proxy)

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    config = loaded
    try:
        listen = parse_listen(args.ws_listen) if args.ws_listen else config.manager_ws_listen
        server_ssl = config.ssl_context()  # loads the certificate now, so errors are clean
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # The hub alone keeps no state; everything else needs a writable state_dir.
    state: StateDirCheck = "skip" if args.ws_only else "check" if args.check_config else "create"
    findings = check_manager(config, state_dir=state)
    if args.check_config:
        return _report(findings, f"{config.source}: OK ({len(config.proxies)} proxies")
    if errors(findings):
        for finding in errors(findings):
            print(f"{PROG}: config error: {finding}", file=sys.stderr)
        return EXIT_CONFIG
    for finding in findings:  # warnings only: in the log (the journal), once per start
        log.warning("%s", finding)

    return _start(args, config, listen, server_ssl)


def _start(
    args: argparse.Namespace,
    config: ManagerConfig,
    listen: tuple[str, int],
    server_ssl: ssl.SSLContext | None,
) -> int:
    """Run what the arguments ask for, the config having passed every check."""
    # Imported only now: --help, --version, --check-config and every config
    # error answer without loading the services (a third of a second).
    from codexnet.db import StateError
    from codexnet.manager.hub import Hub
    from codexnet.manager.service import run_manager
    from codexnet.manager.telegram import TelegramFatal
    from codexnet.rlimit import raise_nofile_limit

    raise_nofile_limit()  # a socket per proxy: a thousand proxies would not fit in 1024
    host, port = listen
    key = "--ws-listen" if args.ws_listen else "manager_ws_listen"
    if args.dispatch_proxy:
        if args.dispatch_proxy not in config.proxies:
            print(
                f"{PROG}: proxy {args.dispatch_proxy!r} is not listed under "
                f"proxies in {config.source}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        return _run_listening(
            partial(_one_shot, config, listen, args.dispatch_proxy, args.prompt, args.timeout),
            host,
            port,
            key,
        )

    if args.ws_only:

        async def hub_only() -> None:
            hub = Hub.for_config(config)
            await sdnotify.run_ready(
                partial(hub.serve, host, port, ssl_context=server_ssl),
                status=f"hub listening on {host}:{port}",
            )

        def run_hub() -> int:
            trio.run(run_until_signal, hub_only)
            return EXIT_OK

        return _run_listening(run_hub, host, port, key)

    config = attrs.evolve(config, manager_ws_listen=listen)

    def run_full() -> int:
        serve = partial(
            sdnotify.run_ready,
            partial(run_manager, config),
            status=f"serving Telegram and {len(config.proxies)} proxies on {host}:{port}",
        )
        fatal = run_service(serve, (TelegramFatal, StateError))
        if isinstance(fatal, StateError):
            log.error("%s", fatal)
            return EXIT_STATE
        if isinstance(fatal, TelegramFatal):
            log.error("Telegram refused the bot: %s", fatal)
            # 409 (another poller, a webhook) may clear up; a refused token cannot.
            return EXIT_REFUSED if fatal.code in (401, 404) else EXIT_FAILED
        return EXIT_OK

    return _run_listening(run_full, host, port, key)


def _one_shot(
    config: ManagerConfig,
    listen: tuple[str, int],
    proxy_id: str,
    prompt: str,
    timeout: float,
) -> int:
    from codexnet.manager.hub import Hub
    from codexnet.manager.service import TaskFailed, run_once

    hub = Hub.for_config(config)
    try:
        result = trio.run(
            lambda: run_once(
                hub,
                *listen,
                proxy_id,
                prompt,
                timeout_s=timeout,
                ssl_context=config.ssl_context(),
            )
        )
    except TaskFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.status != "completed":
        print(f"{PROG}: task {result.status}: {result.error}", file=sys.stderr)
        return EXIT_FAILED
    print(result.text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
