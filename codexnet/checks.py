"""Will a loaded config work on this machine? The checks beyond the loader.

The loader (`codexnet.config`) rejects what cannot be parsed. These checks look
at values that parse but cannot work, or barely: weak or mistyped tokens, a
`codex_bin` that is not there, a `state_dir` nobody can write, no proxies, an
empty allowlist — and at what would give the secrets away: a config file
holding tokens that others may read (a warning) or change (world-writable:
an error), a proxy talking plain `ws://` to another machine. Each finding
names the file and the key.

`--check-config` prints every finding (a warning keeps exit code 0, an error
makes it 2); a service start logs the warnings and refuses on errors, before
anything starts, so that a unit with `RestartPreventExitStatus=2` does not
loop on them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

import attrs

from codexnet.config import ManagerConfig, ProxyConfig

MIN_TOKEN_LENGTH: Final = 16
TOKEN_HINT: Final = (
    "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
)
# What @BotFather hands out: `<bot id>:<secret>`.
_BOT_TOKEN_SHAPE: Final = re.compile(r"^\d+:[A-Za-z0-9_-]+$")
# What to do with state_dir: leave it alone, check it (--check-config: no side
# effects), or create it if missing and prove it writable (a service start).
StateDirCheck = Literal["skip", "check", "create"]
# scripts/install.sh installs the pinned codex here (relative to the checkout).
PINNED_CODEX: Final = Path(".tools") / "codex" / "node_modules" / ".bin" / "codex"


@attrs.frozen
class Finding:
    source: str
    key: str
    message: str
    fatal: bool

    def __str__(self) -> str:
        if not self.key:  # about the file itself
            return f"{self.source}: {self.message}"
        return f"{self.source}: {self.key}: {self.message}"


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.fatal]


# --------------------------------------------------------------------------- pieces


def token_problem(token: str) -> str | None:
    """Why a shared secret (a proxy token) is unusable, or None."""
    if token != token.strip():
        # A copy-paste artefact: the other side would send the token without it.
        return "has leading or trailing whitespace"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"shorter than {MIN_TOKEN_LENGTH} characters; {TOKEN_HINT}"
    return None


def state_dir_problem(path: Path, *, create: bool) -> str | None:
    """Why `path` cannot hold the service's state, or None.

    With `create`, a missing directory is made (mode 0700, missing parents
    too: the proxy's default is `state/proxy-<id>`) when its nearest existing
    ancestor is a writable directory. A writable directory is proven by
    creating a file in it: permission bits say nothing about a read-only mount
    (`ProtectSystem=strict`) or root.
    """
    path = Path(os.path.abspath(path))
    if not path.exists():
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{path}: cannot be created: {ancestor} is not a directory"
        if not create:
            if not os.access(ancestor, os.W_OK | os.X_OK):
                return f"{path}: does not exist, and {ancestor} is not writable"
            return None
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # created meanwhile by someone else: check it like any other
        except OSError as exc:
            return f"{path}: cannot create it: {exc.strerror}"
    if not path.is_dir():
        return f"{path}: not a directory"
    if not create:
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path}: not writable"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    except OSError as exc:
        return f"{path}: not writable ({exc.strerror})"
    os.close(fd)
    os.unlink(probe)
    return None


_CAN: Final = {0o4: "read", 0o2: "change", 0o6: "read and change"}


def file_mode_problem(
    path: Path, secrets: list[str], environ: Mapping[str, str] | None = None
) -> tuple[str, bool] | None:
    """What is wrong with who may read or change a config file holding `secrets`:
    (message, fatal), or None. World-writable is fatal: anyone on the machine
    could put their own tokens (or `codex_bin`) in it.

    A systemd credential is left alone: systemd makes it 0400 and grants the
    service's user read access with an ACL, which shows as a group bit
    (0440), and its directory is the service's alone. (Run `--check-config`
    on the original file to check that one.)
    """
    if not secrets:
        return None
    credentials = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if credentials and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(credentials)):
        return None
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None  # not a file we read (the settings came from the environment)
    if not mode & 0o066:  # (execute bits let nobody read or change it)
        return None
    holds = f"holds secrets ({', '.join(secrets)})"
    fix = f"fix: chmod 600 {path}"
    if mode & 0o002:
        return (
            f"{holds} and is world-writable (mode {mode:04o}): anyone on this machine "
            f"can change it; {fix}",
            True,
        )
    who = [
        f"{name} may {can} it"
        for name, bits in (("its group", (mode >> 3) & 0o7), ("others", mode & 0o7))
        if (can := _CAN.get(bits & 0o6))
    ]
    return f"{holds} but {', '.join(who)} (mode {mode:04o}); {fix}", False


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost (and *.localhost, which resolve to it)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may be anywhere


def plain_ws_problem(url: str) -> str | None:
    """Why a `ws://` URL to another machine exposes the token and the prompts, or None."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        return None
    host = parts.hostname or ""
    if is_loopback(host):
        return None
    return (
        f"plain ws:// to {host}, another machine: the proxy token and every prompt and "
        "answer cross the network unencrypted; use wss:// (the manager's manager_tls_cert "
        "and manager_tls_key), with manager_ca_file here if its certificate is self-signed"
    )


