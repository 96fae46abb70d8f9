"""`python -m codexnet.proxy`: connect this machine's Codex to the manager."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from codexnet.cli import EXIT_CONFIG, EXIT_OK, EXIT_REFUSED, EXIT_STATE, run_service
from codexnet.config import DEFAULT_PROXY_CONFIG, ConfigError, load_proxy_config
from codexnet.db import StateError
from codexnet.logs import setup_logging
from codexnet.proxy.appserver import AppServer
from codexnet.proxy.service import ProxyRefused, ProxyService

log = logging.getLogger("codexnet.proxy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="codexnet-proxy", description=__doc__)
    parser.add_argument(
        "--config", type=Path, default=None, help=f"config file (default: ./{DEFAULT_PROXY_CONFIG})"
    )
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_proxy_config(args.config)
        config.ssl_context()  # loads manager_ca_file now, so errors are clean
    except ConfigError as exc:
        print(f"codexnet-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{config.source}: OK (proxy {config.proxy_id!r} → {config.manager_ws})")
        return EXIT_OK

    service = ProxyService(config, AppServer(config))
    fatal = run_service(service.run, (ProxyRefused, StateError))
    if isinstance(fatal, StateError):
        log.error("%s", fatal)
        return EXIT_STATE
    if fatal is not None:
        log.error("%s", fatal)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
