"""One config loader for both roles: JSONC files plus environment overrides.

Files are JSON with comments and trailing commas (parsed by `json5`, a
well-kept JSON5 parser, which accepts JSONC). Every error names the file and
the key, e.g. ``codex_config.json: proxies.proxy1.token: expected a string``,
so a person can fix it without reading code. Unknown keys are errors too: a
typo silently ignored is a setting silently not applied.

Every value is checked here, at load, so that nothing odd surfaces later as a
traceback or an "Internal error" in a chat (docs/SECURITY.md): the file must be
UTF-8 and nest at most `MAX_CONFIG_DEPTH` deep (checked before the parser,
which recurses); numbers must be finite and in a sane range (JSON5 reads
`NaN` and `Infinity`); strings hold no control character or lone surrogate;
tokens have no whitespace at either end (a pasted newline); proxy ids and
labels are what a `hello` may carry. An error is one line.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import json5

from codexnet.logs import register_secret
from codexnet.protocol import (
    CONTROL_CHAR,
    MAX_CAPACITY,
    MAX_LABELS,
    MAX_TIMEOUT_S,
    MAX_TOKEN_CHARS,
    label_problem,
    proxy_id_problem,
)

DEFAULT_MANAGER_CONFIG: Final = "codex_config.json"
DEFAULT_PROXY_CONFIG: Final = "proxy_config.json"
DEFAULT_TELEGRAM_API_BASE: Final = "https://api.telegram.org"
APPROVAL_POLICIES: Final = ("untrusted", "on-request", "never")
SANDBOX_MODES: Final = ("read-only", "workspace-write", "danger-full-access")
# A model name as `codex` and providers spell them (gpt-5.5, openai/gpt-oss:20b, …).
MODEL_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
EFFORT_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_CONFIG_DEPTH: Final = 16  # ours nest 4 deep (proxies → id → labels → label)
MAX_DELIVERY_S: Final = 30 * 86400.0
MAX_INTERVAL_S: Final = 3600.0
MAX_USER_ID: Final = 2**53
MAX_OPEN_APPROVALS: Final = 100
MAX_PENDING: Final = 100_000  # unregistered sockets at the hub; beyond any open-files limit

T = TypeVar("T")


class ConfigError(Exception):
    """A config file or override is unusable; the message says where and why."""


class ConfigMissing(ConfigError):
    """The config file does not exist (the entry points then say how to create one)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: file not found")
        self.path = path


def _mask(value: object) -> str:
    return "<set>" if value else "<unset>"


@attrs.frozen
class ProxyEntry:
    """The manager's view of one proxy it accepts."""

    token: str = attrs.field(repr=_mask)
    labels: tuple[str, ...] = ()


