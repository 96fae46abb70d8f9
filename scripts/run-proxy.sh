#!/usr/bin/env bash
# Install (idempotent) and run a proxy with ./proxy_config.json or --config PATH.
# The pinned codex from .tools/codex is put on PATH unless codex_bin says otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install.sh" >&2
export PATH="$root/.tools/codex/node_modules/.bin:$PATH"
exec "$root/.venv/bin/python" -m codexnet.proxy "$@"
