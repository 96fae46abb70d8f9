#!/usr/bin/env bash
# Create .venv/ in the repo root and install codexnet with its test extras.
# Idempotent: when setup.cfg and pyproject.toml are unchanged since the last
# successful run, it only checks the stamp and exits.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"codexnet needs Python 3.11 or newer, this is {sys.version.split()[0]}")
PY

# The proxy drives the codex CLI, and the end-to-end tests run it: install the
# pinned npm package into .tools/codex (skip with CODEXNET_SKIP_CODEX=1).
if [ "${CODEXNET_SKIP_CODEX:-0}" != 1 ]; then
    if command -v npm >/dev/null 2>&1; then
        ./scripts/install-codex.sh >/dev/null
    else
        echo "install.sh: npm not found; skipping the codex CLI (proxies need it)" >&2
    fi
fi

stamp=.venv/.codexnet-install-stamp
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "install.sh: .venv is up to date"
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        echo "install.sh: $python cannot create virtual environments;" \
             "on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    fi
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "$want" > "$stamp"
echo "install.sh: installed codexnet into $root/.venv"
