"""First-run set-up: `--init` writes a working manager config and this machine's
proxy config; `--add-proxy ID` adds another machine.

`--init` asks for the bot token (hidden), checks it with `getMe`, waits for the
owner's first message to learn their user id, generates this machine's proxy
token, and writes both files with mode 0600. Everything is asked before
anything is written, and each file is written to a temporary name and renamed,
so Ctrl-C (or a failure) at any point leaves no half-written config.

`--add-proxy ID` splices the new proxy into the manager's JSONC file as text
(`codexnet.jsonc_edit`), so the person's comments and layout survive; the old
file is kept as `<name>.bak`. It prints the new machine's proxy config.

This is plain blocking code (no Trio): it is a dialogue with one person, and a
KeyboardInterrupt at any prompt or wait is the cancel path.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TextIO

import attrs
import httpx
import json5

from codexnet import protocol
from codexnet.checks import pinned_codex
from codexnet.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from codexnet.config import (
    DEFAULT_PROXY_CONFIG,
    DEFAULT_TELEGRAM_API_BASE,
    ConfigError,
    load_manager_config,
)
from codexnet.jsonc_edit import EditError, add_member
from codexnet.logs import redact, register_secret

PROG: Final = "codexnet-manager"
EXIT_CANCELLED: Final = 130  # the shell's code for "ended by Ctrl-C"
DEFAULT_WAIT_S: Final = 300.0
PROXY_TOKEN_BYTES: Final = 32  # token_urlsafe(32): 43 characters
PROXY_ID_RE: Final = protocol.PROXY_ID_RE  # what a hello may carry; fullmatch only
DEFAULT_LISTEN: Final = "127.0.0.1:8765"


class SetupError(Exception):
    """One line for the person, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- files


