"""Helpers for tests that run the real `codex` binary against `FakeResponsesAPI`.

See /work/shared/notes/codex-app-server.md §1 (config) and §11 (traps).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CONFIG_TEMPLATE = """\
model = "mock-model"
model_provider = "mock"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

[model_providers.mock]
name = "Mock Responses"
base_url = {base_url}
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 20000

[analytics]
enabled = false

[feedback]
enabled = false

[features]
remote_models = false
plugins = false
apps = false
unbounded_connection_retries = false
"""

# Native binary of the npm package, relative to the `@openai/codex` package dir: the
# platform package is a sibling (hoisted) or nested in the package's node_modules.
_NATIVE_GLOBS = (
    "node_modules/@openai/codex-linux-*/vendor/*/bin/codex",
    "../codex-linux-*/vendor/*/bin/codex",
)

# Variables of the parent that must not leak into a hermetic codex child.
_SCRUB_PREFIXES = ("CODEX_", "OPENAI_")


def find_codex() -> str | None:
    """Path of the codex binary on PATH, preferring the native binary of the npm package.

    `node_modules/.bin/codex` is a symlink to `@openai/codex/bin/codex.js`, a node
    wrapper that spawns `@openai/codex-linux-<arch>/vendor/<triple>/bin/codex` as a
    child (slower start, an extra process). When PATH finds that wrapper and the
    native binary is next to it, return the native one; otherwise the wrapper.
    """
    found = shutil.which("codex")
    if found is None:
        return None
    native = _native_for(Path(found))
    return str(native) if native is not None else found


def _native_for(found: Path) -> Path | None:
    try:
        real = found.resolve(strict=True)
        with real.open("rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"\x7fELF":
        return None  # already native
    package = real.parent.parent  # …/@openai/codex/bin/codex.js → …/@openai/codex
    candidates = [
        *sorted(package.glob(_NATIVE_GLOBS[0])),
        *sorted(package.parent.glob(_NATIVE_GLOBS[1].removeprefix("../"))),
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_codex() -> str:
    """The codex path; skip the test when missing, but fail under CI (CI=true)."""
    path = find_codex()
    if path is not None:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("codex not on PATH under CI")
    pytest.skip("codex not on PATH")


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_codex_home(
    path: Path | str, base_url: str, *, isolate_home: bool = True
) -> dict[str, str]:
    """Write `path/config.toml` for the mock provider at `base_url`; return the child env.

    The env is a copy of ours without CODEX_*/OPENAI_* variables, plus CODEX_HOME,
    RUST_LOG=warn and TMPDIR. Codex refuses to set up its PATH helper aliases when
    CODEX_HOME lies under the temp dir (`std::env::temp_dir()`: $TMPDIR, else /tmp),
    and pytest's tmp_path is under /tmp. TMPDIR is therefore always pointed at
    `path/tmpdir`, which can never be an ancestor of CODEX_HOME; it also keeps the
    child's temporary files inside the test's directory.

    With `isolate_home` (default) HOME is `path/home` too: commands run as
    `bash -lc`, so the real ~/.profile and ~/.bashrc would otherwise add noise
    (e.g. pyenv warnings) to command output, and ~/.gitconfig etc. would leak in.
    """
    home = Path(path).absolute()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(CONFIG_TEMPLATE.format(base_url=_toml_string(base_url)))
    tmpdir = home / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    env.update(CODEX_HOME=str(home), TMPDIR=str(tmpdir), RUST_LOG="warn", NO_COLOR="1")
    if isolate_home:
        user_home = home / "home"
        user_home.mkdir(exist_ok=True)
        env["HOME"] = str(user_home)
    return env