@attrs.frozen
class ManagerConfig:
    source: str
    telegram_bot_token: str | None = attrs.field(repr=_mask)
    telegram_api_base: str
    telegram_allowed_user_ids: frozenset[int]
    manager_ws_listen: tuple[str, int]
    default_proxy: str | None
    proxies: Mapping[str, ProxyEntry]
    state_dir: Path
    task_timeout_s: float
    telegram_poll_timeout_s: int
    proxy_wait_s: float
    live_interval_private_s: float
    live_interval_group_s: float
    use_drafts: bool
    approval_timeout_s: float
    heartbeat_timeout_s: float = 30.0
    delivery_give_up_s: float = 86400.0
    hub_max_pending: int | None = None  # None: from the open-file limit (see Hub)
    hub_max_pending_per_address: int = 32
    max_open_approvals_per_task: int = 3
    manager_tls_cert: Path | None = None
    manager_tls_key: Path | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context for `wss://`, or None for plain `ws://`."""
        if self.manager_tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.manager_tls_cert, self.manager_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{self.source}: manager_tls_cert/manager_tls_key: cannot load: {exc}"
            ) from None
        return context


@attrs.frozen
class ProxyConfig:
    source: str
    manager_ws: str
    proxy_id: str
    proxy_token: str = attrs.field(repr=_mask)
    codex_cwd: Path
    codex_bin: str
    approval_policy: str
    sandbox: str
    capacity: int
    labels: tuple[str, ...]
    http_proxy: str | None
    https_proxy: str | None
    no_proxy: str | None
    state_dir: Path = Path("state/proxy")
    heartbeat_timeout_s: float = 30.0
    manager_ca_file: Path | None = None
    # A Codex thread unused this long is unloaded from the app-server (0: never).
    thread_idle_unload_s: float = 1800.0
    # Every path the chat can name (/get, /cd, files sent) must resolve inside
    # one of these (symlinks resolved). Empty: [codex_cwd].
    allowed_roots: tuple[Path, ...] = ()
    model: str | None = None  # the default model of this machine's turns
    effort: str | None = None  # the default reasoning effort

    @property
    def roots(self) -> tuple[Path, ...]:
        """`allowed_roots`, resolved (the default is codex_cwd)."""
        return self.allowed_roots or (self.codex_cwd.resolve(),)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for a `wss://` manager (system CAs, or `manager_ca_file`)."""
        if not self.manager_ws.startswith("wss://"):
            return None
        try:
            return ssl.create_default_context(
                cafile=str(self.manager_ca_file) if self.manager_ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{self.source}: manager_ca_file: cannot load: {exc}") from None

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The codex child's environment: ours (CODEX_HOME etc.) plus the proxy settings."""
        env = dict(base)
        for key, value in (
            ("http_proxy", self.http_proxy),
            ("https_proxy", self.https_proxy),
            ("no_proxy", self.no_proxy),
        ):
            if value is not None:
                env[key] = value
                env[key.upper()] = value
        return env


# --------------------------------------------------------------------------- reading


# json5 words its errors `<string>:3 Unexpected "x" at column 10`.
_JSON5_ERROR: Final = re.compile(r"^<string>:(\d+) (.*?)(?: at column (\d+))?$", re.DOTALL)


def jsonc_error(path: Path | str, exc: ValueError) -> ConfigError:
    """A json5 parse error as `file: not valid JSONC: line 3, column 10: …`."""
    match = _JSON5_ERROR.match(str(exc))
    if match is None:
        return ConfigError(f"{path}: not valid JSONC: {one_line(str(exc))}")
    line, what, column = match.groups()
    # json5 quotes the offending character raw; a raw newline would split our one line.
    what = what.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    where = f"line {line}" + (f", column {column}" if column else "")
    return ConfigError(f"{path}: not valid JSONC: {where}: {what}")


def one_line(text: str) -> str:
    """`text` with control characters escaped, so an error stays one line."""
    return (
        CONTROL_CHAR.sub(lambda m: f"\\x{ord(m[0]):02x}", text)
        .encode("utf-8", "backslashreplace")
        .decode("utf-8")
    )


def _show(value: object, limit: int = 40) -> str:
    text = one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def jsonc_too_deep(text: str, limit: int = MAX_CONFIG_DEPTH) -> int | None:
    """The line where JSONC `text` nests deeper than `limit`, or None; without recursion.

    Brackets in strings (either quote) and comments do not count.
    """
    if text.count("[") + text.count("{") <= limit:
        return None
    depth = 0
    for token in _JSONC_TOKEN.finditer(text):
        char = token[0]
        if char in "[{":
            depth += 1
            if depth > limit:
                return text.count("\n", 0, token.start()) + 1
        elif char in "]}":
            depth -= 1
    return None


_JSONC_TOKEN: Final = re.compile(
    r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|//[^\n]*|/\*.*?\*/|[\[\]{}]""", re.DOTALL
)


def read_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    """Parse a JSONC file into a dict; a missing optional file reads as empty."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigMissing(path) from None
        return {}
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}: not UTF-8: byte 0x{raw[exc.start]:02x} at line {line}, column {column}"
        ) from None
    deep = jsonc_too_deep(text)
    if deep is not None:
        raise ConfigError(
            f"{path}: not valid JSONC: line {deep}: nested deeper than {MAX_CONFIG_DEPTH} levels"
        )
    try:
        data = json5.loads(text)
    except ValueError as exc:
        raise jsonc_error(path, exc) from None
    except RecursionError:  # jsonc_too_deep should have said so first
        raise ConfigError(f"{path}: not valid JSONC: nested too deep") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object at the top level")
    return data


class _Reader:
    """Typed access to a parsed config object, with errors that name file and key."""

    def __init__(self, source: str, data: Mapping[str, Any], prefix: str = "") -> None:
        self.source = source
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        # A key may be anything the file holds (a newline, say): one line still.
        return ConfigError(f"{self.source}: {one_line(self.prefix + key)}: {one_line(message)}")

    def get(self, key: str, kind: Callable[[str, Any], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        return kind(key, self.data[key])

    def require(self, key: str, kind: Callable[[str, Any], T]) -> T:
        self.seen.add(key)
        if key not in self.data or self.data[key] in (None, ""):
            raise self.error(key, "required")
        return kind(key, self.data[key])

    def child(self, key: str, value: Any) -> _Reader:
        if not isinstance(value, Mapping):
            raise self.error(key, "expected an object")
        return _Reader(self.source, value, f"{self.prefix}{key}.")

    def check_unknown(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise self.error(str(key), "unknown key")

    # value kinds -------------------------------------------------------------

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(key, "expected a string")
        bad = _UNSAFE.search(value)
        if bad is not None:
            what = "a lone surrogate" if "\ud800" <= bad[0] <= "\udfff" else "a control character"
            raise self.error(
                key, f"contains {what} (U+{ord(bad[0]):04X}) at position {bad.start()}"
            )
        return value

    def token(self, key: str, value: Any) -> str:
        if isinstance(value, str) and value != value.strip():
            # A newline pasted with it passed every check and then broke start-up.
            raise self.error(key, "has leading or trailing whitespace (a pasted newline or space?)")
        text = self.string(key, value)
        if len(text) > MAX_TOKEN_CHARS:
            raise self.error(key, f"longer than {MAX_TOKEN_CHARS} characters ({len(text)})")
        return text

    def integer(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "expected an integer")
        return value

    def integer_in(self, low: int, high: int) -> Callable[[str, Any], int]:
        def check(key: str, value: Any) -> int:
            number = self.integer(key, value)
            if not low <= number <= high:
                raise self.error(key, f"expected an integer in {low}..{high}, got {_show(number)}")
            return number

        return check

    def seconds(self, high: float, *, zero: bool = False) -> Callable[[str, Any], float]:
        """A finite number of seconds, above 0 (or at least 0) and at most `high`."""

        def check(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.error(key, "expected a number of seconds")
            ok = math.isfinite(value) and (value >= 0 if zero else value > 0) and value <= high
            if not ok:
                low = "[0" if zero else "(0"
                top = int(high) if float(high).is_integer() else high
                raise self.error(
                    key, f"expected a number of seconds in {low}, {top}], got {_show(value)}"
                )
            return float(value)

        return check

    def heartbeat(self, key: str, value: Any) -> float:
        seconds = self.seconds(3600)(key, value)
        if not 3 <= seconds <= 3600:
            raise self.error(key, "expected 3..3600 seconds")
        return seconds

    def proxy_id(self, key: str, value: Any) -> str:
        text = self.string(key, value)
        problem = proxy_id_problem(text)
        if problem is not None:
            raise self.error(key, f"not a usable proxy id: {problem}")
        return text

    def labels(self, key: str, value: Any) -> tuple[str, ...]:
        labels = self.strings(key, value)
        if len(labels) > MAX_LABELS:
            raise self.error(key, f"more than {MAX_LABELS} labels ({len(labels)})")
        for index, label in enumerate(labels):
            problem = label_problem(label)
            if problem is not None:
                raise self.error(f"{key}[{index}]", problem)
        return labels

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, "expected true or false")
        return value

    def existing_file(self, key: str, value: Any) -> Path:
        path = Path(self.string(key, value)).expanduser()
        if not path.is_file():
            raise self.error(key, f"{str(path)!r} is not a file")
        return path

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "expected a list of strings")
        for index, text in enumerate(value):
            self.string(f"{key}[{index}]", text)
        return tuple(value)

    def user_ids(self, key: str, value: Any) -> frozenset[int]:
        if isinstance(value, str):  # the environment form: "1,2,3"
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                ids = [int(p) for p in parts]
            except ValueError:
                raise self.error(key, "expected a comma-separated list of user ids") from None
        elif isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            ids = value
        else:
            raise self.error(key, "expected a list of integer user ids")
        for user_id in ids:
            if not 1 <= user_id <= MAX_USER_ID:
                raise self.error(key, f"{_show(user_id)} is not a Telegram user id")
        return frozenset(ids)

    def listen(self, key: str, value: Any) -> tuple[str, int]:
        text = self.string(key, value)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise self.error(key, f"expected HOST:PORT, got {text!r}")
        return host.strip("[]") or "0.0.0.0", int(port)

    def pattern(self, regex: re.Pattern[str], what: str) -> Callable[[str, Any], str]:
        def check(key: str, value: Any) -> str:
            text = self.string(key, value)
            if not regex.fullmatch(text):
                raise self.error(key, f"expected {what}; got {_show(text)}")
            return text

        return check

    def directories(self, key: str, value: Any) -> tuple[Path, ...]:
        """A list of existing directories, made absolute and with symlinks resolved."""
        found = []
        for text in self.strings(key, value):
            path = Path(text).expanduser()
            if not path.is_absolute():
                path = Path.cwd() / path
            if not path.is_dir():
                raise self.error(key, f"{_show(text)} is not a directory")
            found.append(path.resolve())
        if not found:
            raise self.error(key, "expected at least one directory")
        return tuple(found)

    def choice(self, options: tuple[str, ...]) -> Callable[[str, Any], str]:
        def check(key: str, value: Any) -> str:
            text = self.string(key, value)
            if text not in options:
                raise self.error(key, f"expected one of {', '.join(options)}; got {text!r}")
            return text

        return check


# NUL and the other control characters, and lone surrogates: no config string has a use for them.
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def parse_listen(text: str, source: str = "--ws-listen") -> tuple[str, int]:
    """`HOST:PORT` → (host, port), with the same error wording as the config file."""
    return _Reader(source, {}).listen(source, text)


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str], mapping: Mapping[str, str]
) -> dict[str, Any]:
    merged = dict(data)
    for env_key, config_key in mapping.items():
        if env.get(env_key):
            merged[config_key] = env[env_key]
    return merged


def _source_name(
    path: Path | None, default: str, env: Mapping[str, str], required: tuple[str, ...]
) -> tuple[Path, bool]:
    """The file to read, and whether it must exist.

    A named file must exist. The default file may be missing only when the
    environment holds every required setting of the role (a container set up
    by variables alone); otherwise "file not found" beats a misleading
    "telegram_bot_token: required".
    """
    if path is not None:
        return path, True
    return Path(default), not all(env.get(key) for key in required)


# --------------------------------------------------------------------------- manager

MANAGER_ENV: Final = {
    "TELEGRAM_BOT_TOKEN": "telegram_bot_token",
    "TELEGRAM_API_BASE": "telegram_api_base",
    "TELEGRAM_ALLOWED_USER_IDS": "telegram_allowed_user_ids",
    "MANAGER_WS_LISTEN": "manager_ws_listen",
    "CODEXNET_STATE_DIR": "state_dir",
}


def load_manager_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_telegram: bool = True,
) -> ManagerConfig:
    """Load the manager's config from `path` (or ./codex_config.json) plus environment."""
    env = os.environ if env is None else env
    file, required = _source_name(path, DEFAULT_MANAGER_CONFIG, env, ("TELEGRAM_BOT_TOKEN",))
    data = _apply_env(read_config_file(file, required=required), env, MANAGER_ENV)
    r = _Reader(str(file), data)

    token = r.get("telegram_bot_token", r.token, None)
    if require_telegram and not token:
        raise r.error("telegram_bot_token", "required (or set TELEGRAM_BOT_TOKEN)")
    register_secret(token)
    api_base = r.get("telegram_api_base", r.string, DEFAULT_TELEGRAM_API_BASE).rstrip("/")
    if not api_base.startswith(("http://", "https://")):
        raise r.error("telegram_api_base", "expected an http:// or https:// URL")

    proxies: dict[str, ProxyEntry] = {}
    raw_proxies: dict[str, Any] = r.get("proxies", lambda k, v: v, {})
    proxies_reader = r.child("proxies", raw_proxies)
    for proxy_id, raw in raw_proxies.items():
        proxies_reader.proxy_id(proxy_id, proxy_id)
        pr = proxies_reader.child(proxy_id, raw)
        entry = ProxyEntry(
            token=pr.require("token", pr.token),
            labels=pr.get("labels", pr.labels, ()),
        )
        pr.check_unknown()
        register_secret(entry.token)
        proxies[proxy_id] = entry

    default_proxy = r.get("default_proxy", r.string, None)
    if default_proxy is not None and default_proxy != "auto":
        if default_proxy.startswith("label:"):
            if not [p for p in default_proxy[len("label:") :].split(",") if p.strip()]:
                raise r.error("default_proxy", "label: needs at least one label")
        elif default_proxy not in proxies:
            raise r.error(
                "default_proxy",
                f'{default_proxy!r} is not listed under proxies (or write "label:<a>" or "auto")',
            )

    config = ManagerConfig(
        source=str(file),
        telegram_bot_token=token,
        telegram_api_base=api_base,
        telegram_allowed_user_ids=r.get("telegram_allowed_user_ids", r.user_ids, frozenset()),
        manager_ws_listen=r.get("manager_ws_listen", r.listen, ("127.0.0.1", 8765)),
        default_proxy=default_proxy,
        proxies=proxies,
        state_dir=Path(r.get("state_dir", r.string, "state")),
        task_timeout_s=r.get("task_timeout_s", r.seconds(MAX_TIMEOUT_S), 1800.0),
        telegram_poll_timeout_s=r.get("telegram_poll_timeout_s", r.integer, 50),
        proxy_wait_s=r.get("proxy_wait_s", r.seconds(86400, zero=True), 20.0),
        live_interval_private_s=r.get("live_interval_private_s", r.seconds(MAX_INTERVAL_S), 1.0),
        live_interval_group_s=r.get("live_interval_group_s", r.seconds(MAX_INTERVAL_S), 3.0),
        use_drafts=r.get("use_drafts", r.boolean, True),
        approval_timeout_s=r.get("approval_timeout_s", r.seconds(MAX_TIMEOUT_S), 600.0),
        heartbeat_timeout_s=r.get("heartbeat_timeout_s", r.heartbeat, 30.0),
        delivery_give_up_s=r.get("delivery_give_up_s", r.seconds(MAX_DELIVERY_S), 86400.0),
        hub_max_pending=r.get("hub_max_pending", r.integer_in(1, MAX_PENDING), None),
        hub_max_pending_per_address=r.get(
            "hub_max_pending_per_address", r.integer_in(1, MAX_PENDING), 32
        ),
        max_open_approvals_per_task=r.get(
            "max_open_approvals_per_task", r.integer_in(1, MAX_OPEN_APPROVALS), 3
        ),
        manager_tls_cert=r.get("manager_tls_cert", r.existing_file, None),
        manager_tls_key=r.get("manager_tls_key", r.existing_file, None),
    )
    if config.manager_tls_key is not None and config.manager_tls_cert is None:
        raise r.error("manager_tls_key", "given without manager_tls_cert")
    if (
        config.hub_max_pending is not None
        and config.hub_max_pending_per_address > config.hub_max_pending
    ):
        raise r.error("hub_max_pending_per_address", "must not exceed hub_max_pending")
    if not 0 <= config.telegram_poll_timeout_s <= 50:
        raise r.error("telegram_poll_timeout_s", "expected 0..50 (Telegram caps it at 50)")
    r.check_unknown()
    return config


# --------------------------------------------------------------------------- proxy

PROXY_ENV: Final = {
    "CODEXNET_MANAGER_WS": "manager_ws",
    "CODEXNET_PROXY_ID": "proxy_id",
    "CODEXNET_PROXY_TOKEN": "proxy_token",
    "CODEXNET_CODEX_BIN": "codex_bin",
    "CODEXNET_STATE_DIR": "state_dir",
}


def load_proxy_config(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> ProxyConfig:
    """Load a proxy's config from `path` (or ./proxy_config.json) plus environment."""
    env = os.environ if env is None else env
    file, required = _source_name(
        path,
        DEFAULT_PROXY_CONFIG,
        env,
        ("CODEXNET_MANAGER_WS", "CODEXNET_PROXY_ID", "CODEXNET_PROXY_TOKEN"),
    )
    data = _apply_env(read_config_file(file, required=required), env, PROXY_ENV)
    r = _Reader(str(file), data)

    manager_ws = r.require("manager_ws", r.string)
    if not manager_ws.startswith(("ws://", "wss://")):
        raise r.error("manager_ws", f"expected a ws:// or wss:// URL, got {manager_ws!r}")
    token = r.require("proxy_token", r.token)
    register_secret(token)
    capacity = r.get("capacity", r.integer_in(1, MAX_CAPACITY), 2)
    cwd = Path(r.get("codex_cwd", r.string, os.getcwd())).expanduser()
    if not cwd.is_absolute():
        cwd = Path.cwd() / cwd
    if not cwd.is_dir():
        # Codex accepts a missing cwd and then fails every shell command: catch it here.
        raise r.error("codex_cwd", f"{str(cwd)!r} is not a directory")

    proxy_id = r.require("proxy_id", r.proxy_id)
    config = ProxyConfig(
        source=str(file),
        manager_ws=manager_ws,
        proxy_id=proxy_id,
        proxy_token=token,
        codex_cwd=cwd,
        codex_bin=r.get("codex_bin", r.string, "codex"),
        approval_policy=r.get("approval_policy", r.choice(APPROVAL_POLICIES), "on-request"),
        sandbox=r.get("sandbox", r.choice(SANDBOX_MODES), "workspace-write"),
        capacity=capacity,
        labels=r.get("labels", r.labels, ()),
        http_proxy=r.get("http_proxy", r.string, None),
        https_proxy=r.get("https_proxy", r.string, None),
        no_proxy=r.get("no_proxy", r.string, None),
        state_dir=Path(r.get("state_dir", r.string, f"state/proxy-{proxy_id}")).expanduser(),
        heartbeat_timeout_s=r.get("heartbeat_timeout_s", r.heartbeat, 30.0),
        manager_ca_file=r.get("manager_ca_file", r.existing_file, None),
        thread_idle_unload_s=r.get(
            "thread_idle_unload_s", r.seconds(MAX_TIMEOUT_S, zero=True), 1800.0
        ),
        allowed_roots=r.get("allowed_roots", r.directories, ()),
        model=r.get("model", r.pattern(MODEL_NAME, "a model name like gpt-5.5"), None),
        effort=r.get("effort", r.pattern(EFFORT_NAME, "a reasoning effort like medium"), None),
    )
    real_cwd = config.codex_cwd.resolve()
    if not any(real_cwd.is_relative_to(root) for root in config.roots):
        raise r.error(
            "allowed_roots",
            f"codex_cwd {str(cwd)!r} is not inside any of them: the chat could not work there",
        )
    r.check_unknown()
    return config
