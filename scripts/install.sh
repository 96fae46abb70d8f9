#!/usr/bin/env bash
# Create .venv/ in the repo root and install codexnet into it, with the test
# extras (what `.venv/bin/python -m pytest` needs) unless --no-test-extras.
# Also installs the pinned codex CLI into .tools/codex unless --no-codex (or
# CODEXNET_SKIP_CODEX=1): a manager-only machine does not need it.
#
#   ./scripts/install.sh                    a developer's checkout (the default)
#   ./scripts/install.sh --no-test-extras   a server: no pytest, mypy, ruff
#
# Idempotent: when setup.cfg, pyproject.toml and the options are unchanged
# since the last successful run, it only checks the stamp and exits.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
extras="[test]"
skip_codex="${CODEXNET_SKIP_CODEX:-0}"
for arg in "$@"; do
    case "$arg" in
        --no-test-extras) extras="" ;;
        --no-codex) skip_codex=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"codexnet needs Python 3.11 or newer, this is {sys.version.split()[0]}")
PY

# The proxy drives the codex CLI, and the end-to-end tests run it: install the
# pinned npm package into .tools/codex.
if [ "$skip_codex" != 1 ]; then
    if command -v npm >/dev/null 2>&1; then
        ./scripts/install-codex.sh >/dev/null
    else
        echo "install.sh: npm not found; skipping the codex CLI (proxies need it)" >&2
    fi
fi

stamp=.venv/.codexnet-install-stamp
want="$( (cat setup.cfg pyproject.toml; echo "extras=$extras") | sha256sum | cut -d' ' -f1)"
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
.venv/bin/python -m pip install --quiet -e ".$extras"
echo "$want" > "$stamp"
echo "install.sh: installed codexnet${extras:+ with test extras} into $root/.venv"
