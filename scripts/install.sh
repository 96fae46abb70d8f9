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

stamp=.venv/.codexnet-install-stamp
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "install.sh: .venv is up to date"
    exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "$want" > "$stamp"
echo "install.sh: installed codexnet into $root/.venv"