def open_listen_problem(host: str, port: int, *, tls: bool) -> str | None:
    """Why a hub listening beyond this machine without TLS exposes the tokens, or None."""
    if tls or is_loopback(host):
        return None
    where = "every address" if host in ("", "0.0.0.0", "::") else host
    return (
        f"the hub listens on {where} (port {port}) without manager_tls_cert: proxy tokens and "
        "every prompt and answer cross the network unencrypted; set manager_tls_cert and "
        "manager_tls_key (proxies then use wss://), or listen on 127.0.0.1 behind a tunnel"
    )


def pinned_codex() -> Path:
    """The codex that scripts/install.sh put into this checkout."""
    return Path(__file__).resolve().parent.parent / PINNED_CODEX


def resolve_codex_bin(codex_bin: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The executable `codex_bin` names: a path, or a name on PATH.

    The default name `codex` falls back to the pinned one in `.tools/`, so a
    proxy started with plain `.venv/bin/python -m codexnet.proxy` finds it.
    """
    environ = os.environ if environ is None else environ
    if os.sep in codex_bin:
        path = Path(codex_bin).expanduser()
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which(codex_bin, path=environ.get("PATH", os.defpath))
    if found is None and codex_bin == "codex":
        pinned = pinned_codex()
        if pinned.is_file() and os.access(pinned, os.X_OK):
            found = str(pinned)
    return found


# --------------------------------------------------------------------------- per role


def check_manager(
    config: ManagerConfig,
    *,
    state_dir: StateDirCheck = "check",
    environ: Mapping[str, str] | None = None,
) -> list[Finding]:
    environ = os.environ if environ is None else environ
    source = config.source
    found: list[Finding] = []

    def add(key: str, message: str, *, fatal: bool) -> None:
        found.append(Finding(source, key, message, fatal))

    # What the file holds (the rest may come from the environment).
    held = []
    if config.telegram_bot_token and not environ.get("TELEGRAM_BOT_TOKEN"):
        held.append("telegram_bot_token")
    if config.proxies:
        held.append("proxies.*.token")
    mode = file_mode_problem(Path(source), held, environ)
    if mode is not None:
        add("", mode[0], fatal=mode[1])

    token = config.telegram_bot_token
    if token is not None:
        if token != token.strip():
            add("telegram_bot_token", "has leading or trailing whitespace", fatal=True)
        elif not _BOT_TOKEN_SHAPE.match(token):
            add(
                "telegram_bot_token",
                "does not look like a token from @BotFather (<digits>:<secret>)",
                fatal=False,
            )
    if not config.proxies:
        add(
            "proxies",
            "none listed: no machine can connect; add one with --add-proxy ID",
            fatal=False,
        )
    if not config.telegram_allowed_user_ids:
        add(
            "telegram_allowed_user_ids",
            "empty: the bot refuses everybody (and tells each person their user id)",
            fatal=False,
        )
    seen: dict[str, str] = {}
    for proxy_id, entry in config.proxies.items():
        problem = token_problem(entry.token)
        if problem is not None:
            add(f"proxies.{proxy_id}.token", problem, fatal=True)
        elif entry.token in seen:
            # Either proxy could then log in as the other.
            add(
                f"proxies.{proxy_id}.token",
                f"the same as proxies.{seen[entry.token]}.token",
                fatal=True,
            )
        seen.setdefault(entry.token, proxy_id)
    host, port = config.manager_ws_listen
    listen = open_listen_problem(host, port, tls=config.manager_tls_cert is not None)
    if listen is not None:
        add("manager_ws_listen", listen, fatal=False)
    if state_dir != "skip":
        # Last, and nothing is created for a config that is refused anyway.
        create = state_dir == "create" and not errors(found)
        problem = state_dir_problem(config.state_dir, create=create)
        if problem is not None:
            add("state_dir", problem, fatal=True)
    return found


def check_proxy(
    config: ProxyConfig,
    *,
    state_dir: StateDirCheck = "check",
    environ: Mapping[str, str] | None = None,
) -> list[Finding]:
    environ = os.environ if environ is None else environ
    source = config.source
    found: list[Finding] = []
    held = [] if environ.get("CODEXNET_PROXY_TOKEN") else ["proxy_token"]
    mode = file_mode_problem(Path(source), held, environ)
    if mode is not None:
        found.append(Finding(source, "", *mode))
    problem = token_problem(config.proxy_token)
    if problem is not None:
        found.append(Finding(source, "proxy_token", problem, True))
    problem = plain_ws_problem(config.manager_ws)
    if problem is not None:
        found.append(Finding(source, "manager_ws", problem, False))
    if resolve_codex_bin(config.codex_bin, environ) is None:
        where = "does not exist" if os.sep in config.codex_bin else "not found on PATH"
        found.append(
            Finding(
                source,
                "codex_bin",
                f"{config.codex_bin!r} {where} (./scripts/install.sh installs the pinned "
                f"codex into {PINNED_CODEX.parent})",
                True,
            )
        )
    if state_dir != "skip":
        create = state_dir == "create" and not errors(found)
        problem = state_dir_problem(config.state_dir, create=create)
        if problem is not None:
            found.append(Finding(source, "state_dir", problem, True))
    return found
