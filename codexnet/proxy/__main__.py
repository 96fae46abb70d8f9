"""`python -m codexnet.proxy`: connect this machine's Codex to the manager.

The config comes from the manager: `python -m codexnet.manager --add-proxy
NAME` prints one (or `--init` writes one for the manager's own machine).

Exit codes: 0 stopped cleanly, 2 config error (restarting cannot help),
3 the manager refused this proxy (wrong token or id), 4 the state database
cannot be used.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Final

import attrs
import trio

from codexnet import sdnotify
from codexnet.checks import check_proxy, errors, resolve_codex_bin
from codexnet.cli import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STATE,
    Parser,
    add_common_arguments,
    run_service,
)
from codexnet.config import DEFAULT_PROXY_CONFIG, ConfigError, ConfigMissing, load_proxy_config
from codexnet.logs import setup_logging

PROG: Final = "codexnet-proxy"
log = logging.getLogger("codexnet.proxy")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=None, help=f"config file (default: ./{DEFAULT_PROXY_CONFIG})"
    )
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_proxy_config(args.config)
        config.ssl_context()  # loads manager_ca_file now, so errors are clean
    except ConfigMissing as exc:
        print(
            f"{PROG}: {exc.path}: file not found; on the manager's machine "
            "`python -m codexnet.manager --add-proxy NAME` prints one "
            "(or start from config.proxy.example.jsonc)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    findings = check_proxy(config, state_dir="check" if args.check_config else "create")
    for finding in errors(findings):
        print(f"{PROG}: config error: {finding}", file=sys.stderr)
    warnings = [f for f in findings if not f.fatal]
    if args.check_config:
        for finding in warnings:
            print(f"WARNING: {finding}", file=sys.stderr)
    if errors(findings):
        return EXIT_CONFIG
    if args.check_config:
        counted = f", {len(warnings)} warning{'s' if len(warnings) > 1 else ''}" if warnings else ""
        print(f"{config.source}: OK (proxy {config.proxy_id!r} → {config.manager_ws}{counted})")
        return EXIT_OK
    for finding in warnings:  # in the log (the journal), once per start
        log.warning("%s", finding)

    # Imported only now: --help, --version, --check-config and every config
    # error answer without loading the service.
    from codexnet.db import StateError
    from codexnet.proxy.appserver import AppServer
    from codexnet.proxy.service import ProxyRefused, ProxyService
    from codexnet.rlimit import raise_nofile_limit

    raise_nofile_limit()
    codex_bin = resolve_codex_bin(config.codex_bin)
    assert codex_bin is not None  # check_proxy said so
    config = attrs.evolve(config, codex_bin=codex_bin)
    app = AppServer(config)
    service = ProxyService(config, app)

    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The service, `started()` once it is connected and its app-server answers."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            await service.welcomed.wait()
            await app.wait_ready()
            task_status.started()

    fatal = run_service(
        lambda: sdnotify.run_ready(
            serve, status=f"proxy {config.proxy_id!r} connected to {config.manager_ws}"
        ),
        (ProxyRefused, StateError),
    )
    if isinstance(fatal, StateError):
        log.error("%s", fatal)
        return EXIT_STATE
    if fatal is not None:
        log.error("%s", fatal)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
