"""Will a loaded config work on this machine? The checks beyond the loader.

The loader (`codexnet.config`) rejects what cannot be parsed. These checks look
at values that parse but cannot work, or barely: weak or mistyped tokens, a
`codex_bin` that is not there, a `state_dir` nobody can write, no proxies, an
empty allowlist. Each finding names the file and the key.

`--check-config` prints every finding (a warning keeps exit code 0, an error
makes it 2); a service start refuses on errors only, before anything starts,
so that a unit with `RestartPreventExitStatus=2` does not loop on them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

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


def check_manager(config: ManagerConfig, *, state_dir: StateDirCheck = "check") -> list[Finding]:
    source = config.source
    found: list[Finding] = []

    def add(key: str, message: str, *, fatal: bool) -> None:
        found.append(Finding(source, key, message, fatal))

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
    source = config.source
    found: list[Finding] = []
    problem = token_problem(config.proxy_token)
    if problem is not None:
        found.append(Finding(source, "proxy_token", problem, True))
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