def write_private(
    path: Path, text: str, *, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> Path:
    """Write `text` to a temporary file beside `path` (mode 0600); return its name.

    The caller renames it into place: until then `path` is untouched.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            # root editing someone's config: it must stay theirs to read.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold Ctrl-C for the few renames that make the files appear together."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def install_files(files: list[tuple[Path, str]]) -> None:
    """Write every file to a temporary name first, then rename them all."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files:
            staged.append((write_private(path, text), path))
        with _no_interrupt():
            for tmp, path in staged:
                os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _check_target(path: Path, *, force: bool, what: str) -> None:
    if not path.parent.is_dir():
        raise SetupError(f"cannot write {path}: the directory {path.parent} does not exist")
    if path.exists() and not force:
        raise SetupError(f"{path} already exists; pass --force to replace {what}")


# --------------------------------------------------------------------------- Telegram


class BotAPI:
    """The three Bot API calls the wizard needs, over blocking httpx."""

    def __init__(self, api_base: str, token: str) -> None:
        self._base = f"{api_base.rstrip('/')}/bot{token}"
        self._api_base = api_base
        self._http = httpx.Client()

    def __repr__(self) -> str:
        return "BotAPI(<token hidden>)"

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, params: dict[str, Any] | None = None, *, wait: float = 0) -> Any:
        """`result` of `method`; SetupError with Telegram's words otherwise.

        Never puts the URL (it holds the token) or httpx's message into the error.
        """
        try:
            response = self._http.post(
                f"{self._base}/{method}",
                json=params or {},
                timeout=httpx.Timeout(10.0, read=wait + 10.0),
            )
        except httpx.HTTPError as exc:
            raise SetupError(
                f"cannot reach Telegram at {self._api_base} ({type(exc).__name__})", EXIT_FAILED
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if body.get("ok"):
            return body.get("result")
        code = int(body.get("error_code", response.status_code))
        description = redact(str(body.get("description", f"HTTP {response.status_code}")))
        if code in (401, 404):
            raise SetupError(
                f"Telegram refused this bot token ({code} {description}); copy it again "
                "from @BotFather"
            )
        raise SetupError(f"Telegram: {method} failed: {code} {description}", EXIT_FAILED)


@attrs.frozen
class Owner:
    user_id: int
    name: str
    chat_id: int


def _person(user: dict[str, Any]) -> str:
    name = " ".join(str(user[k]) for k in ("first_name", "last_name") if user.get(k))
    if user.get("username"):
        name = f"{name} (@{user['username']})" if name else f"@{user['username']}"
    return name or "someone"


def wait_for_owner(api: BotAPI, timeout_s: float, clock: Callable[[], float]) -> Owner | None:
    """The sender of the first message that arrives from now on, or None on timeout.

    Updates already queued are skipped, not taken: an old message may be from
    anybody. The message taken is confirmed to Telegram, so the manager does
    not later run it as a prompt.
    """
    # A webhook makes getUpdates fail with 409; the manager removes it at start anyway.
    api.call("deleteWebhook", {"drop_pending_updates": False})
    latest = api.call("getUpdates", {"offset": -1, "timeout": 0})
    offset = latest[-1]["update_id"] + 1 if latest else None
    deadline = clock() + timeout_s
    while (remaining := deadline - clock()) > 0:
        wait = max(1, min(int(remaining), 30))
        # No allowed_updates: Telegram keeps that setting for the manager too.
        params: dict[str, Any] = {"timeout": wait}
        if offset is not None:
            params["offset"] = offset
        for update in api.call("getUpdates", params, wait=wait):
            offset = int(update["update_id"]) + 1
            message = update.get("message") or {}
            sender = message.get("from") or {}
            if isinstance(sender.get("id"), int) and not sender.get("is_bot"):
                api.call("getUpdates", {"offset": offset, "timeout": 0, "limit": 1})
                return Owner(sender["id"], _person(sender), int(message["chat"]["id"]))
    return None


# --------------------------------------------------------------------------- texts


def manager_config_text(
    *,
    bot_token: str,
    owner: Owner,
    api_base: str,
    proxy_id: str,
    proxy_token: str,
    state_dir: Path,
) -> str:
    api_line = ""
    if api_base != DEFAULT_TELEGRAM_API_BASE:
        api_line = (
            "  // A Bot API other than api.telegram.org.\n"
            f'  "telegram_api_base": {json.dumps(api_base)},\n'
        )
    return f"""\
// codexnet manager config, written by `python -m codexnet.manager --init`
// on {time.strftime("%Y-%m-%d")}. Every key is described in config.manager.example.jsonc;
// check changes with `python -m codexnet.manager --check-config`.
// It holds the bot token and the proxies' tokens: keep it private (mode 0600).
{{
  // From @BotFather; never logged.
  "telegram_bot_token": {json.dumps(bot_token)},
{api_line}
  // Telegram user ids allowed to use the bot; {owner.name} set it up.
  // Anyone else is refused and told their id, so you can add them here.
  "telegram_allowed_user_ids": [{owner.user_id}],

  // Where proxies connect. 127.0.0.1 serves this machine only; for proxies
  // on other machines listen on "0.0.0.0:8765" (and consider manager_tls_cert).
  "manager_ws_listen": "{DEFAULT_LISTEN}",

  // Chat → machine → Codex thread, and the Telegram offset.
  "state_dir": {json.dumps(str(state_dir))},

  // Every machine that may connect, with its own secret token.
  // Add one with `python -m codexnet.manager --add-proxy NAME`.
  "proxies": {{
    {json.dumps(proxy_id)}: {{"token": {json.dumps(proxy_token)}}},
  }},
}}
"""


def proxy_config_text(
    *,
    manager_ws: str,
    proxy_id: str,
    proxy_token: str,
    codex_cwd: str,
    codex_bin: str,
    state_dir: str | None,
    header: str,
) -> str:
    state_line = (
        f'\n  // This proxy\'s own state.\n  "state_dir": {json.dumps(state_dir)},\n'
        if state_dir is not None
        else ""
    )
    return f"""\
// codexnet proxy config {header}.
// Every key is described in config.proxy.example.jsonc; check it with
// `python -m codexnet.proxy --check-config --config FILE`.
// It holds this proxy's token: keep it private (mode 0600).
{{
  // The manager's WebSocket address (wss:// when it has manager_tls_cert).
  "manager_ws": {json.dumps(manager_ws)},

  // This machine's name and token, as listed under the manager's "proxies".
  "proxy_id": {json.dumps(proxy_id)},
  "proxy_token": {json.dumps(proxy_token)},

  // The folder Codex works in (it must exist).
  "codex_cwd": {json.dumps(codex_cwd)},

  // The codex executable ("codex": on PATH, else the one scripts/install.sh pins).
  "codex_bin": {json.dumps(codex_bin)},
{state_line}
  // Codex asks in the chat before running commands it is not sure about
  // (untrusted | on-request | never), and may write inside codex_cwd
  // (read-only | workspace-write | danger-full-access).
  "approval_policy": "on-request",
  "sandbox": "workspace-write",
}}
"""


# --------------------------------------------------------------------------- dialogue


def _ask(prompt: str, default: str, out: TextIO) -> str:
    out.write(f"{prompt} [{default}]: ")
    out.flush()
    answer = input().strip()
    return answer or default


def _default_proxy_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]).strip("-.")
    return name.lower() if name and PROXY_ID_RE.fullmatch(name) else "proxy1"


def _shown(path: Path) -> str:
    """`path` as a person would type it here: relative when under the current folder."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _python_command() -> str:
    return _shown(Path(sys.executable).absolute())


@attrs.frozen
class InitOptions:
    config: Path
    proxy_config: Path
    force: bool
    api_base: str
    wait_s: float = DEFAULT_WAIT_S


def run_init(options: InitOptions, out: TextIO = sys.stdout) -> int:
    """The whole `--init` dialogue; the exit code. Errors are one line on stderr."""
    try:
        init(options, out)
    except SetupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except (KeyboardInterrupt, EOFError):
        print(f"\n{PROG}: set-up cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    return EXIT_OK


def init(options: InitOptions, out: TextIO) -> None:
    config = Path(os.path.abspath(options.config))
    proxy_config = Path(os.path.abspath(options.proxy_config))
    # Everything that can refuse without a question refuses first.
    _check_target(config, force=options.force, what="the manager config")
    _check_target(proxy_config, force=options.force, what="this machine's proxy config")
    if not sys.stdin.isatty():
        raise SetupError("--init asks questions: run it in a terminal")

    out.write(
        f"codexnet set-up. This writes {_shown(config)} (the manager) and "
        f"{_shown(proxy_config)} (a proxy for this machine).\n\n"
        "1. The bot. In Telegram, @BotFather creates one (/newbot) and gives its token.\n"
    )
    token = ""
    while not token:
        token = getpass.getpass("   Bot token (input hidden): ", stream=out).strip()
    register_secret(token)
    api = BotAPI(options.api_base, token)
    try:
        out.write("   Checking it with Telegram... ")
        out.flush()
        me = api.call("getMe")
        username = str(me.get("username", ""))
        out.write(f"OK: @{username} ({me.get('first_name', '')})\n\n")

        minutes = options.wait_s / 60
        out.write(
            f"2. You. From your own Telegram account, send @{username} any message "
            f"(https://t.me/{username}).\n"
            f"   Waiting up to {minutes:g} min for it...\n"
        )
        out.flush()
        owner = wait_for_owner(api, options.wait_s, time.monotonic)
        if owner is None:
            raise SetupError(
                f"no message reached @{username} within {options.wait_s:g} s; "
                "run --init again and send the bot a message while it waits",
                EXIT_FAILED,
            )
        out.write(f"   Got a message from {owner.name}, user id {owner.user_id}.\n")
        if _ask("   Is that you? (y/n)", "y", out).lower() not in ("y", "yes"):
            raise SetupError("not the owner's message; run --init again")

        out.write("\n3. This machine's proxy (it runs Codex here).\n")
        proxy_id = _ask("   Its name", _default_proxy_id(), out)
        while not PROXY_ID_RE.fullmatch(proxy_id):
            out.write("   Letters, digits, '.', '_' and '-' only.\n")
            proxy_id = _ask("   Its name", _default_proxy_id(), out)
        codex_cwd = _ask("   Folder Codex works in", str(Path.home()), out)
        while not Path(codex_cwd).expanduser().is_dir():
            out.write(f"   {codex_cwd} is not a folder.\n")
            codex_cwd = _ask("   Folder Codex works in", str(Path.home()), out)
        codex_cwd = str(Path(codex_cwd).expanduser().resolve())

        pinned = pinned_codex()
        codex_bin = str(pinned) if pinned.exists() else "codex"
        proxy_token = secrets.token_urlsafe(PROXY_TOKEN_BYTES)
        register_secret(proxy_token)
        install_files(
            [
                (
                    proxy_config,
                    proxy_config_text(
                        manager_ws=f"ws://{DEFAULT_LISTEN}",
                        proxy_id=proxy_id,
                        proxy_token=proxy_token,
                        codex_cwd=codex_cwd,
                        codex_bin=codex_bin,
                        state_dir=str(config.parent / "state" / f"proxy-{proxy_id}"),
                        header="for this machine, written by `--init`",
                    ),
                ),
                (
                    config,
                    manager_config_text(
                        bot_token=token,
                        owner=owner,
                        api_base=options.api_base,
                        proxy_id=proxy_id,
                        proxy_token=proxy_token,
                        state_dir=config.parent / "state",
                    ),
                ),
            ]
        )
        with contextlib.suppress(SetupError):  # a courtesy: the files are written anyway
            api.call(
                "sendMessage",
                {
                    "chat_id": owner.chat_id,
                    "text": "✅ codexnet is set up. Once the manager runs, write here "
                    "and Codex answers.",
                },
            )
    finally:
        api.close()

    python = _python_command()
    out.write(
        f"\nWrote {_shown(config)} (manager) and {_shown(proxy_config)} "
        f"(proxy {proxy_id!r}), mode 0600.\n"
    )
    if codex_bin == "codex":
        out.write("codex is not installed in this checkout: run ./scripts/install.sh first.\n")
    out.write(
        "Start them, each in its own terminal:\n"
        f"  {python} -m codexnet.manager --config {_shown(config)}\n"
        f"  {python} -m codexnet.proxy --config {_shown(proxy_config)}\n"
        f"Another machine: {python} -m codexnet.manager --add-proxy NAME\n"
    )
    out.flush()


def offer_init(options: InitOptions, out: TextIO = sys.stdout) -> int | None:
    """With no config and a terminal: offer `--init`. None: written, go on and start."""
    out.write(f"{_shown(options.config)} does not exist. Create it now? [Y/n] ")
    out.flush()
    try:
        answer = input().strip().lower()
    except (KeyboardInterrupt, EOFError):
        answer = "n"
    if answer not in ("", "y", "yes"):
        print(
            f"{PROG}: {options.config}: file not found; create it with --init "
            "or from config.manager.example.jsonc",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    code = run_init(options, out)
    if code != EXIT_OK:
        return code
    out.write("\nStarting the manager now (Ctrl-C stops it).\n")
    out.flush()
    return None


# --------------------------------------------------------------------------- add a proxy


def _manager_ws_for(host: str, port: int, tls: bool) -> tuple[str, bool]:
    """The address other machines use, and whether it only works on this machine."""
    local = host in ("127.0.0.1", "::1", "localhost")
    if host in ("", "0.0.0.0", "::") or local:
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if tls else 'ws'}://{host}:{port}", local


def add_proxy(config_path: Path, proxy_id: str, out: TextIO = sys.stdout) -> int:
    """`--add-proxy ID`: add it to the manager's config, print its proxy config."""
    try:
        return _add_proxy(config_path, proxy_id, out)
    except SetupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code


def _add_proxy(config_path: Path, proxy_id: str, out: TextIO) -> int:
    if not PROXY_ID_RE.fullmatch(proxy_id):
        raise SetupError(f"{proxy_id!r}: a proxy id is letters, digits, '.', '_' and '-'")
    try:
        config = load_manager_config(config_path, env={}, require_telegram=False)
        text = config_path.read_text(encoding="utf-8")
    except ConfigError as exc:
        raise SetupError(str(exc)) from None
    if proxy_id in config.proxies:
        raise SetupError(f"{config_path}: proxies.{proxy_id}: already there")
    token = secrets.token_urlsafe(PROXY_TOKEN_BYTES)
    register_secret(token)
    try:
        new_text = add_member(text, "proxies", proxy_id, {"token": token})
    except EditError as exc:
        raise SetupError(f"{config_path}: cannot add the proxy: {exc}") from None
    # The edit must change exactly one thing; anything else means the scanner
    # misread the file, and the person's file is worth more than the shortcut.
    before = json5.loads(text)
    expected = dict(before)
    expected["proxies"] = {proxy_id: {"token": token}, **(before.get("proxies") or {})}
    if json5.loads(new_text) != expected:
        raise SetupError(f"{config_path}: cannot add the proxy safely; add it by hand")

    backup = config_path.with_name(config_path.name + ".bak")
    st = config_path.stat()
    shutil.copy2(config_path, backup)
    os.chmod(backup, st.st_mode & 0o700)
    tmp = write_private(
        config_path, new_text, mode=st.st_mode & 0o777, owner=(st.st_uid, st.st_gid)
    )
    try:
        os.replace(tmp, config_path)
    finally:
        tmp.unlink(missing_ok=True)

    host, port = config.manager_ws_listen
    manager_ws, local_only = _manager_ws_for(host, port, config.manager_tls_cert is not None)
    out.write(
        proxy_config_text(
            manager_ws=manager_ws,
            proxy_id=proxy_id,
            proxy_token=token,
            codex_cwd="/path/to/the/folder/codex/works/in",
            codex_bin="codex",
            state_dir=None,
            header=f"for {proxy_id!r}, written by `--add-proxy` (set codex_cwd)",
        )
    )
    out.flush()
    notes = [
        f"added proxy {proxy_id!r} to {config_path} (the old file is {backup.name}); "
        "restart the manager to accept it",
        f"on {proxy_id}: save the config above as proxy_config.json (mode 0600), "
        "set codex_cwd, and start the proxy",
    ]
    if local_only:
        notes.append(
            f"manager_ws_listen is {host}:{port}: other machines cannot connect until it is "
            f"0.0.0.0:{port}"
        )
    if config.manager_tls_cert is not None:
        notes.append("a self-signed certificate also needs manager_ca_file on the proxy")
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    return EXIT_OK


def default_proxy_config_for(config: Path) -> Path:
    return config.parent / DEFAULT_PROXY_CONFIG
